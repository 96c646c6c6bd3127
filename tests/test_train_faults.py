"""Preemption and faults: SIGTERM/SIGINT save and exit 0 (SIGINT on DPO and a kill in the middle of a
checkpoint write on GRPO are in tests/test_train_pairs.py and tests/test_train_rl.py, beside the runs they
compare with), a wall-clock budget, non-finite steps (skipped, then stop or roll back), a run that diverges, and resuming with
changed or damaged checkpoints. Every interrupted run is compared bit for bit with an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxrl_llm.train import iteration, loop, stages

from . import test_train_loop as sft
from .fault_worker import checkpoints, run_worker, signal_at_call


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def sft_run(tiny_sft_run) -> Path:
    """The uninterrupted tiny SFT run (tests/conftest.py, shared with tests/test_train_loop.py)."""
    return tiny_sft_run


# --- signals and the wall-clock budget ---------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_the_resumed_run_is_identical(
    sft_run, tmp_path, monkeypatch
):
    run_dir = tmp_path / "sigterm"
    signal_at_call(monkeypatch, iteration, 5, signal.SIGTERM)  # during step 5 (of 6; saves at 3 and 6)
    assert sft.train(run_dir) == 0
    assert checkpoints(run_dir) == [3, 5]  # the step reached, saved although 5 is not a save step
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone again

    monkeypatch.undo()
    assert sft.train(run_dir) == 0
    resumed = summary(run_dir)
    assert resumed["resumed_from"] == 5
    assert resumed["params_sha256"] == summary(sft_run)["params_sha256"]
    assert resumed["tokens_seen"] == summary(sft_run)["tokens_seen"]


def test_max_hours_stops_like_a_signal(tmp_path, capsys):
    run_dir = tmp_path / "budget"
    assert sft.train(run_dir, "--config.train.max_hours=1e-9", "--config.train.eval_generate=0") == 0
    assert "stopped at step 1 of 6 (train.max_hours=1e-09 reached)" in capsys.readouterr().out
    assert checkpoints(run_dir) == [1] and not (run_dir / "summary.json").exists()


def test_a_signal_before_the_first_step_stops_without_a_traceback(tmp_path, monkeypatch, capsys):
    from jaxrl_llm.train import setup

    real = setup.start_stage

    def interrupted_setup(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(setup, "start_stage", interrupted_setup)
    assert sft.train(tmp_path / "early") == 128 + signal.SIGINT
    assert "SIGINT before the first training step: stopped, nothing to save" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_signal_exits_at_once_keeping_the_last_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "twice"
    done = run_worker("two-signals", 4, *sft.TINY, f"--config.run_dir={run_dir}")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "SIGTERM again: exiting now without saving" in done.stderr
    # Nothing of step 4 was saved; step 3's asynchronous save is complete or was never finished (never
    # half-listed: the next run resumes from it or starts over).
    assert checkpoints(run_dir) in ([], [3])


# --- non-finite steps ---------------------------------------------------------------------------------

POISON = 127  # token id the poisoned batches start with (the tiny tokenizer's last id)


def poison(monkeypatch, calls: set[int]) -> None:
    """Batches number ``calls`` (1-based) start with ``POISON``, and the SFT loss of such a batch is NaN."""
    real_to_device, seen = iteration.to_device, {"n": 0}

    def to_device(batch, mesh):
        seen["n"] += 1
        if seen["n"] in calls:
            batch = {**batch, "tokens": batch["tokens"].copy()}
            batch["tokens"][0, 0] = POISON
        return real_to_device(batch, mesh)

    row = stages.STAGES["sft"]

    def objective(cfg):
        base = row.objective(cfg)

        def loss(model, batch, rng, frozen):
            total, sums = base.loss(model, batch, rng, frozen)
            bad = jnp.where(batch["tokens"][0, 0] == POISON, jnp.nan, 1.0)
            return total * bad, {**sums, "nll": sums["nll"] * bad}

        return dataclasses.replace(base, loss=loss)

    monkeypatch.setattr(iteration, "to_device", to_device)
    monkeypatch.setitem(stages.STAGES, "sft", dataclasses.replace(row, objective=objective))


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_a_report(sft_run, tmp_path, monkeypatch, capsys):
    assert summary(sft_run)["skipped_steps"] == 0
    run_dir = tmp_path / "nan"
    poison(monkeypatch, {4, 5})
    assert sft.train(run_dir, "--config.train.nonfinite_max_consecutive=2") == 2
    err = capsys.readouterr().err
    assert "training stopped at step 6: 2 steps in a row (from step 4) had a non-finite loss" in err
    assert "Nothing was exported; the last checkpoint is step 3" in err
    assert not (run_dir / "final").exists() and not (run_dir / "summary.json").exists()
    assert checkpoints(run_dir) == [3]


def test_one_nonfinite_step_is_skipped_and_counted(sft_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "one"
    poison(monkeypatch, {2})
    assert sft.train(run_dir) == 0
    done = summary(run_dir)
    assert done["skipped_steps"] == 1
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {x["step"]: x for x in lines if x["split"] == "train"}
    assert train[2]["skipped_steps"] == 1 and train[4]["skipped_steps"] == 0
    assert all(jnp.isfinite(x["loss"]) for x in train.values())  # the skipped step's NaN is not averaged in


@pytest.mark.slow
def test_nonfinite_steps_roll_back_to_the_last_checkpoint_with_a_lower_learning_rate(
    tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "rollback"
    poison(monkeypatch, {4, 5})  # steps 4 and 5; after the rollback the same steps are clean
    args = ("--config.train.nonfinite_max_consecutive=2", "--config.train.nonfinite_action=rollback")
    assert sft.train(run_dir, *args) == 0
    out = capsys.readouterr().out
    assert "rolled back to the checkpoint of step 3, learning rate x0.5 (rollback 1 of at most 3)" in out
    done = summary(run_dir)
    reason = "2 non-finite steps in a row (from step 4)"
    assert done["rollbacks"] == [{"at_step": 6, "to_step": 3, "lr_scale": 0.5, "reason": reason}]
    assert done["skipped_steps"] == 2 and (run_dir / "final" / "config.json").exists()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == [2, 4, 6]  # the rolled-back steps' lines are replaced
    assert train[-1]["learning_rate"] > 0


def test_a_diverging_learning_rate_fails_instead_of_exporting_nan(tmp_path, capsys):
    run_dir = tmp_path / "diverged"
    code = sft.train(
        run_dir,
        "--config.optimizer.lr=1e5",
        "--config.optimizer.clip_norm=none",
        "--config.train.nonfinite_max_consecutive=2",
        "--config.train.eval_generate=0",
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "Nothing was exported" in err or "not finite" in err
    assert not (run_dir / "final").exists() and not (run_dir / "summary.json").exists()


# --- resuming with a changed or damaged run directory ------------------------------------------------


def unfinished_copy(sft_run: Path, dest: Path, *, drop: tuple[int, ...] = (6,)) -> Path:
    shutil.copytree(sft_run, dest)
    (dest / "summary.json").unlink()
    shutil.rmtree(dest / "final")
    for step in drop:
        shutil.rmtree(dest / "checkpoints" / str(step))
    return dest


def test_a_changed_model_shape_is_one_clear_error(sft_run, tmp_path, capsys):
    run_dir = unfinished_copy(sft_run, tmp_path / "shape")
    assert sft.train(run_dir, "--config.model.intermediate_size=96") == 2
    err = capsys.readouterr().err
    assert "does not fit this run's model and optimizer" in err and "arrays differ" in err
    assert "mlp" in err and "Exception ignored" not in err and "Traceback" not in err
    assert len(err.splitlines()) <= 3


def test_a_changed_learning_rate_is_named_and_allowed(sft_run, tmp_path, capsys):
    run_dir = unfinished_copy(sft_run, tmp_path / "lr")
    assert sft.train(run_dir, "--config.optimizer.lr=1e-3") == 0
    out = capsys.readouterr().out
    assert "resuming with changed settings" in out and "optimizer.lr: 0.003 -> 0.001" in out
    assert summary(run_dir)["resumed_from"] == 3


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(sft_run, tmp_path, capsys):
    run_dir = unfinished_copy(sft_run, tmp_path / "damaged", drop=())
    for f in (run_dir / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")  # truncated array data
    assert sft.train(run_dir) == 0
    out = capsys.readouterr().out
    assert "checkpoints/6 cannot be read" in out and "falling back to the checkpoint of step 3" in out
    assert summary(run_dir)["resumed_from"] == 3
    assert summary(run_dir)["params_sha256"] == summary(sft_run)["params_sha256"]


def test_resume_from_an_earlier_step_keeps_the_later_checkpoints_aside(sft_run, tmp_path, capsys):
    run_dir = unfinished_copy(sft_run, tmp_path / "earlier", drop=())
    assert sft.train(run_dir, "--config.train.resume_from_step=3") == 0
    assert summary(run_dir)["resumed_from"] == 3
    assert summary(run_dir)["params_sha256"] == summary(sft_run)["params_sha256"]
    assert (run_dir / "checkpoints_after_3" / "6").is_dir()
    assert sft.train(run_dir, "--config.train.resume_from_step=5") == 2
    assert "holds no complete checkpoint of that step (it holds [3, 6])" in capsys.readouterr().err


# --- the progress bar and the truncation warning -----------------------------------------------------


def test_the_progress_bar_keeps_the_last_loss_between_log_steps(tmp_path, monkeypatch):
    shown = []

    class Recorder:
        def __init__(self, *a, **k):
            pass

        def update(self, step, **values):
            shown.append((step, values.get("loss")))

        def close(self):
            pass

    monkeypatch.setattr(loop, "Progress", Recorder)
    assert sft.train(tmp_path / "bar", "--config.train.eval_generate=0") == 0
    assert [step for step, loss in shown if loss is None] == [1]  # only before the first log (step 2)
    assert dict(shown)[3] == dict(shown)[2]


def test_the_truncation_warning_counts_the_steps_that_ran(tmp_path, capsys):
    args = ("--config.train.seq_len=8", "--config.train.steps=3", "--config.train.log_every=50")
    assert sft.train(tmp_path / "cut", *args, "--config.train.eval_generate=0") == 0
    assert "were cut at train.seq_len=8 in the last 3 steps" in capsys.readouterr().out


# --- train.epochs -------------------------------------------------------------------------------------


def test_epochs_set_the_steps_from_one_pass_over_the_data(tmp_path, capsys):
    import math
    import re

    run_dir = tmp_path / "epochs"
    args = ("--config.train.epochs=0.25", "--config.train.eval_generate=0", "--config.train.eval_every=100")
    assert sft.train(run_dir, *args) == 0
    out = capsys.readouterr().out
    per_epoch, steps = map(int, re.search(r"one epoch is (\d+) steps, so train.steps=(\d+)", out).groups())
    # 216 training conversations packed into rows of 64 tokens (1 to 3 a row), 4 rows a step.
    assert 216 / 4 / 3 <= per_epoch <= 216 / 4 and steps == math.ceil(0.25 * per_epoch)
    assert summary(run_dir)["steps"] == steps
    assert json.loads((run_dir / "train_config.json").read_text())["train"]["steps"] == steps


def test_rl_epochs_count_iterations_of_prompts(tmp_path, capsys):
    from jaxrl_llm.train import grpo

    class Cfg:
        class rl:  # noqa: N801
            prompts_per_iteration = 4

    assert grpo.epoch_steps(Cfg, [{}] * 180) == 45 and grpo.epoch_steps(Cfg, [{}] * 3) == 1
