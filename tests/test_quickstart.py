"""`make quickstart` is the README's first command: the configured run learns two-digit addition.

This is the SFT learning test. It runs ``configs/quickstart.py`` exactly as ``make quickstart`` does (only the
run directory differs) and checks that the loss falls and that greedy exact match on 200 held-out problems,
never trained on, rises from 0 to at least 60%. Chance is about 1% (a sum is one of 199 values), and
every held-out problem is new, so a model that memorised its training set without learning to add and carry
scores near 0; the run typically ends above 90%.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_learns_addition(tmp_path):
    run_dir = tmp_path / "quickstart"
    command = [
        sys.executable,
        "-m",
        "jaxrl_llm.train",
        "--config",
        "configs/quickstart.py",
        f"--config.run_dir={run_dir}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out greedy exact match:" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 600
    assert summary["first_eval"]["exact_match"] < 0.05
    assert summary["final_eval"]["exact_match"] >= 0.6, summary["final_eval"]
    assert summary["final_eval"]["samples"] == 200
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["split"] == "train"]
    assert losses[-1] < 0.25 * losses[0], losses
    # The final export is a complete HF model directory: what the RL quickstart starts from.
    assert (run_dir / "final" / "config.json").exists() and (run_dir / "final" / "tokenizer.json").exists()
