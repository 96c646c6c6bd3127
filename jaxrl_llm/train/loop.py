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

Faults (see ``faults``): a SIGTERM/SIGINT or ``train.max_hours`` ends the loop after the current step with
a checkpoint of it; a step whose loss or gradient is not finite leaves the parameters as they were (the
compiled step skips it) and is counted, and ``train.nonfinite_max_consecutive`` of them in a row stop the
run or roll it back to the last checkpoint with a lower learning rate; a checkpoint of non-finite
parameters is never written, and a run that ends non-finite exports nothing and fails. A damaged latest
checkpoint is skipped for the one before it, saying so.

What a step is belongs to the iteration: one optimizer update on a host batch (``BatchIteration``: sft, pt
and the pair stages), or an RL iteration (rollouts, rewards, advantages and several updates). Only process
0 writes files other than checkpoints; every process runs the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.checkpoint import CheckpointDamagedError, Checkpointer, params_digest, write_summary
from jaxrl_llm.checkpoint.manager import DIRNAME
from jaxrl_llm.checkpoint.registry import write_artifacts
from jaxrl_llm.checkpoint.run_info import SUMMARY_NAME
from jaxrl_llm.errors import UserError
from jaxrl_llm.models.hf_io import RUN_EXPORT_DIRNAME
from jaxrl_llm.observe import MetricWriter, Progress, Reporting, mfu
from jaxrl_llm.parallel import abstract, is_main_process, put

from .canary import CANARY_FILE, CanaryHalted, format_samples
from .faults import (
    Deadline,
    NonFinitePolicy,
    NonFiniteTracker,
    StopSignals,
    TrainingDiverged,
    signal_handler,
)
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
    max_hours: float | None = None
    resume_from_step: int | None = None
    nonfinite: NonFinitePolicy = NonFinitePolicy()
    report: Reporting = Reporting()  # observe.*: loggers beside TensorBoard
    canary_every: int = 0
    canary_action: str = "halt"

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
            max_hours=None if t.max_hours is None else float(t.max_hours),
            resume_from_step=None if t.resume_from_step is None else int(t.resume_from_step),
            nonfinite=NonFinitePolicy(
                max_consecutive=int(t.nonfinite_max_consecutive),
                action=str(t.nonfinite_action),
                lr_factor=float(t.rollback_lr_factor),
                max_rollbacks=int(t.max_rollbacks),
            ),
            report=Reporting.from_config(cfg),
            canary_every=int(cfg.canary.every),
            canary_action=str(cfg.canary.action),
        )


