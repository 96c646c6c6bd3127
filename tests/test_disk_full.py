"""A run directory whose disk fills up: exit 2 with one message naming the directory and "no space left",
and nothing already saved lost (the last complete checkpoint stays the latest and restores; a half-written
one stays ``<step>.orbax-checkpoint-tmp``, never a step).

The disk is a small tmpfs mounted for the test (skipped where mounting is not permitted).
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from jaxrl_llm.checkpoint import manager as ckpt_manager
from jaxrl_llm.train import __main__ as train_main
from tests.test_train_loop import TINY


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)`` -> a directory on a tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(size: str):
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:  # lazily: Orbax's threads may still hold a file open
        subprocess.run(["umount", "-l", str(where)], check=False)


def _train(run_dir, capsys):
    code = train_main.main([*TINY, f"--config.run_dir={run_dir}", "--config.train.eval_generate=0"])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_a_full_disk_at_the_second_checkpoint_keeps_the_first(small_disk, capsys):
    run_dir = small_disk("2m") / "run"  # holds the run's files and one checkpoint, not two
    code, err = _train(run_dir, capsys)
    assert code == 2
    assert "no space left on device" in err and str(run_dir) in err
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "3").is_dir() and not (checkpoints / "6").exists()
    assert "kept" in err and str(checkpoints / "3") in err
    # the half-written one is never a step, and the complete one restores
    probe = ckpt_manager.Checkpointer(run_dir)
    assert probe.latest_step() == 3 and probe.all_steps() == [3]
    probe.check_shapes(3, _state_like(run_dir))
    probe.close()


def _state_like(run_dir):
    """The saved state's own shapes (from its metadata), so check_shapes reads the whole metadata."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as reader:
        tree = reader.metadata(run_dir / "checkpoints" / "3" / "state").item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)


@pytest.mark.slow
def test_a_full_disk_at_the_first_checkpoint(small_disk, capsys):
    run_dir = small_disk("64k") / "run"  # the run's files fit, no checkpoint does
    code, err = _train(run_dir, capsys)
    assert code == 2
    assert "no space left on device" in err and str(run_dir) in err
    assert not (run_dir / "final").exists()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_full_disk_before_training(small_disk, capsys):
    run_dir = small_disk("8k") / "run"  # not even the tokenizer fits
    code, err = _train(run_dir, capsys)
    assert code == 2
    assert "no space left on device" in err.lower() and str(run_dir) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "error",
    [
        ValueError(
            'RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 13370 bytes to file 8: '
            "No space left on device [os_error_code='28']"
        ),
        OSError(28, "No space left on device"),
    ],
    ids=["orbax-wrapped", "oserror"],
)
def test_a_write_error_from_orbax_is_one_checkpoint_error(tmp_path, monkeypatch, error):
    ckpt = ckpt_manager.Checkpointer(tmp_path)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt._manager, "wait_until_finished", fail)
    with pytest.raises(ckpt_manager.CheckpointWriteError) as err:
        ckpt.wait()
    message = str(err.value)
    assert message.startswith(
        f"{tmp_path / 'checkpoints'}: no space left on device while writing a checkpoint"
    )
    assert "no checkpoint had been completed" in message
    ckpt.close()  # already reported: closing does not raise it again


def test_other_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    ckpt = ckpt_manager.Checkpointer(tmp_path)
    monkeypatch.setattr(ckpt._manager, "wait_until_finished", lambda: (_ for _ in ()).throw(KeyError("bug")))
    with pytest.raises(KeyError):
        ckpt.wait()
