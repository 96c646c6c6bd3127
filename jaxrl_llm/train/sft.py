"""Stages ``sft`` and ``pt``: supervised fine-tuning on conversations (assistant tokens are targets) and
continued pre-training on raw text (every token a target), with the same loss, packed rows and iteration.

Evaluation: the loss on held-out batches, and with ``train.eval_generate`` greedy exact match of the held-out
conversations' last answers (``evaluate.exact_match``); and the named ``eval.sets`` (``eval_sets``).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm.data.pipeline import make_pipeline
from jaxrl_llm.models.flops import train_flops

from .eval_sets import eval_set_evaluators
from .evaluate import LossEvaluator, exact_match
from .iteration import BatchIteration, Plan, StageContext
from .loop import log


def batch_spec(batch_size: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global row batch (what the pipeline yields, on every process together)."""
    rows = {"tokens": jnp.int32, "loss_mask": jnp.bool_, "segment_ids": jnp.int32, "positions": jnp.int32}
    spec = {k: jax.ShapeDtypeStruct((batch_size, length), d) for k, d in rows.items()}
    spec["num_truncated"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return spec


def row_lengths(cfg: Any) -> tuple[int, ...]:
    """Every row length the pipeline emits: ``seq_len`` when packing, each bucket when bucketing."""
    if cfg.data.packing == "pack":
        return (cfg.train.seq_len,)
    from jaxrl_llm.data.packing import default_buckets

    return tuple(default_buckets(cfg.train.seq_len))


def run_signature(cfg: Any, data_hash: str | None) -> dict[str, Any]:
    """What must not change for a resumed run to continue exactly where it stopped (the data order and
    batch composition depend on all of it)."""
    return {
        "train.batch_size": cfg.train.batch_size,
        "train.seq_len": cfg.train.seq_len,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "data.packing": cfg.data.packing,
        "seed": cfg.seed,
        "processes": jax.process_count(),
        "training data (content hash)": data_hash,
    }


def _pipeline(cfg: Any, records: list[dict], encoder: Any, *, train: bool, one_pass: bool = False):
    """Training batches (endless, shuffled), evaluation batches, or with ``one_pass`` the training batches
    of one unshuffled pass (to count an epoch's steps)."""
    return make_pipeline(
        records,
        encoder,
        batch_size=cfg.train.batch_size,
        seq_len=cfg.train.seq_len,
        mode=cfg.data.packing if train else "pack",
        seed=cfg.seed,
        shuffle=train and not one_pass,
        num_epochs=1 if one_pass else None if train or _endless_eval(cfg) else 1,
        worker_count=cfg.data.workers if train and not one_pass else 0,
        process_split=cfg.data.process_split,
    )


def _endless_eval(cfg: Any) -> bool:
    """Processes reading their own records can end a pass on different steps: their evaluation stream is
    endless and cut at ``eval_steps`` (with ``process_split="rows"`` every process ends together)."""
    return jax.process_count() > 1 and cfg.data.process_split == "records"


def epoch_steps(cfg: Any, records: list[dict], encoder: Any) -> int:
    """Optimizer steps in one pass over ``records`` (packed or bucketed rows, ``train.batch_size`` a step)."""
    return sum(1 for _ in _pipeline(cfg, records, encoder, train=True, one_pass=True))


def _evaluators(ctx: StageContext) -> list:
    cfg, run = ctx.cfg, ctx.run
    if not run.eval_records:
        return eval_set_evaluators(ctx)
    eval_steps = cfg.train.eval_steps
    if eval_steps is None and _endless_eval(cfg):
        # Processes must run the same number of eval batches, so the pass is endless and cut: about one
        # pass (a packed row holds at least one record).
        eval_steps = max(1, len(run.eval_records) // cfg.train.batch_size)
    losses = LossEvaluator(ctx.graphdef, ctx.objective, run.mesh)

    def loss(state, step):
        batches = _pipeline(cfg, run.eval_records, ctx.encoder, train=False)
        if eval_steps is not None:
            batches = itertools.islice(batches, eval_steps)
        return losses(state.params, batches, jax.random.key(cfg.seed))

    out = [loss]
    if cfg.train.eval_generate and jax.process_count() > 1:
        log("train.eval_generate is skipped: generation evaluation runs in single-process runs only")
    elif cfg.train.eval_generate:
        samples = run.eval_records[: cfg.train.eval_generate]

        def generated(state, step):
            from flax import nnx

            model = nnx.merge(ctx.graphdef, state.params)
            metrics, shown = exact_match(
                model, run.renderer, samples, max_new_tokens=cfg.train.eval_max_new_tokens, mesh=run.mesh
            )
            for ex in shown:
                log(f"  {ex['prompt']!r} -> {ex['generated']!r} (reference {ex['reference']!r})")
            return metrics

        out.append(generated)
    return out + eval_set_evaluators(ctx)


def rows_plan(ctx: StageContext) -> Plan:
    """sft / pt: packed (or bucketed) rows of rendered records, one update per batch."""
    cfg, run = ctx.cfg, ctx.run
    update = ctx.update(cfg.train.grad_accum_steps)
    model_cfg = run.model.cfg
    iteration = BatchIteration(
        update,
        _pipeline(cfg, run.train_records, ctx.encoder, train=True),
        run.mesh,
        specs=[batch_spec(cfg.train.batch_size, length) for length in row_lengths(cfg)],
        flops=lambda rows, length: train_flops(model_cfg, rows, length),
    )

    def report(summary: dict[str, Any]) -> None:
        final, first = summary["final_eval"], summary["first_eval"]
        shown = {**summary["final_train"], **final}
        line = ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if k in _SHOWN)
        log(f"done: {summary['steps']} steps; {line}; summary in {run.run_dir / 'summary.json'}")
        if "exact_match" in final:
            before = f" (first evaluation: {first['exact_match']:.1%})" if "exact_match" in first else ""
            log(
                f"held-out greedy exact match: {final['exact_match']:.1%} of {final['samples']} problems{before}"
            )

    return Plan(iteration, run_signature(cfg, run.loaded.content_hash), _evaluators(ctx), report)


_SHOWN = ("loss", "token_accuracy", "tokens_per_s", "exact_match")
