"""The host loop every stage shares: steps, evaluation, checkpoints, metrics, and the run's last words.

``run_loop(cfg, model, objective, train_data, ...)``:

1. builds the optimizer and the ``TrainState``, placed on the mesh by the parameters' logical axes;
2. resumes from ``<run_dir>/checkpoints`` when it holds a checkpoint (state, RNG and the data iterator's
   position: the batches after a resume are exactly the ones an uninterrupted run would have seen);
3. compiles the step ahead of time and logs XLA's memory analysis before step 0;
4. runs ``train.steps`` steps: metrics every ``train.log_every`` (loss, grad norm, learning rate,
   tokens/s, step time, MFU) to TensorBoard and ``metrics.jsonl``; evaluation every ``train.eval_every``;
   an asynchronous checkpoint every ``train.save_every`` and at the end;
5. writes ``summary.json`` (final metrics, sha256 of the final parameters) and, with
   ``train.export_hf``, the HF checkpoint ``<run_dir>/final`` (with the tokenizer).

Only process 0 writes files other than checkpoints; every process runs the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_llm.checkpoint import Checkpointer, params_digest, write_summary
from jaxrl_llm.checkpoint.run_info import SUMMARY_NAME
from jaxrl_llm.data.pipeline import to_device
from jaxrl_llm.errors import UserError
from jaxrl_llm.models.hf_io import RUN_EXPORT_DIRNAME
from jaxrl_llm.objectives.base import Objective
from jaxrl_llm.observe import MetricWriter, Progress, mfu, peak_flops
from jaxrl_llm.parallel import is_main_process

from .optimizer import make_optimizer, make_schedule
from .state import TrainState
from .step import Compiled, abstract, build_train_step, compile_step, shard_state

EvalFn = Callable[[Any, int], dict[str, float]]  # (model, step) -> metrics


class ResumeError(UserError):
    """A run directory whose checkpoints the config forbids using."""


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def device_peak_flops(cfg: ml_collections.ConfigDict) -> float | None:
    """Peak FLOP/s of the whole mesh for the MFU estimate: ``train.peak_flops`` per device, else the known
    accelerator table, else (CPU) a matmul measured now."""
    devices = jax.devices()
    per_device = cfg.train.peak_flops or peak_flops(devices[0].device_kind, cfg.model.dtype)
    if per_device is None and devices[0].platform == "cpu":
        from jaxrl_llm.bench.peak import matmul_flops_per_s

        per_device = matmul_flops_per_s(jnp.dtype(cfg.model.dtype), repeats=3) / len(devices)
    return None if per_device is None else per_device * len(devices)


def train_flops(model_cfg: Any, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step: forward + backward = 3 forwards (the standard 6N estimate)."""
    from jaxrl_llm.bench.forward import forward_flops

    return 3.0 * forward_flops(model_cfg, batch, seq_len)


class StepCache:
    """The compiled step per batch shape. Every shape a run can see is compiled before step 0 (one for
    packed rows, one per bucket length), each compile logged with its memory analysis."""

    def __init__(self, step_fn: Callable, mesh: Any):
        self._fn, self._mesh = step_fn, mesh
        self._compiled: dict[Any, Compiled] = {}

    def get(self, state: TrainState, batch: Any, rng: jax.Array) -> Compiled:
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._compiled:
            compiled = compile_step(self._fn, state, batch, rng, self._mesh)
            shape = "x".join(map(str, batch["tokens"].shape)) if "tokens" in batch else "?"
            log(f"train step for batch {shape}: {compiled.describe()}")
            self._compiled[key] = compiled
        return self._compiled[key]

    @property
    def compile_s(self) -> float:
        return sum(c.compile_s for c in self._compiled.values())


