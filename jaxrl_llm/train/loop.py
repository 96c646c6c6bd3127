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
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_llm.checkpoint import Checkpointer, params_digest, write_summary
from jaxrl_llm.data.pipeline import to_device
from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives.base import Objective
from jaxrl_llm.observe import MetricWriter, Progress, mfu, peak_flops
from jaxrl_llm.parallel import is_main_process

from .optimizer import make_optimizer, make_schedule
from .state import TrainState
from .step import Compiled, build_train_step, compile_step, shard_state

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
    """The compiled step per batch shape: packed batches have one shape (compiled before step 0); bucketed
    ones compile once per bucket, each compile logged."""

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


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a packed global batch (what the pipeline yields, on every process together)."""
    b, t = cfg.train.batch_size, cfg.train.seq_len
    rows = {"tokens": jnp.int32, "loss_mask": jnp.bool_, "segment_ids": jnp.int32, "positions": jnp.int32}
    spec = {k: jax.ShapeDtypeStruct((b, t), d) for k, d in rows.items()}
    spec["num_truncated"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    return spec


@dataclasses.dataclass
class _Window:
    """Metrics of the steps since the last log line (kept on device until then)."""

    started: float
    step0: int
    metrics: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)

    def summary(self, now: float, step: int) -> dict[str, float]:
        fetched = jax.device_get(self.metrics)
        out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
        out["learning_rate"] = float(fetched[-1].get("learning_rate", np.nan))
        tokens = float(sum(m.get("tokens", 0.0) for m in fetched))
        seconds = now - self.started
        out["step_s"] = seconds / max(step - self.step0, 1)
        out["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
        return out


def run_loop(
    cfg: ml_collections.ConfigDict,
    *,
    model: Any,
    objective: Objective,
    train_data: grain.IterDataset,
    mesh: Any,
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
    evaluators: Iterable[EvalFn] = (),
    export: Callable[[Any, Path], None] | None = None,
    packed: bool = True,
) -> dict[str, Any]:
    """Trains ``model`` on ``train_data`` (an endless iterable of host batches); returns the summary."""
    run_dir = Path(cfg.run_dir)
    tcfg = cfg.train
    tx = make_optimizer(cfg, _params(model))
    schedule = make_schedule(cfg)
    graphdef, state = TrainState.create(model, tx, jax.random.key(cfg.seed))
    state = shard_state(state, mesh)
    del model  # its arrays now live in the state (and are donated to the step)

    checkpointer = Checkpointer(run_dir, keep=tcfg.keep_checkpoints)
    data_iter = iter(train_data)
    latest = checkpointer.latest_step()
    meta: dict[str, Any] = {}
    if latest is not None and not tcfg.resume:
        raise ResumeError(
            f"run_dir={str(run_dir)!r} already holds checkpoints (latest step {latest}) and train.resume is "
            "false: pick a new run_dir, delete its checkpoints, or set train.resume=true"
        )
    if latest is not None:
        state, meta = checkpointer.restore(latest, state, data_iter)
        log(f"resumed from {checkpointer.directory / str(latest)} (step {latest})")
    start = int(jax.device_get(state.step))
    if start >= tcfg.steps:
        log(f"nothing to do: the checkpoint is at step {start} and train.steps={tcfg.steps}")

    step_fn = build_train_step(graphdef, objective, tx, schedule, accum_steps=tcfg.grad_accum_steps)
    steps = StepCache(step_fn, mesh)
    # The run's key, copied out of the state (whose buffers are donated to every step).
    base_rng = jax.random.wrap_key_data(jnp.array(jax.random.key_data(state.rng), copy=True))
    if packed:  # every batch has this shape: compile (and report memory) before step 0
        steps.get(state, batch_spec(cfg), base_rng)

    writer = MetricWriter(run_dir, enabled=is_main_process())
    peak = device_peak_flops(cfg)
    flops = train_flops(_model_cfg(graphdef, state), tcfg.batch_size, tcfg.seq_len)
    tokens_seen = float(meta.get("tokens_seen", 0.0))
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = dict(meta.get("last_eval", {}))
    first_eval: dict[str, float] = dict(meta.get("first_eval", {}))
    progress = Progress(tcfg.steps, initial=start, enabled=is_main_process())
    window = _Window(time.perf_counter(), start)
    loop_started = time.perf_counter()

    def evaluate(step: int) -> None:
        nonlocal last_eval, first_eval
        results: dict[str, float] = {}
        params_model = _merge(graphdef, state)
        if eval_batches is not None:
            results |= evaluators_loss(params_model, step)
        for fn in evaluators:
            results |= fn(params_model, step)
        if results:
            writer.write(step, results, prefix="eval")
            last_eval = results
            first_eval = first_eval or results
            shown = ", ".join(f"{k} {v:.4g}" for k, v in results.items())
            log(f"step {step} eval: {shown}")

    def evaluators_loss(params_model: Any, step: int) -> dict[str, float]:
        from .evaluate import LossEvaluator

        nonlocal loss_eval
        if loss_eval is None:
            loss_eval = LossEvaluator(graphdef, objective, mesh)
        return loss_eval(_params(params_model), eval_batches(), base_rng)

    loss_eval = None
    try:
        if tcfg.eval_at_start and start == 0:
            evaluate(0)
            window.started = time.perf_counter()
        for step in range(start, tcfg.steps):
            host_batch = next(data_iter)
            batch = to_device(host_batch, mesh)
            compiled = steps.get(state, batch, base_rng)
            state, metrics = compiled(state, batch, jax.random.fold_in(base_rng, step))
            window.metrics.append(metrics)
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                now = time.perf_counter()
                logged = window.summary(now, done)
                tokens_seen += sum(float(m.get("tokens", 0.0)) for m in jax.device_get(window.metrics))
                logged["tokens_seen"] = tokens_seen
                util = mfu(flops, logged["step_s"], peak)
                if util is not None:
                    logged["mfu"] = util
                writer.write(done, logged)
                progress.update(done, loss=logged.get("loss"), tokens_per_s=logged["tokens_per_s"])
                last_train = logged
                window = _Window(time.perf_counter(), done)
            else:
                progress.update(done)
            if done % tcfg.eval_every == 0 or done == tcfg.steps:
                evaluate(done)
                window.started = time.perf_counter()  # evaluation time is not training time
            if done % tcfg.save_every == 0 or done == tcfg.steps:
                meta = {"tokens_seen": tokens_seen, "last_eval": last_eval, "first_eval": first_eval}
                checkpointer.save(done, state, data_iter, meta, force=True)
    finally:
        progress.close()
        checkpointer.close()
        writer.flush()

    final_model = _merge(graphdef, state)
    summary = {
        "stage": cfg.stage,
        "steps": int(jax.device_get(state.step)),
        "resumed_from": latest,
        "tokens_seen": tokens_seen,
        "train_seconds": time.perf_counter() - loop_started,
        "compile_seconds": steps.compile_s,
        "final_train": last_train,
        "final_eval": last_eval,
        "first_eval": first_eval,
        "params_sha256": params_digest(_params(final_model)),
    }
    if export is not None and tcfg.export_hf:
        out = run_dir / "final"
        export(final_model, out)
        summary["export"] = str(out)
    write_summary(run_dir, summary)
    writer.close()
    return summary


def _params(model: Any) -> Any:
    from flax import nnx

    return nnx.state(model, nnx.Param)


def _merge(graphdef: Any, state: TrainState) -> Any:
    from flax import nnx

    return nnx.merge(graphdef, state.params)


def _model_cfg(graphdef: Any, state: TrainState) -> Any:
    return _merge(graphdef, state).cfg
