"""`make quickstart`'s script runs end to end on the configured defaults and checks its own results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/quickstart.py", "--config", "configs/quickstart.py", *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--config.model.preset=gemma2-tiny"],
        ["--config.model.scan_layers=true", "--config.model.dtype=bfloat16", "--config.model.remat=full"],
    ],
)
def test_quickstart_script_runs(tmp_path, overrides):
    proc = _quickstart(f"--config.run_dir={tmp_path / 'run'}", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "--config.model.dtype=bfloat16" not in overrides:
        assert "cached == uncached for 16/16 tokens" in proc.stdout
    assert "max |logit difference| = 0.0e+00" in proc.stdout
    assert (tmp_path / "run" / "hf_export" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.preset=lama-tiny", "did you mean 'llama-tiny'"),
        ("--config.parallel.tensor=3", "mesh axes (data=-1, fsdp=1, tensor=3)"),
    ],
)
def test_quickstart_reports_user_errors_without_a_traceback(tmp_path, override, message):
    proc = _quickstart(f"--config.run_dir={tmp_path}", override)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
