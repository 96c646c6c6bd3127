"""Stages ``rm``, ``dpo``, ``kto``, ``orpo`` and ``simpo``: preference pairs and KTO's labelled completions.

Each pair is one row ``prompt | chosen | rejected`` (``data.pipeline`` ``mode="pairs"``: the prompt read
once, both answers attending to it; rows padded to length buckets up to ``2 * train.seq_len``, each side
at most ``train.seq_len``; ``data.packing`` does not apply), rendered with ``PairEncoder`` (only the
answers are targets). The objectives are ``jaxrl_llm.objectives.pairs``':

- ``dpo``: a frozen copy of the initial policy is the reference; its log-probs of both answers are computed
  for every batch (training and evaluation) by a separate jitted forward and passed in the batch as
  ``ref_logps``, or with ``pref.precompute_ref`` once for every pair before training (a table looked up by
  each pair's record index; the reference's weights are then freed); ``pref.reference_free`` drops it.
  ``pref.loss_type`` picks among the 13 DPO losses.
- ``kto``: unpaired records (prompt, completion, label) rendered with ``KTOEncoder``; the pipeline's
  ``mode="kto"`` makes each row ``prompt | completion | the previous completion of the same batch`` (the
  mismatched pairs of the KL reference point, ``objectives.kto``); the reference is live, as for dpo.
- ``simpo`` and ``orpo``: no reference model.
- ``rm``: the model gets a score head (``*ForSequenceClassification``: HF's randomly initialised ``score``
  on top of a causal LM checkpoint) trained with Bradley-Terry; ``final/`` is what the reward layer loads.

Evaluation on held-out pairs reports the same metrics as training (``eval/rewards/accuracies`` is the
held-out preference accuracy).
"""

from __future__ import annotations

import itertools
from typing import Any

import ml_collections

from jaxrl_llm.data.records import DataError

PAIR_STAGES = ("rm", "dpo", "kto", "orpo", "simpo")


def _objective(cfg: ml_collections.ConfigDict):
    from jaxrl_llm.objectives import (
        dpo_objective,
        kto_objective,
        orpo_objective,
        rm_objective,
        simpo_objective,
    )

    p = cfg.pref
    if cfg.stage == "kto":
        return kto_objective(
            beta=p.beta, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight
        )
    if cfg.stage == "dpo":
        return dpo_objective(
            beta=p.beta,
            loss_type=p.loss_type,
            label_smoothing=p.label_smoothing,
            reference_free=p.reference_free,
            sft_weight=p.sft_weight,
        )
    if cfg.stage == "simpo":
        return simpo_objective(beta=p.beta, gamma=p.simpo_gamma, label_smoothing=p.label_smoothing)
    if cfg.stage == "orpo":
        return orpo_objective(beta=p.beta)
    return rm_objective(center_coef=p.center_coef)


