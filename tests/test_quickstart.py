"""`make quickstart`'s script runs end to end on the configured defaults and checks its own results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/quickstart.py",
            "--config",
            "configs/quickstart.py",
            f"--config.run_dir={tmp_path / 'run'}",
            "--config.model.preset=gemma2-tiny",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cached == uncached: True" in proc.stdout
    assert "max |logit difference| = 0.0e+00" in proc.stdout
    assert (tmp_path / "run" / "hf_export" / "model.safetensors").exists()


def test_quickstart_reports_config_errors_without_a_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/quickstart.py",
            "--config",
            "configs/quickstart.py",
            "--config.model.preset=lama-tiny",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "model.preset" in proc.stderr and "llama-tiny" in proc.stderr and "Traceback" not in proc.stderr
