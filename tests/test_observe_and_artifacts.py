"""Metric writer, progress bar, MFU/peak table, and run-directory artifacts."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.checkpoint import run_info
from jaxrl_llm.checkpoint.run_info import (
    package_versions,
    params_digest,
    write_run_info,
    write_summary,
)
from jaxrl_llm.observe.metrics import MetricWriter, Progress, mfu, peak_flops


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_metric_writer_tensorboard_and_jsonl_agree(tmp_path):
    losses = {1: 2.5, 2: jnp.float32(1.75), 3: np.float64(1.25)}
    with MetricWriter(tmp_path) as writer:
        for step, loss in losses.items():
            writer.write(step, {"loss": loss, "tokens": jnp.int32(step * 100)})
        writer.write(3, {"loss": 0.5}, prefix="eval")
        writer.write_text(3, "samples/0", "hello **world**")

    assert _scalars(tmp_path, "train/loss") == [(1, 2.5), (2, 1.75), (3, 1.25)]
    assert _scalars(tmp_path, "eval/loss") == [(3, 0.5)]
    assert [v for _, v in _scalars(tmp_path, "train/tokens")] == [100, 200, 300]

    lines = _jsonl(tmp_path / "metrics.jsonl")
    train = [line for line in lines if line["split"] == "train"]
    assert [(line["step"], line["loss"]) for line in train] == [(1, 2.5), (2, 1.75), (3, 1.25)]
    assert all(type(line["loss"]) is float and type(line["tokens"]) is int for line in train)
    assert all(isinstance(line["time"], float) for line in lines)
    assert [line for line in lines if line["split"] == "eval"][0]["loss"] == 0.5
    assert lines[-1] == {**lines[-1], "split": "text", "tag": "samples/0", "text": "hello **world**"}


def test_metric_writer_appends_on_reopen(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": 1.0})
    with MetricWriter(tmp_path) as writer:
        writer.write(2, {"loss": 0.5})
    assert [line["step"] for line in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_disabled_writer_and_progress_create_nothing(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    writer = MetricWriter(log_dir, enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.write_text(1, "t", "x")
    writer.flush()
    writer.close()
    assert not log_dir.exists()

    progress = Progress(total=10, enabled=False)
    progress.update(5, loss=1.0, tokens_per_s=1000.0)
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_non_finite_values_keep_json_valid(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": float("nan"), "grad_norm": jnp.float32(jnp.inf), "lo": -np.inf, "ok": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    line = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert (line["loss"], line["grad_norm"], line["lo"], line["ok"]) == ("nan", "inf", "-inf", 1.0)
    assert math.isnan(_scalars(tmp_path, "train/loss")[0][1])


def test_reserved_metric_names_are_rejected(tmp_path):
    with MetricWriter(tmp_path) as writer, pytest.raises(ValueError, match="reserved"):
        writer.write(1, {"step": 3})


def test_progress_updates_to_step(capsys):
    progress = Progress(total=10, initial=2, mininterval=0)
    progress.update(4, loss=jnp.float32(1.5), tokens_per_s=12345.6, lr=1e-4)
    assert progress._bar.n == 4
    progress.update(10, loss=0.25)
    progress.close()
    err = capsys.readouterr().err
    assert "loss=0.25" in err and "tok/s=12,346" in err and "10/10" in err


def test_mfu():
    assert mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    assert mfu(3e15, 2.0, 989e12 * 8) == pytest.approx(3e15 / 2 / (989e12 * 8))
    assert mfu(1e12, 0.5, None) is None
    assert mfu(1e12, 0.0, 1e12) is None


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 495e12),
        ("nvidia h200", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "fp32", 156e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5e", "bf16", 197e12),
        ("TPU v5", "bf16", 459e12),
        ("TPU v5p", "bf16", 459e12),
        ("TPU v6 lite", "bf16", 918e12),
        ("TPU v4", "float32", 275e12 / 3),
        ("cpu", "float32", None),
        ("cpu", "bfloat16", None),
        ("Some Future Chip", "bf16", None),
        ("NVIDIA H100 80GB HBM3", "int8", None),
    ],
)
def test_peak_flops_table(kind, dtype, expected):
    got = peak_flops(kind, dtype)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_peak_flops_accepts_dtype_objects():
    assert peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", np.dtype("float32")) == 495e12


def _params():
    return {
        "embed": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
        "layers": [{"w": jnp.ones((2, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}],
    }


def test_params_digest_deterministic_and_sensitive():
    base = params_digest(_params())
    assert base == params_digest(_params())
    assert len(base) == 64

    changed = _params()
    changed["embed"] = changed["embed"].at[2, 3].add(1e-6)
    assert params_digest(changed) != base

    cast = _params()
    cast["layers"][0]["b"] = cast["layers"][0]["b"].astype(jnp.bfloat16)
    assert params_digest(cast) != base

    reshaped = _params()
    reshaped["embed"] = reshaped["embed"].reshape(4, 3)
    assert params_digest(reshaped) != base

    # Dict insertion order does not matter; key paths do.
    reordered = {"layers": _params()["layers"], "embed": _params()["embed"]}
    assert params_digest(reordered) == base
    renamed = {"embedding": _params()["embed"], "layers": _params()["layers"]}
    assert params_digest(renamed) != base


def test_package_versions():
    versions = package_versions()
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "tensorboardX", "python"):
        assert versions[name]
    assert versions["jax"] == jax.__version__


def test_git_commit_never_raises(tmp_path):
    assert run_info.git_commit(tmp_path) is None  # not a checkout
    commit = run_info.git_commit()
    assert commit is None or len(commit.removesuffix("-dirty")) == 40


def test_write_run_info_and_resume_naming(tmp_path):
    mesh = jax.make_mesh((1,), ("data",))
    config = {"stage": "sft", "optimizer": {"lr": 1e-4, "betas": (0.9, 0.95)}, "seed": 7}
    tok = {"name": "tiny", "vocab_size": 64, "sha256": "ab" * 32}
    manifests = {"train": {"hash": "cafe", "records": 10}}

    path = write_run_info(
        tmp_path,
        config_dict=config,
        seed=7,
        mesh=mesh,
        tokenizer_identity=tok,
        data_manifests=manifests,
        extra={"stage": "sft"},
    )
    assert path == tmp_path / "run_info.json"
    info = json.loads(path.read_text())
    assert info["seed"] == 7
    assert info["tokenizer"] == tok
    assert info["data_manifests"] == manifests
    assert info["stage"] == "sft"
    assert info["versions"]["jax"] == jax.__version__ and "python" in info["versions"]
    assert info["devices"]["mesh"] == {"data": 1}
    assert info["devices"]["device_count"] == jax.device_count()
    assert info["devices"]["process_index"] == 0
    assert isinstance(info["command"], list) and info["started_at"]
    assert info["config_file"] == "train_config.json"
    config_text = (tmp_path / "train_config.json").read_text()
    assert json.loads(config_text) == {
        "optimizer": {"betas": [0.9, 0.95], "lr": 1e-4},
        "seed": 7,
        "stage": "sft",
    }
    assert config_text.index('"optimizer"') < config_text.index('"seed"') < config_text.index('"stage"')

    # Resume with the same config: a new run_info, train_config.json untouched and not duplicated.
    first = path.read_text()
    resumed = write_run_info(tmp_path, config_dict=config, seed=7, mesh=mesh, tokenizer_identity=tok)
    assert resumed == tmp_path / "run_info.resume-1.json"
    assert path.read_text() == first
    assert json.loads(resumed.read_text())["config_file"] == "train_config.json"
    assert not (tmp_path / "train_config.resume-1.json").exists()

    # Resume with a changed config: the snapshot goes next to it with the same number.
    changed = {**config, "optimizer": {"lr": 5e-5}}
    resumed2 = write_run_info(tmp_path, config_dict=changed, seed=7, mesh=mesh, tokenizer_identity=tok)
    assert resumed2 == tmp_path / "run_info.resume-2.json"
    assert json.loads((tmp_path / "train_config.resume-2.json").read_text())["optimizer"] == {"lr": 5e-5}
    assert json.loads((tmp_path / "train_config.json").read_text()) == json.loads(config_text)
    assert json.loads(resumed2.read_text())["config_file"] == "train_config.resume-2.json"
    assert not list(tmp_path.glob(".*tmp*"))


def test_write_run_info_rejects_clashing_extra(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        write_run_info(tmp_path, config_dict={}, seed=0, mesh=None, tokenizer_identity={}, extra={"seed": 1})


def test_non_zero_process_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    out = tmp_path / "run"
    path = write_run_info(out, config_dict={"a": 1}, seed=0, mesh=None, tokenizer_identity={})
    assert path == out / "run_info.json"
    assert write_summary(out, {"loss": 1.0}) == out / "summary.json"
    assert not out.exists()


def test_write_summary_converts_numpy_and_jax_scalars(tmp_path):
    summary = {
        "final_loss": np.float32(0.5),
        "steps": np.int64(100),
        "tokens": jnp.int32(4096),
        "best": jnp.float32(0.25),
        "nan_metric": np.float64("nan"),
        "converged": np.bool_(True),
        "per_task": {"math": np.float16(0.75)},
        "hist": np.array([1, 2, 3]),
    }
    path = write_summary(tmp_path, summary)
    assert path == tmp_path / "summary.json"
    loaded = json.loads(path.read_text())
    assert loaded == {
        "final_loss": 0.5,
        "steps": 100,
        "tokens": 4096,
        "best": 0.25,
        "nan_metric": "nan",
        "converged": True,
        "per_task": {"math": 0.75},
        "hist": [1, 2, 3],
    }
    assert type(loaded["steps"]) is int
