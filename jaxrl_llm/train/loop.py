"""The host loop every stage shares: resume, checkpoints, the metrics window, evaluation and the summary.

``run_loop(loop, graphdef=..., state=..., iteration=...)`` repeats one stage-specific ``Iteration``:

1. resumes from ``<run_dir>/checkpoints`` when it holds a checkpoint (the state with its RNG, and the
   iteration's data iterator: what follows a resume is exactly what an uninterrupted run would have seen);
2. has the iteration compile every program it runs before step 0 (each logs XLA's memory analysis);
3. runs ``loop.steps`` steps, step ``i`` drawing its key as ``fold_in(state.rng, i)``: metrics every
   ``log_every`` (the iteration's, plus step time, tokens/s and MFU) to TensorBoard and ``metrics.jsonl``;
   the evaluators every ``eval_every``; an asynchronous checkpoint every ``save_every`` and at the end;
4. writes ``summary.json`` (final metrics, sha256 of the final parameters) and, with ``export_hf``, the
   stage's export of the final model to ``<run_dir>/final``.

What a step is belongs to the iteration: one optimizer update on a host batch (``BatchIteration``: sft, pt
and the pair stages), or an RL iteration (rollouts, rewards, advantages and several updates). Only process
0 writes files other than checkpoints; every process runs the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.checkpoint import Checkpointer, params_digest, write_summary
from jaxrl_llm.checkpoint.run_info import SUMMARY_NAME
from jaxrl_llm.errors import UserError
from jaxrl_llm.models.hf_io import RUN_EXPORT_DIRNAME
from jaxrl_llm.observe import MetricWriter, Progress, mfu
from jaxrl_llm.parallel import abstract, is_main_process

from .state import TrainState

Evaluator = Callable[[TrainState, int], dict[str, float]]  # (state, step) -> metrics
HOST_KEYS = ("flops",)  # metrics an iteration reports from the host, summed over a window, not logged


class ResumeError(UserError):
    """A run directory whose checkpoints the config forbids using."""


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


class Iteration(Protocol):
    """What the loop repeats. ``data`` is the iterator a checkpoint saves beside the state (a Grain
    ``DatasetIterator``, or None); ``compile`` compiles every program the iteration runs, for the shapes it
    will see, and returns the seconds it took; a call runs one step and returns the new state with its
    metrics (device scalars, plus ``flops``: the step's matmul FLOPs, for MFU). An iteration may also define
    ``on_log(step, writer)``, called at every log step (RL writes sampled completions there)."""

    data: Any

    def compile(self, state: TrainState) -> float: ...

    def __call__(self, state: TrainState, step: int, rng: jax.Array) -> tuple[TrainState, dict[str, Any]]: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The ``train.*`` keys the loop reads (see ``python -m jaxrl_llm.config``)."""

    run_dir: str
    stage: str
    steps: int
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = True
    eval_at_start: bool = False
    export_hf: bool = True
    seq_len: int | None = None  # named in the warning about documents cut at it

    @classmethod
    def from_config(cls, cfg: Any) -> LoopConfig:
        t = cfg.train
        return cls(
            run_dir=str(cfg.run_dir),
            stage=cfg.stage,
            steps=int(t.steps),
            log_every=int(t.log_every),
            eval_every=int(t.eval_every),
            save_every=int(t.save_every),
            keep_checkpoints=int(t.keep_checkpoints),
            resume=bool(t.resume),
            eval_at_start=bool(t.eval_at_start),
            export_hf=bool(t.export_hf),
            seq_len=int(t.seq_len),
        )


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
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def fetch(self) -> list[dict[str, float]]:
        return jax.device_get(self.metrics)  # waits for the steps to finish

    def summary(self, fetched: list[dict[str, float]], now: float, step: int, peak: float | None):
        """Means of the step metrics, plus timing measured after the steps have finished (``now``)."""
        shown = [k for k in fetched[-1] if k not in HOST_KEYS]
        out = {k: float(np.mean([m[k] for m in fetched])) for k in shown}
        if "learning_rate" in fetched[-1]:
            out["learning_rate"] = float(fetched[-1]["learning_rate"])
        if "truncated" in out:
            out.pop("truncated")
            out["truncated_documents"] = float(sum(m.get("truncated", 0.0) for m in fetched))
        steps = max(step - self.step0, 1)
        seconds = now - self.started
        out["step_s"] = seconds / steps
        out["tokens_per_s"] = tokens(fetched) / seconds if seconds > 0 else 0.0
        util = mfu(sum(m.get("flops", 0.0) for m in fetched) / steps, out["step_s"], peak)
        if util is not None:
            out["mfu"] = util
        return out


def tokens(fetched: list[dict[str, float]]) -> float:
    return float(sum(m.get("tokens", 0.0) for m in fetched))


def _restore(
    loop: LoopConfig, checkpointer: Checkpointer, state: TrainState, iteration: Iteration, signature
):
    """``(state, meta, latest)``: the latest checkpoint's, or the given state when there is none."""
    run_dir, latest = Path(loop.run_dir), checkpointer.latest_step()
    if latest is None:
        return state, {}, None
    if not loop.resume:
        raise ResumeError(
            f"run_dir={str(run_dir)!r} already holds checkpoints (latest step {latest}) and train.resume is "
            "false: pick a new run_dir, delete its checkpoints, or set train.resume=true"
        )
    if latest > loop.steps:
        raise ResumeError(
            f"run_dir={str(run_dir)!r} holds a checkpoint at step {latest}, past train.steps={loop.steps}: "
            "raise train.steps to continue, or use a new run_dir"
        )
    target = abstract(state)
    del state  # restore into the abstract shapes: never two copies of the state in memory
    state, meta = checkpointer.restore(latest, target, iteration.data)
    check_resume(meta.get("signature", {}), signature, checkpointer.directory / str(latest))
    if meta.get("train_steps", loop.steps) != loop.steps:
        log(
            f"note: train.steps changed from {meta['train_steps']} to {loop.steps}; the learning-rate "
            "schedule is recomputed for the new length"
        )
    log(f"resumed from {checkpointer.directory / str(latest)} (step {latest})")
    return state, meta, latest


def run_loop(
    loop: LoopConfig,
    *,
    graphdef: Any,
    state: TrainState,
    iteration: Iteration,
    signature: dict[str, Any],
    peak_flops: float | None = None,
    evaluators: Sequence[Evaluator] = (),
    export: Callable[[Any, Path], None] | None = None,
) -> dict[str, Any]:
    """Runs ``iteration`` from ``state`` (or the run's latest checkpoint) to ``loop.steps``; returns the
    summary. ``signature`` is what must not change for a resumed run to continue exactly (batch size, data
    hash, ...): a checkpoint saved under another signature is refused, naming what changed."""
    run_dir = Path(loop.run_dir)
    checkpointer = Checkpointer(run_dir, keep=loop.keep_checkpoints)
    state, meta, latest = _restore(loop, checkpointer, state, iteration, signature)
    # Loop steps and optimizer updates differ for RL (several updates an iteration); older checkpoints
    # saved no loop step and count one update a step.
    start = int(meta.get("loop_step", jax.device_get(state.step)))
    summary_path = run_dir / SUMMARY_NAME
    if start == loop.steps and summary_path.exists():
        checkpointer.close()
        log(f"run_dir={str(run_dir)!r} already finished {start} steps: nothing to do ({summary_path})")
        return json.loads(summary_path.read_text())

    # The run's key, copied out of the state (whose buffers are donated to every step).
    base_rng = jax.random.wrap_key_data(jnp.array(jax.random.key_data(state.rng), copy=True))
    compile_s = iteration.compile(state) if start < loop.steps else 0.0

    writer = MetricWriter(run_dir, enabled=is_main_process(), resume_step=latest)
    counters = {k: float(meta.get(k, 0.0)) for k in ("tokens_seen", "train_seconds")}
    results = {k: dict(meta.get(k, {})) for k in ("last_train", "last_eval", "first_eval")}

    def evaluate(step: int) -> None:
        out: dict[str, float] = {}
        for fn in evaluators:
            out |= fn(state, step)
        if out:
            writer.write(step, out, prefix="eval")
            results["last_eval"] = out
            results["first_eval"] = results["first_eval"] or out
            log(f"step {step} eval: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))

    progress = Progress(loop.steps, initial=start, enabled=is_main_process())
    window = _Window(time.perf_counter(), start)
    warned_truncation = False
    try:
        if loop.eval_at_start and start == 0:
            evaluate(0)
        window.started = time.perf_counter()
        for step in range(start, loop.steps):
            state, metrics = iteration(state, step, jax.random.fold_in(base_rng, step))
            window.metrics.append(metrics)
            done = step + 1
            if done % loop.log_every == 0 or done == loop.steps:
                fetched = window.fetch()
                now = time.perf_counter()
                logged = window.summary(fetched, now, done, peak_flops)
                counters["train_seconds"] += now - window.started
                counters["tokens_seen"] += tokens(fetched)
                logged["tokens_seen"] = counters["tokens_seen"]
                writer.write(done, logged)
                if hasattr(iteration, "on_log"):
                    iteration.on_log(done, writer)
                progress.update(done, loss=logged.get("loss"), tokens_per_s=logged["tokens_per_s"])
                if logged.get("truncated_documents") and not warned_truncation:
                    warned_truncation = True
                    log(
                        f"warning: {logged['truncated_documents']:.0f} documents were cut at "
                        f"train.seq_len={loop.seq_len} in the last {loop.log_every} steps (their ends are not "
                        "trained on); raise train.seq_len or filter with data.max_tokens"
                    )
                results["last_train"] = logged
                window = _Window(time.perf_counter(), done)
            else:
                progress.update(done)
            if done % loop.eval_every == 0 or done == loop.steps:
                evaluate(done)
                window.started = time.perf_counter()  # evaluation time is not training time
            if done % loop.save_every == 0 or done == loop.steps:
                pending = tokens(window.fetch()) if window.metrics else 0.0
                saved = {
                    "signature": signature,
                    "train_steps": loop.steps,
                    "loop_step": done,
                    "tokens_seen": counters["tokens_seen"] + pending,
                    "train_seconds": counters["train_seconds"],
                    **results,
                }
                checkpointer.save(done, state, iteration.data, saved, force=True)
                window.started = time.perf_counter()
    finally:
        progress.close()
        checkpointer.close()
        writer.close()

    final_model = _merge(graphdef, state)
    summary = {
        "stage": loop.stage,
        "steps": loop.steps,
        "updates": int(jax.device_get(state.step)),
        "resumed_from": latest,
        "tokens_seen": counters["tokens_seen"],
        "train_seconds": counters["train_seconds"],
        "compile_seconds": compile_s,
        "final_train": results["last_train"],
        "final_eval": results["last_eval"],
        "first_eval": results["first_eval"],
        "params_sha256": params_digest(_params(final_model)),
    }
    if export is not None and loop.export_hf:
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
