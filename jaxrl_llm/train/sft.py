"""Stages ``sft`` and ``pt``: supervised fine-tuning on conversations (assistant tokens are targets) and
continued pre-training on raw text (every token a target), with the same loss and loop."""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxrl_llm.data.records import DataError


def _pipeline(cfg: ml_collections.ConfigDict, records: list[dict], encoder: Any, *, train: bool):
    import jax

    from jaxrl_llm.data.pipeline import make_pipeline

    return make_pipeline(
        records,
        encoder,
        batch_size=cfg.train.batch_size,
        seq_len=cfg.train.seq_len,
        mode=cfg.data.packing if train else "pack",
        seed=cfg.seed,
        shuffle=train,
        num_epochs=None if train or jax.process_count() > 1 else 1,
        worker_count=cfg.data.workers if train else 0,
        shard_by_process=True,
    )


def _check_kind(stage: str, kind: str | None) -> None:
    allowed = {"sft": ("conversation", "text"), "pt": ("text",)}[stage]
    if kind not in allowed:
        raise DataError(
            f"stage={stage!r} trains on {' or '.join(allowed)} records, but data.path holds {kind} records"
            + ("; preference data trains with stage=dpo/orpo/simpo/rm" if kind == "preference" else "")
        )


def run_sft(cfg: ml_collections.ConfigDict) -> int:
    import itertools

    import jax

    from jaxrl_llm.objectives import sft_objective
    from jaxrl_llm.render.records import SFTEncoder

    from . import setup
    from .evaluate import exact_match
    from .loop import log, run_loop

    run = setup.start_stage(cfg, _check_kind)
    run_dir, mesh, renderer = run.run_dir, run.mesh, run.renderer
    train_records, eval_records = run.train_records, run.eval_records

    encoder = SFTEncoder(renderer)
    train_data = _pipeline(cfg, train_records, encoder, train=True)
    eval_batches = None
    evaluators = []
    if eval_records:
        eval_steps = cfg.train.eval_steps
        if eval_steps is None and jax.process_count() > 1:
            # Processes must run the same number of eval batches, so the pass is endless and cut: about
            # one pass (a packed row holds at least one record).
            eval_steps = max(1, len(eval_records) // cfg.train.batch_size)

        def eval_batches():
            batches = _pipeline(cfg, eval_records, encoder, train=False)
            return batches if eval_steps is None else itertools.islice(batches, eval_steps)

        if cfg.train.eval_generate and jax.process_count() > 1:
            log("train.eval_generate is skipped: generation evaluation runs in single-process runs only")
        elif cfg.train.eval_generate:
            samples = eval_records[: cfg.train.eval_generate]

            def generated(model, step):
                metrics, shown = exact_match(
                    model, renderer, samples, max_new_tokens=cfg.train.eval_max_new_tokens, mesh=mesh
                )
                for ex in shown:
                    log(f"  {ex['prompt']!r} -> {ex['generated']!r} (reference {ex['reference']!r})")
                return metrics

            evaluators.append(generated)

    summary = run_loop(
        cfg,
        model=run.model,
        objective=sft_objective(),
        train_data=train_data,
        mesh=mesh,
        eval_batches=eval_batches,
        evaluators=evaluators,
        export=setup.hf_export(run.tokenizer),
        data_hash=run.loaded.content_hash,
    )
    final, first = summary["final_eval"], summary["first_eval"]
    shown = ", ".join(f"{k} {v:.4g}" for k, v in {**summary["final_train"], **final}.items() if k in _SHOWN)
    log(f"done: {summary['steps']} steps; {shown}; summary in {run_dir / 'summary.json'}")
    if "exact_match" in final:
        before = f" (first evaluation: {first['exact_match']:.1%})" if "exact_match" in first else ""
        log(f"held-out greedy exact match: {final['exact_match']:.1%} of {final['samples']} problems{before}")
    return 0


_SHOWN = ("loss", "token_accuracy", "tokens_per_s", "exact_match")