def changed_keys(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """The keys of ``now`` that ``saved`` holds with another value, in ``now``'s order."""
    if not saved or not now:
        return []
    return [k for k in now if k in saved and saved[k] != now[k]]


def check_resume(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    changed = [f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in changed_keys(saved, now)]
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
        shown = [k for k in fetched[-1] if k not in HOST_KEYS and k != "skipped"]
        applied = [m for m in fetched if not m.get("skipped", 0.0)] or fetched  # skipped steps' NaNs aside
        out = {k: float(np.mean([m[k] for m in applied])) for k in shown}
        if "skipped" in fetched[-1]:
            out["skipped_steps"] = float(sum(m["skipped"] > 0 for m in fetched))
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


def _fallback_note(checkpointer: Checkpointer, latest: int | None) -> None:
    """Says so when a save was interrupted after the checkpoint being resumed (the process was killed)."""
    later = [s for s in checkpointer.incomplete_steps() if latest is None or s > latest]
    if later:
        where = "from the start" if latest is None else f"from step {latest}, the last complete one"
        log(
            f"note: the checkpoint of step {later[-1]} was never finished (the run was stopped while writing "
            f"it): resuming {where}"
        )


def _set_aside_after(loop: LoopConfig) -> None:
    """``train.resume_from_step=K``: the checkpoints after K move to ``<run_dir>/checkpoints_after_K/``
    (kept, not deleted), so that K is the latest."""
    run_dir, wanted = Path(loop.run_dir), loop.resume_from_step
    probe = Checkpointer(run_dir, keep=loop.keep_checkpoints)
    try:
        steps = probe.all_steps()
        if wanted not in steps:
            raise ResumeError(
                f"train.resume_from_step={wanted}: {run_dir / DIRNAME} holds no complete checkpoint of that "
                f"step (it holds {steps or 'none'})"
            )
        later = [s for s in steps if s > wanted]
        aside = run_dir / f"{DIRNAME}_after_{wanted}"
        for s in later:
            probe.set_aside(s, aside)
    finally:
        probe.close()
    if later:
        log(f"train.resume_from_step={wanted}: moved the later checkpoints {later} to {aside}")


def _restore(
    loop: LoopConfig, checkpointer: Checkpointer, state: TrainState, iteration: Iteration, signature
):
    """``(state, meta, restored step)``: the latest complete checkpoint's (falling back to an earlier one
    when the latest cannot be read, and saying so), or the given state when there is none."""
    run_dir, steps = Path(loop.run_dir), checkpointer.all_steps()
    latest = steps[-1] if steps else None
    _fallback_note(checkpointer, latest)
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
    # A LoRA run's checkpoints hold its adapters only: the base weights stay (``untrained``).
    target, untrained = abstract(state.checkpointed()), state.untrained()
    del state  # restore into the abstract shapes: never two copies of the state in memory
    for i, step in enumerate(reversed(steps)):
        try:
            state, meta = checkpointer.restore(step, target, iteration.data)
            state = state.with_untrained(untrained)
            break
        except CheckpointDamagedError as err:
            if i == len(steps) - 1:
                raise
            kept = checkpointer.set_aside(step, run_dir / f"{DIRNAME}_damaged")
            log(
                f"warning: {err}\nfalling back to the checkpoint of step {steps[-2 - i]} (step {step} moved to {kept})"
            )
    check_resume(meta.get("signature", {}), signature, checkpointer.directory / str(step))
    if meta.get("train_steps", loop.steps) != loop.steps:
        log(
            f"note: train.steps changed from {meta['train_steps']} to {loop.steps}; the learning-rate "
            "schedule is recomputed for the new length"
        )
    log(f"resumed from {checkpointer.directory / str(step)} (step {step})")
    return state, meta, step


def changed_settings(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """The config keys whose value differs from the checkpoint's, as ``key: old -> new``."""
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(changed_keys(saved, now))]


@jax.jit
def _finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.array(True)


def finite_params(state: TrainState) -> bool:
    return bool(jax.device_get(_finite(state.params)))


def run_loop(
    loop: LoopConfig,
    *,
    graphdef: Any,
    state: TrainState,
    iteration: Iteration,
    signature: dict[str, Any],
    settings: dict[str, Any] | None = None,
    peak_flops: float | None = None,
    evaluators: Sequence[Evaluator] = (),
    export: Callable[[Any, Path], None] | None = None,
    canary: Any = None,
) -> dict[str, Any]:
    """Runs ``iteration`` from ``state`` (or the run's latest checkpoint) to ``loop.steps``; returns the
    summary. ``signature`` is what must not change for a resumed run to continue exactly (batch size, data
    hash, ...): a checkpoint saved under another signature is refused, naming what changed. ``settings``
    (the flattened config) is saved with every checkpoint; a resumed run lists the keys that changed.
    ``canary`` (a ``canary.Canary``, every ``loop.canary_every`` steps and at step 0) halts the run
    (``CanaryHalted``) or rolls it back when one of its rules fires.

    A signal or ``train.max_hours`` ends the loop early with a checkpoint of the step reached; the summary
    then holds ``stopped`` (the reason) and neither ``summary.json`` nor the export is written. Raises
    ``TrainingDiverged`` (nothing exported) when non-finite steps exhaust ``loop.nonfinite`` or the
    parameters or final loss are not finite.
    """
    run_dir = Path(loop.run_dir)
    if loop.resume_from_step is not None:
        _set_aside_after(loop)
    checkpointer = Checkpointer(run_dir, keep=loop.keep_checkpoints)
    state, meta, latest = _restore(loop, checkpointer, state, iteration, signature)
    changes = changed_settings(meta.get("settings"), settings)
    if changes:
        log(
            "note: resuming with changed settings (allowed: none of them changes the data order or the "
            "shapes; the optimizer continues from its saved state under the new values): "
            + "; ".join(changes)
        )
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

    def open_writer(resume_step: int | None) -> MetricWriter:
        return MetricWriter(
            run_dir, enabled=is_main_process(), resume_step=resume_step, report=loop.report, config=settings
        )

    writer = open_writer(latest)
    counters = {k: float(meta.get(k, 0.0)) for k in ("tokens_seen", "train_seconds")}
    results = {k: dict(meta.get(k, {})) for k in ("last_train", "last_eval", "first_eval")}
    rollbacks: list[dict[str, Any]] = list(meta.get("rollbacks", []))
    canary_state = {"last_good": meta.get("canary_last_good", 0)}
    if canary is not None:
        canary.best = meta.get("canary_best")
    nonfinite = NonFiniteTracker(loop.nonfinite.max_consecutive, skipped=int(meta.get("skipped_steps", 0)))

    def evaluate(step: int) -> None:
        out: dict[str, float] = {}
        for fn in evaluators:
            out |= fn(state, step)
        if out:
            writer.write(step, out, prefix="eval")
            results["last_eval"] = out
            results["first_eval"] = results["first_eval"] or out
            log(f"step {step} eval: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))

    def save(done: int, pending: float) -> None:
        if not finite_params(state):  # never write a non-finite checkpoint
            raise TrainingDiverged(
                f"the parameters are not finite at step {done}: no checkpoint written (the last one, step "
                f"{checkpointer.latest_step()}, is kept); lower optimizer.lr or set optimizer.clip_norm"
            )
        saved = {
            "signature": signature,
            "settings": settings or {},
            "train_steps": loop.steps,
            "loop_step": done,
            "tokens_seen": counters["tokens_seen"] + pending,
            "train_seconds": counters["train_seconds"],
            "skipped_steps": nonfinite.skipped,
            "rollbacks": rollbacks,
            "canary_best": None if canary is None else canary.best,
            "canary_last_good": canary_state["last_good"],
            **results,
        }
        checkpointer.save(done, state.checkpointed(), iteration.data, saved, force=True)
        if is_main_process():  # artifacts.json lists the checkpoint with the metrics it was saved with
            write_artifacts(run_dir, checkpoint={"step": done, **saved})

    def diverged(done: int) -> TrainingDiverged:
        last = checkpointer.latest_step()
        return TrainingDiverged(
            f"training stopped at step {done}: {nonfinite.row[1]} steps in a row (from step "
            f"{nonfinite.row[0]}) had a non-finite loss or gradient and were skipped "
            f"({nonfinite.skipped} in all, {len(rollbacks)} rollbacks). Nothing was exported; the last "
            f"checkpoint is {'step ' + str(last) if last is not None else 'none'}. Lower optimizer.lr, set "
            "optimizer.clip_norm, check the data, or set train.nonfinite_action=rollback"
        )

    def roll_back(done: int, current: TrainState, reason: str, at_or_before: int | None = None):
        """The state of the last checkpoint (at or before ``at_or_before``) with the learning rate scaled
        down, and its loop step; None when there is none to go back to or the rollbacks are used up."""
        nonlocal window, writer
        policy = loop.nonfinite
        checkpointer.wait()
        steps = [s for s in checkpointer.all_steps() if at_or_before is None or s <= at_or_before]
        if not steps or len(rollbacks) >= policy.max_rollbacks:
            return None
        restored, saved = checkpointer.restore(steps[-1], abstract(current.checkpointed()), iteration.data)
        restored = restored.with_untrained(current.untrained())
        scale = restored.lr_scale * policy.lr_factor
        state = restored.replace(lr_scale=put(scale, restored.lr_scale.sharding))
        back = int(saved.get("loop_step", steps[-1]))
        rollbacks.append({"at_step": done, "to_step": back, "lr_scale": float(scale), "reason": reason})
        counters.update({k: float(saved.get(k, 0.0)) for k in counters})
        log(
            f"warning: {reason}: rolled back to the checkpoint of step {back}, learning rate x{float(scale):g} "
            f"(rollback {len(rollbacks)} of at most {policy.max_rollbacks})"
        )
        nonfinite.reset()
        window = _Window(time.perf_counter(), back)
        progress.update(back)
        writer.close()  # what was logged after the checkpoint is logged again
        writer = open_writer(back)
        return state, back

    def run_canary(step: int) -> str | None:
        """One canary pass at ``step``: logged; returns the rule that fired, if one did."""
        report = canary(state, step)
        writer.write(step, report.metrics, prefix="canary")
        writer.write_text(step, "canary", format_samples(report))
        writer.write_samples(step, report.samples, path=run_dir / CANARY_FILE)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in report.metrics.items())
        log(f"step {step} canary: {shown}" + (f" -- RULE FIRED: {report.fired}" if report.fired else ""))
        if report.fired is None:
            canary_state["last_good"] = step
        return report.fired

    deadline = Deadline(loop.max_hours)
    progress = Progress(loop.steps, initial=start, enabled=is_main_process())
    window = _Window(time.perf_counter(), start)
    warned_truncation = False
    stopped: str | None = None
    last_shown: dict[str, float] = {}
    try:
        signals = StopSignals()
        with signal_handler(signals.handle):
            if loop.eval_at_start and start == 0:
                evaluate(0)
            if canary is not None and start == 0:
                run_canary(0)  # the baseline: no rule applies to the model the run starts from
            rollback = "rollback" in (loop.nonfinite.action, loop.canary_action)
            if rollback and start == 0:
                save(0, 0.0)  # something to roll back to before the first save_every
            window.started = time.perf_counter()
            step = start
            while step < loop.steps:
                state, metrics = iteration(state, step, jax.random.fold_in(base_rng, step))
                window.metrics.append(metrics)
                done = step + 1
                step = done
                if signals.received:
                    stopped = signals.received
                elif deadline.passed():
                    stopped = f"train.max_hours={loop.max_hours:g} reached"
                if done % loop.log_every == 0 or done == loop.steps or stopped:
                    fetched = window.fetch()
                    nonfinite.observe(window.step0, fetched)
                    now = time.perf_counter()
                    logged = window.summary(fetched, now, done, peak_flops)
                    counters["train_seconds"] += now - window.started
                    counters["tokens_seen"] += tokens(fetched)
                    logged["tokens_seen"] = counters["tokens_seen"]
                    writer.write(done, logged)
                    if hasattr(iteration, "on_log"):
                        iteration.on_log(done, writer)
                    last_shown = {"loss": logged.get("loss"), "tokens_per_s": logged["tokens_per_s"]}
                    progress.update(done, **last_shown)
                    if logged.get("truncated_documents") and not warned_truncation:
                        warned_truncation = True
                        log(
                            f"warning: {logged['truncated_documents']:.0f} documents were cut at "
                            f"train.seq_len={loop.seq_len} in the last {done - window.step0} steps (their ends "
                            "are not trained on); raise train.seq_len or filter with data.max_tokens"
                        )
                    results["last_train"] = logged
                    window = _Window(time.perf_counter(), done)
                    if nonfinite.row is not None:
                        back = None
                        if loop.nonfinite.action == "rollback":
                            first, length = nonfinite.row
                            back = roll_back(
                                done, state, f"{length} non-finite steps in a row (from step {first})"
                            )
                        if back is None:
                            raise diverged(done)
                        state, step = back
                        continue
                else:
                    progress.update(done, **last_shown)
                if not stopped and (done % loop.eval_every == 0 or done == loop.steps):
                    evaluate(done)
                    window.started = time.perf_counter()  # evaluation time is not training time
                if canary is not None and not stopped and done % loop.canary_every == 0:
                    fired = run_canary(done)
                    window.started = time.perf_counter()
                    if fired is not None:
                        back = None
                        if loop.canary_action == "rollback":
                            back = roll_back(done, state, f"canary: {fired}", canary_state["last_good"])
                        if back is None:
                            raise CanaryHalted(
                                f"the canary halted the run at step {done}: {fired}. Nothing was exported; the "
                                f"checkpoints are kept (latest step {checkpointer.latest_step()}; "
                                f"{len(rollbacks)} rollbacks). See {run_dir / CANARY_FILE}"
                            )
                        state, step = back
                        continue
                if done % loop.save_every == 0 or done == loop.steps or stopped:
                    pending = 0.0
                    if window.metrics:
                        pending_metrics = window.fetch()
                        pending = tokens(pending_metrics)
                    save(done, pending)
                    window.started = time.perf_counter()
                if stopped:
                    break
    finally:
        progress.close()
        try:
            checkpointer.close()
        finally:
            try:
                writer.close()
            except OSError:  # a full disk: the error already on its way out (if any) is the one to report
                if sys.exc_info()[1] is None:
                    raise

    if stopped:
        log(
            f"stopped at step {step} of {loop.steps} ({stopped}): checkpoint saved in "
            f"{checkpointer.directory / str(step)}; run the same command again to continue from it"
        )
        return {"stage": loop.stage, "steps": loop.steps, "stopped": stopped, "stopped_at": step}
    final_model = _merge(graphdef, state)
    final_loss = results["last_train"].get("loss")
    params_ok = finite_params(state)
    if not params_ok or (final_loss is not None and not np.isfinite(final_loss)):
        raise TrainingDiverged(
            f"the run ended with a non-finite {'loss' if params_ok else 'parameters'} "
            f"(last logged loss {final_loss}): nothing exported and no summary.json written; lower "
            "optimizer.lr or set optimizer.clip_norm"
        )
    summary = {
        "stage": loop.stage,
        "steps": loop.steps,
        "updates": int(jax.device_get(state.step)),
        "resumed_from": latest,
        "tokens_seen": counters["tokens_seen"],
        "train_seconds": counters["train_seconds"],
        "compile_seconds": compile_s,
        "skipped_steps": nonfinite.skipped,
        "rollbacks": rollbacks,
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
