"""The artifact registry (``artifacts.json``) and ``python -m jaxrl_llm.runs``: two real tiny runs that
differ in one config key (``optimizer.lr``) and in the content of their one data file (the same path,
rewritten between the runs) are listed, shown, compared and exported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from flax import nnx

from jaxrl_llm.checkpoint import collect_artifacts, params_digest, registry, write_artifacts
from jaxrl_llm.data.synthetic import arithmetic_records
from jaxrl_llm.models import load_hf
from jaxrl_llm.runs.__main__ import main
from tests.test_train_loop import train

STEPS = [
    "--config.train.steps=4",
    "--config.train.save_every=1",
    "--config.train.keep_checkpoints=2",
    "--config.train.eval_every=2",
]


def _write_records(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_records(n, seed=1)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``root/a`` and ``root/b``: lr 3e-3 vs 1e-3, and ``data.jsonl`` of 240 vs 200 records."""
    root = tmp_path_factory.mktemp("runs")
    data = root.parent / f"{root.name}-data.jsonl"
    _write_records(data, 240)
    assert train(root / "a", f"--config.data.path={data}", *STEPS) == 0
    _write_records(data, 200)
    assert train(root / "b", f"--config.data.path={data}", *STEPS, "--config.optimizer.lr=1e-3") == 0
    return root


def _artifacts(run_dir: Path) -> dict:
    return json.loads((run_dir / "artifacts.json").read_text())


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_artifacts_json_records_the_run_its_checkpoints_and_its_final_model(runs):
    art, summary = _artifacts(runs / "a"), _summary(runs / "a")
    assert art["schema_version"] == 1 and art["stage"] == "sft"
    assert art["config"]["optimizer"]["lr"] == 3e-3 and len(art["config_sha256"]) == 64
    # Orbax kept the last two of four saves; the entries of the deleted ones were dropped.
    assert [c["step"] for c in art["checkpoints"]] == [3, 4]
    last = art["checkpoints"][-1]
    assert last["path"] == "checkpoints/4" and last["saved_at"]
    assert last["metrics"]["train"]["loss"] == summary["final_train"]["loss"]
    assert last["metrics"]["eval"]["loss"] == summary["final_eval"]["loss"]
    source = art["data"]["train"]["sources"][0]
    assert source["path"].endswith("data.jsonl") and len(source["sha256"]) == 64
    assert art["data"]["train"]["counts"]["accepted"] == 240
    assert len(art["tokenizer"]["files_sha256"]) == 64 and len(art["tokenizer"]["template_sha256"]) == 64
    assert art["model"] | {"source": "preset", "preset": "llama-tiny", "seed": 0} == art["model"]
    assert art["final"]["params_sha256"] == summary["params_sha256"]
    assert art["final"]["path"] == str(runs / "a" / "final")
    assert {"jax", "flax", "orbax-checkpoint"} <= set(art["versions"]) and "git_commit" in art
    assert art["devices"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}


