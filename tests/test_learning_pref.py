"""Learning: each preference stage, started from a tiny SFT'd model, prefers correct arithmetic answers on
held-out problems, and its margins widen.

The start is ``tests/data/models/arith-sft`` (the quickstart's 0.85M-parameter Llama after 600 SFT steps on
two-digit additions: 96.5% held-out exact match; see its PROVENANCE.md). The preference data asks 1,000
additions (``seed=1``) with the correct answer chosen and a wrong one (the correct one plus an offset in
[-10, 10]) rejected (``synthetic:arithmetic_pref``; KTO: the same problems, half answered correctly and
labelled desirable, ``synthetic:arithmetic_kto``). Each stage runs through ``python -m jaxrl_llm.train``.

Held-out accuracy: for the pair stages the stage's own ``eval/rewards/accuracies`` on 20% held-out pairs
(DPO: implicit rewards ``beta * log(pi / pi_ref)``, chosen above rejected; SimPO/ORPO: ``beta`` times the
mean log-probs, which the SFT model already gets right for 99.5% of the pairs, so those two show that the
margins widen without losing it; RM: the scores). KTO trains on the first 800 problems and is scored the same way as DPO on
the preference pairs of the other 200, which it never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.train import __main__ as train_main

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"
PAIRS = "synthetic:arithmetic_pref?n=1000&digits=2&seed=1"
COMMON = [
    f"--config.model.path={SFT_MODEL}",
    "--config.render.template=chatml",
    "--config.train.batch_size=16",
    "--config.train.seq_len=64",
    "--config.train.log_every=50",
    "--config.train.eval_at_start=true",
    "--config.optimizer.warmup_steps=10",
    "--config.optimizer.weight_decay=0.0",
]


def _run(run_dir: Path, stage: str, steps: int, *args: str) -> dict:
    argv = ["--config", str(ROOT / "configs" / "base.py"), f"--config.run_dir={run_dir}", *COMMON]
    argv += [f"--config.stage={stage}", f"--config.train.steps={steps}", f"--config.train.eval_every={steps}"]
    argv += [f"--config.train.save_every={steps}", *args]
    assert train_main.main(argv) == 0
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, steps, args, accuracy",
    [
        ("dpo", 150, ["--config.optimizer.lr=3e-4", "--config.pref.beta=0.5"], 0.9),
        ("simpo", 60, ["--config.optimizer.lr=1e-4"], 0.9),
        ("orpo", 60, ["--config.optimizer.lr=1e-4"], 0.9),
        # The reward model learns correctness from the pairs alone (its score head starts at random), the
        # slowest of them: 0.87 after 300 steps. It learns to check the units digit, which 18 of the 20
        # offsets change: with it alone a model is right on ~95% of pairs (90% + half the +-10 ones), and
        # that is where longer runs stop (4,000 problems x 1,000 steps: 0.92-0.93; 9,800 x 3,000 steps:
        # 0.944 at steps 2,000 and 3,000, units-digit pairs 1.0, +-10 pairs ~0.6). Checking the tens digit
        # (carry included) is learnable when half the wrong answers differ there (0.97 on those in 1,000
        # steps) but not from the 10% here within what the suite can spend; lr 1e-3 is unstable.
        ("rm", 300, ["--config.optimizer.lr=3e-4"], 0.8),
    ],
)
def test_pair_stages_prefer_correct_answers_on_held_out_problems(tmp_path, stage, steps, args, accuracy):
    result = _run(
        tmp_path / stage, stage, steps, f"--config.data.path={PAIRS}", "--config.data.eval_split=0.2", *args
    )
    first, final = result["first_eval"], result["final_eval"]
    print(stage, {k: (first[k], final[k]) for k in ("rewards/accuracies", "rewards/margins", "loss")})
    assert final["pairs"] == 200
    assert final["rewards/accuracies"] > accuracy
    assert final["rewards/margins"] > first["rewards/margins"]  # the margins widen
    if stage in ("dpo", "rm"):  # simpo's and orpo's losses are near their floor from the start
        assert final["loss"] < first["loss"]


@pytest.mark.slow
def test_kto_prefers_correct_answers_on_held_out_problems(tmp_path):
    from jaxrl_llm.data.packing import pad_pair
    from jaxrl_llm.data.synthetic import arithmetic_preference_records
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.objectives import pair_logps
    from jaxrl_llm.render import PairEncoder, Renderer, load_tokenizer

    # random.sample's prefix property: the first 800 problems of n=1000 are those of n=800 (same seed).
    result = _run(
        tmp_path / "kto",
        "kto",
        300,
        "--config.data.path=synthetic:arithmetic_kto?n=800&digits=2&seed=1",
        "--config.data.eval_split=0.0",
        "--config.optimizer.lr=3e-4",
        "--config.pref.beta=0.5",
        # The paper's lambda_D n_D / (lambda_U n_U) <= 4/3: the SFT model is already sure of the correct
        # answers, so their gradients are weak and the undesirable ones', pushing the shared tokens down,
        # would drag them along (weight 1: 0.895; lr 5e-4: the desirable rewards collapse and saturate).
        "--config.pref.desirable_weight=1.33",
    )
    assert result["final_train"]["rewards/chosen"] > result["final_train"]["rewards/rejected"]
    held_out = arithmetic_preference_records(1000, digits=2, seed=1)[800:]
    encoder = PairEncoder(Renderer(load_tokenizer(SFT_MODEL), "chatml"))
    rows = [pad_pair(**encoder(r), buckets=(128,), max_side=64) for r in held_out]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    policy = np.asarray(pair_logps(load_hf(tmp_path / "kto" / "final"), batch)[0])
    rewards = policy - np.asarray(pair_logps(load_hf(SFT_MODEL), batch)[0])
    accuracy = float((rewards[:, 0] > rewards[:, 1]).mean())
    print("kto held-out accuracy", accuracy, "margin", float((rewards[:, 0] - rewards[:, 1]).mean()))
    assert accuracy > 0.9  # 0.945, margin 4.1 (from 0)
