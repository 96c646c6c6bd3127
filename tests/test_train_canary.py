"""The online canary: prompts answered every ``canary.every`` steps, logged as text, and rules that halt a
run whose policy breaks or roll it back to the last good checkpoint with a lower learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxrl_llm.train import __main__ as train_main
from jaxrl_llm.train.canary import Canary, CanaryConfig, CanaryError, prompt_record, read_prompts

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"  # knows two-digit sums (~96% held out)
SUMS = [(12, 35), (40, 41), (23, 54), (61, 18), (30, 27), (52, 16)]
PROMPTS = json.dumps([{"prompt": f"What is {a} + {b}?", "ground_truth": str(a + b)} for a, b in SUMS])
RUN = [
    "--config.stage=sft",
    f"--config.model.path={SFT_MODEL}",
    "--config.render.template=chatml",
    "--config.data.path=synthetic:arithmetic?n=120&digits=2&seed=5",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.clip_norm=none",
    "--config.train.steps=6",
    "--config.train.batch_size=4",
    "--config.train.seq_len=64",
    "--config.train.log_every=2",
    "--config.train.eval_every=100",
    "--config.train.save_every=2",
    "--config.canary.every=2",
    f"--config.canary.prompts={PROMPTS}",
    "--config.canary.max_new_tokens=6",
    "--config.canary.min_score=0.5",
]


def train(run_dir: Path, *args: str) -> int:
    return train_main.main([*RUN, f"--config.run_dir={run_dir}", *args])


def canary_lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "canary.jsonl").read_text().splitlines()]


def test_prompts_are_strings_messages_or_records(tmp_path):
    assert prompt_record("hi", "x") == {"prompt": [{"role": "user", "content": "hi"}]}
    assert prompt_record({"prompt": "2+2?", "ground_truth": 4}, "x")["ground_truth"] == "4"
    with pytest.raises(CanaryError, match="canary.prompts\\[3\\]: expected a string"):
        prompt_record(7, "canary.prompts[3]")
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "a"}\n\nnot json\n')
    with pytest.raises(CanaryError, match="c.jsonl:3: not valid JSON"):
        read_prompts(str(path))
    with pytest.raises(CanaryError, match="no such file"):
        read_prompts(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    ("rule", "value", "metrics", "message"),
    [
        ("min_score", 0.5, {"score": 0.25}, "canary score 0.25 < canary.min_score=0.5"),
        (
            "max_drop",
            0.3,
            {"score": 0.4},
            "canary score 0.4 is 0.5 below its best 0.9 (> canary.max_drop=0.3)",
        ),
        ("max_kl", 0.1, {"kl": 0.5}, "KL to the reference 0.5 > canary.max_kl=0.1"),
        ("max_kl", 0.1, {"kl": float("nan")}, "KL to the reference nan > canary.max_kl=0.1"),
        ("min_entropy", 0.2, {"entropy": 0.01}, "canary entropy 0.01 < canary.min_entropy=0.2"),
        ("min_length", 2.0, {"length": 1.0}, "canary answer length 1 tokens < canary.min_length=2"),
    ],
)
def test_each_rule_fires_and_says_which(rule, value, metrics, message):
    canary = Canary.__new__(Canary)
    canary.cfg, canary.best = CanaryConfig(**{rule: value}), 0.9
    full = {"entropy": 1.0, "length": 5.0, **metrics}
    assert canary.judge(full) == message
    canary.cfg = CanaryConfig()
    assert canary.judge(full) is None


def test_canary_every_without_prompts_is_a_config_error(tmp_path, capsys):
    assert train_main.main([f"--config.run_dir={tmp_path}", "--config.canary.every=5"]) == 2
    assert "canary.every=5: set canary.prompts or canary.path" in capsys.readouterr().err


@pytest.mark.slow
def test_the_canary_halts_a_run_whose_policy_breaks(tmp_path, capsys):
    run_dir = tmp_path / "broken"
    assert train(run_dir, "--config.optimizer.lr=0.3") == 2  # a learning rate that wrecks the model
    err = capsys.readouterr().err
    assert "the canary halted the run at step 2: canary score 0 < canary.min_score=0.5" in err
    assert "Nothing was exported" in err and not (run_dir / "final").exists()
    lines = canary_lines(run_dir)
    assert [x["step"] for x in lines[:6]] == [0] * 6 and lines[0]["answer"] == str(sum(SUMS[0]))
    baseline = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert baseline["split"] == "canary" and baseline["score"] >= 0.8  # the model it starts from passes
    assert not (run_dir / "checkpoints" / "2").exists()  # the broken step is never saved


@pytest.mark.slow
def test_a_rollback_resumes_from_the_last_good_checkpoint_with_a_lower_learning_rate(tmp_path, capsys):
    run_dir = tmp_path / "rolled"
    args = (
        "--config.optimizer.lr=0.3",
        "--config.canary.action=rollback",
        "--config.train.rollback_lr_factor=1e-4",
        "--config.canary.max_kl=1e9",  # never fires; makes the canary keep a reference and log the KL
    )
    capsys.readouterr()
    assert train(run_dir, *args) == 0
    out = capsys.readouterr().out
    assert "canary: canary score 0 < canary.min_score=0.5: rolled back to the checkpoint of step" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    (rollback,) = summary["rollbacks"]
    assert rollback["at_step"] == 2 and rollback["lr_scale"] == pytest.approx(1e-4)
    assert rollback["reason"].startswith("canary: canary score 0")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    canary = [m for m in metrics if m["split"] == "canary"]
    assert canary[0]["step"] == 0 and canary[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert canary[-1]["step"] == 6 and canary[-1]["score"] >= 0.5 and canary[-1]["kl"] >= 0
    assert (run_dir / "final" / "config.json").exists()
