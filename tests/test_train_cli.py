"""``python -m jaxrl_llm.train``: user errors exit non-zero with a message, never a traceback."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from jaxrl_llm.config import FIELDS
from jaxrl_llm.train import __main__ as train_main
from jaxrl_llm.train import stages

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart.py"


def _run(*args: str, module: str = "jaxrl_llm.train") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_bad_value_exits_2_naming_key_and_value():
    out = _run("--config", QUICKSTART, "--config.optimizer.lr=abc")
    assert out.returncode == 2, out.stderr
    assert "configuration error" in out.stderr
    assert "optimizer.lr" in out.stderr and "'abc'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_key_exits_2_with_suggestion():
    out = _run("--config", QUICKSTART, "--config.optimizer.lrr=0.1")
    assert out.returncode == 2
    assert "optimizer.lrr" in out.stderr and "did you mean optimizer.lr?" in out.stderr
    assert "Traceback" not in out.stderr


def test_valid_run_prints_config_before_running_the_stage():
    out = _run(
        "--config",
        QUICKSTART,
        "--config.train.steps=70",
        "--config.stage",
        "grpo",
        "--config.data.path=",
        '--config.reward.functions=[{"name": "math_verify"}]',
    )
    assert out.returncode == 2, out.stderr
    assert "train.steps" in out.stdout and "= 70" in out.stdout
    assert "run_dir" in out.stdout and "runs/quickstart" in out.stdout
    assert "data.path is empty" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0(flag):
    out = _run(flag)
    assert out.returncode == 0
    assert "--config PATH" in out.stdout and "--config.KEY=VALUE" in out.stdout
    assert "python -m jaxrl_llm.config" in out.stdout


def test_config_module_lists_every_key():
    out = _run(module="jaxrl_llm.config")
    assert out.returncode == 0
    for field in FIELDS:
        assert field.key in out.stdout


def test_main_in_process_reports_a_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    assert train_main.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "syntax error" in err


def test_main_routes_to_a_registered_stage(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(stages, "run_stage", lambda cfg: seen.append(cfg.train.steps) or 0)
    assert train_main.main(["--config", str(REPO / QUICKSTART), "--config.train.steps=80"]) == 0
    assert seen == [80]
    capsys.readouterr()