def pair_spec(batch_size: int, length: int, *, reference: bool, labels: bool = False) -> dict[str, Any]:
    """Shapes of a global pair batch: the row batch's (``loop.batch_spec``) with the ``shared`` prompt
    mask, plus ``ref_logps`` when there is a reference and KTO's ``desirable`` labels."""
    import jax
    import jax.numpy as jnp

    from .loop import batch_spec

    spec = batch_spec(batch_size, length)
    spec["shared"] = jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)
    if reference:
        spec["ref_logps"] = jax.ShapeDtypeStruct((batch_size, 2), jnp.float32)
    if labels:
        spec["desirable"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return spec


def _reference_fn(policy: Any):
    """``ref(batch) -> float32[B, 2]``: the log-probs of both sides under a frozen copy of ``policy`` (the
    initial model, before training updates and donates its buffers). The copy keeps each parameter's
    sharding; copying rather than building the model again saves a second initialisation or checkpoint
    read, and the reference is the policy's start whatever built it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl_llm.objectives import reference_logps

    graphdef, state = nnx.split(policy)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    params = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)(state)
    logps = jax.jit(lambda p, batch: reference_logps(nnx.merge(graphdef, p), batch))
    return lambda batch: logps(params, batch)


def _live_reference(policy: Any):
    """``prepare(batch) -> batch + ref_logps``, the reference run on every batch."""
    ref = _reference_fn(policy)
    return lambda batch: {**batch, "ref_logps": ref(batch)}


def _precomputed_reference(policy, mesh, record_sets, pipeline):
    """``prepare(batch) -> batch - index + ref_logps`` from a table computed in one pass over every record
    of ``record_sets`` (training, then evaluation: indices run on from one set to the next; the batches of
    set ``k`` must carry ``index`` plus the sizes of the sets before it). The reference's weights are freed
    once the table is made."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrl_llm.data.pipeline import to_device

    from .loop import log

    ref = _reference_fn(policy)
    table = np.zeros((sum(len(r) for r in record_sets), 2), np.float32)
    offset, passes = 0, 0
    for records in record_sets:
        for host in pipeline(records, train=False):
            real = host["loss_mask"].any(-1)  # filler rows: no targets
            values = np.asarray(jax.device_get(ref(to_device(host, mesh))))
            table[host["index"][real] + offset] = values[real]
            passes += 1
        offset += len(records)
    del ref  # the reference's weights go with it
    log(f"reference log-probs precomputed for {len(table)} records ({passes} batches)")
    with jax.set_mesh(mesh):
        device_table = jnp.asarray(table)
    lookup = jax.jit(lambda t, i: t[i])

    def prepare(batch: dict[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in batch.items() if k != "index"}
        return {**rest, "ref_logps": lookup(device_table, batch["index"])}

    return prepare


def run_pairs(cfg: ml_collections.ConfigDict) -> int:
    import jax

    from jaxrl_llm.data.packing import pair_buckets
    from jaxrl_llm.data.pipeline import make_pipeline
    from jaxrl_llm.render import KTOEncoder, PairEncoder

    from . import setup
    from .loop import log, run_loop

    run = setup.start_stage(cfg, _check_kind, head="score" if cfg.stage == "rm" else "lm")
    if cfg.pref.precompute_ref and cfg.stage != "dpo":
        log(f"note: pref.precompute_ref applies to stage=dpo only; stage={cfg.stage!r} ignores it")
    if jax.process_count() > 1:  # known once start_stage has joined the processes
        raise DataError(
            f"stage={cfg.stage!r} batches pairs by length bucket: single-process runs only for now"
        )
    run_dir, mesh, tokenizer = run.run_dir, run.mesh, run.tokenizer
    train_records, eval_records = run.train_records, run.eval_records
    kto = cfg.stage == "kto"
    reference = kto or (cfg.stage == "dpo" and not cfg.pref.reference_free)
    precompute = reference and cfg.stage == "dpo" and cfg.pref.precompute_ref
    buckets = pair_buckets(cfg.train.seq_len)
    encoder = KTOEncoder(run.renderer) if kto else PairEncoder(run.renderer)

    def pipeline(records: list[dict], *, train: bool):
        return make_pipeline(
            records,
            encoder,
            batch_size=cfg.train.batch_size,
            seq_len=cfg.train.seq_len,
            mode="kto" if kto else "pairs",
            buckets=buckets,
            seed=cfg.seed,
            shuffle=train,
            num_epochs=None if train else 1,
            worker_count=cfg.data.workers if train else 0,
            with_index=precompute,
        )

    prepare = None
    if precompute:
        prepare = _precomputed_reference(run.model, mesh, (train_records, eval_records), pipeline)
    elif reference:
        prepare = _live_reference(run.model)

    eval_batches = None
    if eval_records:

        def eval_batches():
            batches = pipeline(eval_records, train=False)
            if precompute:  # the table holds the evaluation records after the training ones
                batches = ({**b, "index": b["index"] + len(train_records)} for b in batches)
            steps = cfg.train.eval_steps
            return batches if steps is None else itertools.islice(batches, steps)

    summary = run_loop(
        cfg,
        model=run.model,
        objective=_objective(cfg),
        train_data=pipeline(train_records, train=True),
        mesh=mesh,
        eval_batches=eval_batches,
        export=setup.hf_export(tokenizer),
        data_hash=run.loaded.content_hash,
        spec=lambda b, t: pair_spec(b, t, reference=reference, labels=kto),
        lengths=buckets,
        prepare=prepare,
    )
    final = {**summary["final_train"], **{f"eval/{k}": v for k, v in summary["final_eval"].items()}}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k.split("/", 1)[-1] in _SHOWN)
    log(f"done: {summary['steps']} steps; {shown}; summary in {run_dir / 'summary.json'}")
    return 0


_SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "tokens_per_s")


def _check_kind(stage: str, kind: str | None) -> None:
    if stage == "kto":
        if kind != "unpaired":
            raise DataError(
                f"stage='kto' trains on labelled completions (prompt, completion, label), but data.path holds "
                f"{kind} records"
                + ("; preference pairs train with stage=dpo" if kind == "preference" else "")
            )
        return
    if kind != "preference":
        raise DataError(
            f"stage={stage!r} trains on preference records (prompt, chosen, rejected), but data.path holds "
            f"{kind} records" + ("; labelled completions train with stage=kto" if kind == "unpaired" else "")
        )
