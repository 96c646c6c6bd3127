"""Learning: GRPO and PPO, from a tiny SFT'd model, answer held-out problems it could not answer before.

This is the RL quickstart itself: ``configs/quickstart_grpo.py`` as ``make quickstart-rl`` runs it (its 40
iterations pinned here), from ``tests/data/models/arith-sft`` (the SFT quickstart's model, vendored: the
0.85M-parameter Llama after its 600 steps on two-digit additions; see its PROVENANCE.md) instead of
``runs/quickstart``, evaluating only at the start and the end. The model answers single-digit sums (``What is 3 + 4?``) right only about half the time:
they are rare in its training data (1% of two-digit problems), so its greedy answers get 49% of the 45
held-out ones, and its samples at temperature 1 about 55% of those it trains on. Rewarded by the exact
answer (``answer_match``, a device reward: every iteration one compiled program), each stage must raise
the held-out greedy exact match by 15 points (measured: GRPO 0.49 -> 0.87-0.93, PPO 0.49 -> 0.80) and its
own sampled accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxrl_llm.train import __main__ as train_main

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"
COMMON = [
    "--config",
    str(ROOT / "configs" / "quickstart_grpo.py"),
    f"--config.model.path={SFT_MODEL}",
    "--config.train.steps=40",
    "--config.train.eval_every=40",
    "--config.train.save_every=40",
]


def _run(run_dir: Path, *args: str) -> tuple[dict, list[float]]:
    assert train_main.main([*COMMON, f"--config.run_dir={run_dir}", *args]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["reward/total/mean"] for r in lines if r["split"] == "train"]
    return summary, sampled


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, args",
    [
        ("grpo", ["--config.rl.group_size=8"]),
        ("ppo", ["--config.rl.group_size=4"]),  # a critic, GAE, KL-shaped rewards
    ],
)
def test_rl_raises_held_out_exact_match(tmp_path, stage, args):
    summary, sampled = _run(tmp_path / stage, f"--config.stage={stage}", *args)
    start, end = summary["eval/exact_match_start"], summary["eval/exact_match"]
    print(stage, "held-out exact match", start, "->", end, "sampled accuracy", sampled)
    assert summary["final_eval"]["samples"] == 45
    assert end >= start + 0.15
    assert sampled[-1] > sampled[0] + 0.1