def test_runs_diff_names_the_changed_key_and_data_file_before_the_metrics(runs, capsys):
    assert main(["diff", str(runs / "a"), str(runs / "b")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    config = lines.index("config: 1 key differs")
    assert lines[config + 1] == "  optimizer.lr: 0.003 -> 0.001"  # run_dir is not a difference
    data = lines.index("data: differs")
    assert data == config + 2
    assert any("data.jsonl: content differs" in line for line in lines[data:])
    assert "  train records accepted: 240 -> 200" in lines
    assert "tokenizer: same" in lines  # each run trained its own, in its own folder: the same files
    assert "model: same" in lines and "versions: same" in lines
    metrics = next(i for i, line in enumerate(lines) if line.startswith("metrics"))
    assert metrics > data
    loss = next(line for line in lines[metrics:] if line.strip().startswith("train loss")).split()
    a, b = _summary(runs / "a")["final_train"]["loss"], _summary(runs / "b")["final_train"]["loss"]
    assert float(loss[2]) == pytest.approx(a, rel=1e-3) and float(loss[3]) == pytest.approx(b, rel=1e-3)
    assert float(loss[4]) == pytest.approx(b - a, rel=1e-2, abs=1e-3)


def test_runs_list_and_show(runs, capsys):
    assert main(["list", str(runs)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["date", "run", "stage", "model", "steps", "loss", "eval", "data", "status"]
    assert [r.split()[2] for r in rows] == ["a", "b"]  # oldest first
    for row in rows:
        assert {"sft", "llama-tiny", "4/4", "finished"} <= set(row.split())
    assert _artifacts(runs / "a")["data"]["train"]["content_hash"][:8] in rows[0]

    assert main(["show", str(runs / "b")]) == 0
    out = capsys.readouterr().out
    assert "stage sft, finished, steps 4/4" in out and "lr 0.001" in out
    assert "  step 3 " in out and "  step 4 " in out and "data.jsonl" in out
    assert _summary(runs / "b")["params_sha256"] in out


def test_export_of_the_last_step_equals_final_and_an_earlier_one_differs(runs, tmp_path, capsys):
    run = runs / "a"
    final = _summary(run)["params_sha256"]
    assert main(["export", str(run), "--step", "4", "--out", str(tmp_path / "last")]) == 0
    assert "the same parameters as the run's final export" in capsys.readouterr().out
    assert params_digest(nnx.state(load_hf(tmp_path / "last"), nnx.Param)) == final
    assert (tmp_path / "last" / "tokenizer_config.json").exists()

    assert main(["export", str(run), "--step", "3"]) == 0  # default: RUN/export-step-3
    assert "final export" not in capsys.readouterr().out
    earlier = load_hf(run / "export-step-3")
    assert params_digest(nnx.state(earlier, nnx.Param)) != final


def test_mistakes_are_one_line_and_exit_2(runs, tmp_path, capsys):
    cases = [
        (["show", str(tmp_path / "missing")], "no such run directory"),
        (["diff", str(runs / "a"), str(tmp_path)], "not a run directory"),
        (["export", str(runs / "a"), "--step", "1"], "no checkpoint of step 1 (available: 3, 4)"),
        (["list", str(tmp_path / "missing")], "no such directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_registry_hashes_a_model_path_and_never_raises(runs, tmp_path, monkeypatch):
    child = tmp_path / "child"
    child.mkdir()
    (child / "train_config.json").write_text(json.dumps({"stage": "dpo", "model": {"path": str(runs / "a")}}))
    art = collect_artifacts(child)
    model = art["model"]
    assert model["source"] == "path" and model["path"] == str((runs / "a" / "final").resolve())
    assert set(model["files"]) == {"config.json", "model.safetensors"} and model["hash_method"] == "sha256"
    assert model["parent_params_sha256"] == _summary(runs / "a")["params_sha256"]
    monkeypatch.setattr(registry, "FULL_HASH_LIMIT", 1024)  # a large file: size + first and last MiB
    sampled = registry._model_source({"model": {"path": str(runs / "a")}}, {}, None)
    assert sampled["hash_method"].startswith("sha256-size-first-last-mib")
    assert sampled["files"]["model.safetensors"] != model["files"]["model.safetensors"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_artifacts(empty) == empty / "artifacts.json"  # nothing to read: fields empty, no error
    assert _artifacts(empty)["checkpoints"] == [] and _artifacts(empty)["final"] is None
    assert write_artifacts(tmp_path / "no" / "such" / "dir") is None  # warned, not raised


def test_status_of_unfinished_runs(runs, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(
        runs / "a", stopped, ignore=shutil.ignore_patterns("final", "summary.json", "artifacts.json")
    )
    old = 1_000_000_000
    os.utime(stopped / "metrics.jsonl", (old, old))
    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(runs / "a" / "train_config.json", failed)
    running = tmp_path / "running"
    running.mkdir()
    shutil.copy(runs / "a" / "train_config.json", running)
    (running / "metrics.jsonl").write_text(json.dumps({"step": 2, "split": "train", "loss": 1.0}) + "\n")
    assert main(["list", str(tmp_path)]) == 0
    rows = {r.split()[2]: r.split() for r in capsys.readouterr().out.splitlines()[1:]}
    assert rows["stopped"][-1] == "stopped-resumable" and rows["stopped"][5] == "4/4"
    assert rows["failed"][-1] == "failed" and rows["running"][-1] == "running?"
    assert rows["running"][5] == "2/4"