def batch_spec(batch_size: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global row batch (what the pipeline yields, on every process together)."""
    rows = {"tokens": jnp.int32, "loss_mask": jnp.bool_, "segment_ids": jnp.int32, "positions": jnp.int32}
    spec = {k: jax.ShapeDtypeStruct((batch_size, length), d) for k, d in rows.items()}
    spec["num_truncated"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return spec


def row_lengths(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Every row length the pipeline emits: ``seq_len`` when packing, each bucket when bucketing."""
    if cfg.data.packing == "pack":
        return (cfg.train.seq_len,)
    from jaxrl_llm.data.packing import default_buckets

    return tuple(default_buckets(cfg.train.seq_len))


def run_signature(cfg: ml_collections.ConfigDict, data_hash: str | None) -> dict[str, Any]:
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


def check_resume(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    changed = [
        f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now"
        for k in now
        if k in saved and saved[k] != now[k]
    ]
    if changed:
        raise ResumeError(
            f"cannot resume from {checkpoint}: " + "; ".join(changed) + ". The data position would not "
            "match; use a new run_dir (with model.path pointing at this run to start from its weights), or "
            "restore the settings"
        )


@dataclasses.dataclass
class _Window:
    """Metrics of the steps since the last log line (kept on device until then)."""

    started: float
    step0: int
    flops: float = 0.0
    metrics: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)

    def fetch(self) -> list[dict[str, float]]:
        return jax.device_get(self.metrics)  # waits for the steps to finish

    def summary(self, fetched: list[dict[str, float]], now: float, step: int, peak: float | None):
        """Means of the step metrics, plus timing measured after the steps have finished (``now``)."""
        out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
        out["learning_rate"] = float(fetched[-1].get("learning_rate", np.nan))
        out.pop("truncated", None)
        out["truncated_documents"] = float(sum(m.get("truncated", 0.0) for m in fetched))
        steps = max(step - self.step0, 1)
        seconds = now - self.started
        out["step_s"] = seconds / steps
        out["tokens_per_s"] = tokens(fetched) / seconds if seconds > 0 else 0.0
        util = mfu(self.flops / steps, out["step_s"], peak)
        if util is not None:
            out["mfu"] = util
        return out


def tokens(fetched: list[dict[str, float]]) -> float:
    return float(sum(m.get("tokens", 0.0) for m in fetched))


def run_loop(
    cfg: ml_collections.ConfigDict,
    *,
    model: Any,
    objective: Objective,
    train_data: grain.IterDataset,
    mesh: Any,
    data_hash: str | None = None,
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
    evaluators: Iterable[EvalFn] = (),
    export: Callable[[Any, Path], None] | None = None,
    spec: Callable[[int, int], dict[str, jax.ShapeDtypeStruct]] | None = None,
    lengths: Sequence[int] | None = None,
    prepare: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
) -> dict[str, Any]:
    """Trains ``model`` on ``train_data`` (an endless iterable of host batches); returns the summary.

    ``spec(batch_size, length)`` gives the shapes of a (prepared) batch and ``lengths`` the row lengths the
    data can have, so that every step is compiled before step 0 (defaults: the packed-row batch, and
    ``row_lengths(cfg)``); ``prepare`` adds fields to each device batch before its step and evaluation
    (a frozen reference model's log-probs, say).
    """
    run_dir = Path(cfg.run_dir)
    tcfg = cfg.train
    model_cfg = model.cfg
    tx = make_optimizer(cfg, _params(model))
    schedule = make_schedule(cfg)
    graphdef, state = TrainState.create(model, tx, jax.random.key(cfg.seed))
    state = shard_state(state, mesh)
    del model  # its arrays now live in the state (and are donated to the step)

    checkpointer = Checkpointer(run_dir, keep=tcfg.keep_checkpoints)
    data_iter = iter(train_data)
    latest = checkpointer.latest_step()
    meta: dict[str, Any] = {}
    signature = run_signature(cfg, data_hash)
    if latest is not None and not tcfg.resume:
        raise ResumeError(
            f"run_dir={str(run_dir)!r} already holds checkpoints (latest step {latest}) and train.resume is "
            "false: pick a new run_dir, delete its checkpoints, or set train.resume=true"
        )
    if latest is not None:
        if latest > tcfg.steps:
            raise ResumeError(
                f"run_dir={str(run_dir)!r} holds a checkpoint at step {latest}, past train.steps={tcfg.steps}: "
                "raise train.steps to continue, or use a new run_dir"
            )
        target = abstract(state)
        del state  # restore into the abstract shapes: never two copies of the state in memory
        state, meta = checkpointer.restore(latest, target, data_iter)
        check_resume(meta.get("signature", {}), signature, checkpointer.directory / str(latest))
        if meta.get("train_steps", tcfg.steps) != tcfg.steps:
            log(
                f"note: train.steps changed from {meta['train_steps']} to {tcfg.steps}; the learning-rate "
                "schedule is recomputed for the new length"
            )
        log(f"resumed from {checkpointer.directory / str(latest)} (step {latest})")
    start = int(jax.device_get(state.step))
    summary_path = run_dir / SUMMARY_NAME
    if start == tcfg.steps and summary_path.exists():
        checkpointer.close()
        log(f"run_dir={str(run_dir)!r} already finished {start} steps: nothing to do ({summary_path})")
        return json.loads(summary_path.read_text())

    step_fn = build_train_step(
        graphdef, objective, tx, schedule, accum_steps=tcfg.grad_accum_steps, mesh=mesh
    )
    steps = StepCache(step_fn, mesh)
    # The run's key, copied out of the state (whose buffers are donated to every step).
    base_rng = jax.random.wrap_key_data(jnp.array(jax.random.key_data(state.rng), copy=True))
    if start < tcfg.steps:
        for length in lengths or row_lengths(cfg):
            steps.get(state, (spec or batch_spec)(tcfg.batch_size, length), base_rng)

    writer = MetricWriter(run_dir, enabled=is_main_process(), resume_step=latest)
    peak = device_peak_flops(cfg)
    tokens_seen = float(meta.get("tokens_seen", 0.0))
    last_train: dict[str, float] = dict(meta.get("last_train", {}))
    last_eval: dict[str, float] = dict(meta.get("last_eval", {}))
    first_eval: dict[str, float] = dict(meta.get("first_eval", {}))
    train_seconds = float(meta.get("train_seconds", 0.0))
    loss_eval = None

    def evaluate(step: int) -> None:
        nonlocal last_eval, first_eval, loss_eval
        results: dict[str, float] = {}
        current = _merge(graphdef, state)
        if eval_batches is not None:
            from .evaluate import LossEvaluator

            loss_eval = loss_eval or LossEvaluator(graphdef, objective, mesh, prepare)
            results |= loss_eval(state.params, eval_batches(), base_rng)
        for fn in evaluators:
            results |= fn(current, step)
        if results:
            writer.write(step, results, prefix="eval")
            last_eval = results
            first_eval = first_eval or results
            shown = ", ".join(f"{k} {v:.4g}" for k, v in results.items())
            log(f"step {step} eval: {shown}")

    progress = Progress(tcfg.steps, initial=start, enabled=is_main_process())
    window = _Window(time.perf_counter(), start)
    warned_truncation = False
    try:
        if tcfg.eval_at_start and start == 0:
            evaluate(0)
        window.started = time.perf_counter()
        for step in range(start, tcfg.steps):
            batch = to_device(next(data_iter), mesh)
            if prepare is not None:
                batch = prepare(batch)
            compiled = steps.get(state, batch, base_rng)
            state, metrics = compiled(state, batch, jax.random.fold_in(base_rng, step))
            window.metrics.append(metrics)
            length = batch["tokens"].shape[-1]
            window.flops += train_flops(model_cfg, batch["tokens"].size // length, length)
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                fetched = window.fetch()
                now = time.perf_counter()
                logged = window.summary(fetched, now, done, peak)
                train_seconds += now - window.started
                tokens_seen += tokens(fetched)
                logged["tokens_seen"] = tokens_seen
                writer.write(done, logged)
                progress.update(done, loss=logged.get("loss"), tokens_per_s=logged["tokens_per_s"])
                if logged["truncated_documents"] and not warned_truncation:
                    warned_truncation = True
                    log(
                        f"warning: {logged['truncated_documents']:.0f} documents were cut at "
                        f"train.seq_len={tcfg.seq_len} in the last {tcfg.log_every} steps (their ends are not "
                        "trained on); raise train.seq_len or filter with data.max_tokens"
                    )
                last_train = logged
                window = _Window(time.perf_counter(), done)
            else:
                progress.update(done)
            if done % tcfg.eval_every == 0 or done == tcfg.steps:
                evaluate(done)
                window.started = time.perf_counter()  # evaluation time is not training time
            if done % tcfg.save_every == 0 or done == tcfg.steps:
                pending = tokens(window.fetch()) if window.metrics else 0.0
                saved = {
                    "signature": signature,
                    "train_steps": tcfg.steps,
                    "tokens_seen": tokens_seen + pending,
                    "train_seconds": train_seconds,
                    "last_train": last_train,
                    "last_eval": last_eval,
                    "first_eval": first_eval,
                }
                checkpointer.save(done, state, data_iter, saved, force=True)
                window.started = time.perf_counter()
    finally:
        progress.close()
        checkpointer.close()
        writer.close()

    final_model = _merge(graphdef, state)
    summary = {
        "stage": cfg.stage,
        "steps": int(jax.device_get(state.step)),
        "resumed_from": latest,
        "tokens_seen": tokens_seen,
        "train_seconds": train_seconds,
        "compile_seconds": steps.compile_s,
        "final_train": last_train,
        "final_eval": last_eval,
        "first_eval": first_eval,
        "params_sha256": params_digest(_params(final_model)),
    }
    if export is not None and tcfg.export_hf:
        out = run_dir / RUN_EXPORT_DIRNAME
        export(final_model, out)
        summary["export"] = str(out)
    write_summary(run_dir, summary)
    return summary


def _params(model: Any) -> Any:
    from flax import nnx

    return nnx.state(model, nnx.Param)


def _merge(graphdef: Any, state: TrainState) -> Any:
    from flax import nnx

    return nnx.merge(graphdef, state.params)
