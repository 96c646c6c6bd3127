"""Stages ``rm``, ``dpo``, ``kto``, ``orpo`` and ``simpo``: preference pairs and KTO's labelled completions.

Each pair is one row ``prompt | chosen | rejected`` (``data.pipeline`` ``mode="pairs"``: the prompt read
once, both answers attending to it; rows padded to length buckets up to ``2 * train.seq_len``, each side
at most ``train.seq_len``; ``data.packing`` does not apply), rendered with ``PairEncoder`` (only the
answers are targets). The objectives are ``jaxrl_llm.objectives.pairs``':

- ``dpo``: a frozen copy of the initial policy is the reference, the update's ``frozen["reference"]``: the
  loss computes its log-probs of both answers inside the compiled update (training and evaluation), or with
  ``pref.precompute_ref`` they are computed once for every pair before training (a table looked up by each
  pair's record index into the batch's ``ref_logps``; the reference's weights are then freed);
  ``pref.reference_free`` drops it.
  ``pref.loss_type`` picks among the 13 DPO losses.
- ``kto``: unpaired records (prompt, completion, label) rendered with ``KTOEncoder``; the pipeline's
  ``mode="kto"`` makes each row ``prompt | completion | the previous completion of the same batch`` (the
  mismatched pairs of the KL reference point, ``objectives.kto``); the reference is live, as for dpo.
- ``simpo`` and ``orpo``: no reference model.
- ``rm``: the model gets a score head (``*ForSequenceClassification``: HF's randomly initialised ``score``
  on top of a causal LM checkpoint) trained with Bradley-Terry; ``final/`` is what the reward layer loads.

Evaluation on held-out pairs reports the same metrics as training (``eval/rewards/accuracies`` is the
held-out preference accuracy); the named ``eval.sets`` are evaluated too (``eval_sets``).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm.data.packing import pair_buckets
from jaxrl_llm.data.pipeline import make_pipeline, to_device
from jaxrl_llm.models.flops import forward_flops
from jaxrl_llm.objectives import reference_logps
from jaxrl_llm.parallel import put, to_host

from .eval_sets import eval_set_evaluators
from .evaluate import LossEvaluator
from .iteration import BatchIteration, Plan, StageContext
from .loop import log
from .sft import batch_spec, run_signature
from .state import Frozen
from .step import NO_FROZEN


def pair_spec(batch_size: int, length: int, *, reference: bool, labels: bool = False) -> dict[str, Any]:
    """Shapes of a global pair batch: the row batch's (``sft.batch_spec``) with the ``shared`` prompt
    mask, plus a precomputed reference's ``ref_logps`` and KTO's ``desirable`` labels."""
    spec = batch_spec(batch_size, length)
    spec["shared"] = jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)
    if reference:
        spec["ref_logps"] = jax.ShapeDtypeStruct((batch_size, 2), jnp.float32)
    if labels:
        spec["desirable"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return spec


def _precomputed_reference(frozen: Frozen, mesh, record_sets, pipeline):
    """``prepare(batch) -> batch - index + ref_logps`` from a table computed in one pass over every record
    of ``record_sets`` (training, then evaluation: indices run on from one set to the next; the batches of
    set ``k`` must carry ``index`` plus the sizes of the sets before it), by ``frozen["reference"]``."""
    ref = jax.jit(lambda f, batch: reference_logps(f.models()["reference"], batch))
    table = np.zeros((sum(len(r) for r in record_sets), 2), np.float32)
    offset, passes = 0, 0
    for records in record_sets:
        for host in pipeline(records, train=False):
            batch = to_device(host, mesh)  # the global batch: every process fills the whole table
            values, index = to_host(ref(frozen, batch)), to_host(batch["index"])
            real = to_host(batch["loss_mask"]).any(-1)  # filler rows: no targets
            table[index[real] + offset] = values[real]
            passes += 1
        offset += len(records)
    log(f"reference log-probs precomputed for {len(table)} records ({passes} batches)")
    device_table = put(table, NamedSharding(mesh, P()))  # replicated, on every process
    lookup = jax.jit(lambda t, i: t[i])

    def prepare(batch: dict[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in batch.items() if k != "index"}
        return {**rest, "ref_logps": lookup(device_table, batch["index"])}

    return prepare


def _pipeline(
    cfg: Any,
    encoder: Any,
    records: list[dict],
    *,
    train: bool,
    with_index: bool = False,
    one_pass: bool = False,
):
    """Pair (or KTO) rows bucketed by length: training batches (endless, shuffled), evaluation batches, or
    with ``one_pass`` the training batches of one unshuffled pass (to count an epoch's steps)."""
    return make_pipeline(
        records,
        encoder,
        batch_size=cfg.train.batch_size,
        seq_len=cfg.train.seq_len,
        mode="kto" if cfg.stage == "kto" else "pairs",
        buckets=pair_buckets(cfg.train.seq_len),
        seed=cfg.seed,
        shuffle=train and not one_pass,
        num_epochs=1 if one_pass or not train else None,
        worker_count=cfg.data.workers if train and not one_pass else 0,
        with_index=with_index,
        process_split=cfg.data.process_split,
    )


def epoch_steps(cfg: Any, records: list[dict], encoder: Any) -> int:
    """Optimizer steps in one pass over ``records`` (one pair a row, ``train.batch_size`` rows a step)."""
    return sum(1 for _ in _pipeline(cfg, encoder, records, train=True, one_pass=True))


def pairs_plan(ctx: StageContext) -> Plan:
    """rm, dpo, kto, orpo, simpo: one row per pair (or KTO example), bucketed; one update per batch."""
    cfg, run = ctx.cfg, ctx.run
    if cfg.pref.precompute_ref and cfg.stage != "dpo":
        log(f"note: pref.precompute_ref applies to stage=dpo only; stage={cfg.stage!r} ignores it")
    kto = cfg.stage == "kto"
    precompute = bool(ctx.frozen.names) and cfg.stage == "dpo" and cfg.pref.precompute_ref
    buckets = pair_buckets(cfg.train.seq_len)

    def pipeline(records: list[dict], *, train: bool):
        return _pipeline(cfg, ctx.encoder, records, train=train, with_index=precompute)

    frozen, prepare = ctx.frozen, None
    if precompute:  # the reference runs once here, then its weights go with the frozen copy
        prepare = _precomputed_reference(
            frozen.bind(run.model), run.mesh, (run.train_records, run.eval_records), pipeline
        )
        frozen = NO_FROZEN
    update = ctx.update(cfg.train.grad_accum_steps)
    model_cfg = run.model.cfg
    forwards = 3 + len(frozen.names)  # forward + backward, plus a live reference's forward

    iteration = BatchIteration(
        update,
        pipeline(run.train_records, train=True),
        run.mesh,
        specs=[pair_spec(cfg.train.batch_size, t, reference=precompute, labels=kto) for t in buckets],
        flops=lambda rows, length: forwards * forward_flops(model_cfg, rows, length),
        frozen=frozen,
        prepare=prepare,
    )
    evaluators = []
    if run.eval_records:
        losses = LossEvaluator(ctx.graphdef, ctx.objective, run.mesh, frozen, prepare)

        def held_out(state, step):
            batches = pipeline(run.eval_records, train=False)
            if precompute:  # the table holds the evaluation records after the training ones
                offset = len(run.train_records)
                batches = ({**b, "index": b["index"] + offset} for b in batches)
            if cfg.train.eval_steps is not None:
                batches = itertools.islice(batches, cfg.train.eval_steps)
            return losses(state.params, batches, jax.random.key(cfg.seed))

        evaluators.append(held_out)
    evaluators += eval_set_evaluators(ctx)

    def report(summary: dict[str, Any]) -> None:
        final = {**summary["final_train"], **{f"eval/{k}": v for k, v in summary["final_eval"].items()}}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k.split("/", 1)[-1] in _SHOWN)
        log(f"done: {summary['steps']} steps; {shown}; summary in {run.run_dir / 'summary.json'}")

    return Plan(iteration, run_signature(cfg, run.loaded.content_hash), evaluators, report)


_SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "tokens_per_s")
