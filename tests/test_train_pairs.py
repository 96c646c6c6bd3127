"""Stages rm, dpo, kto, orpo and simpo through the real command: synthetic pairs and labelled completions and
the LLaMA-Factory demo files, metrics, held-out evaluation, precomputed reference log-probs, exports (the
reward model loads in the reward layer), wrong data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxrl_llm.train import __main__ as train_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tests" / "data" / "llamafactory"

TINY = [
    "--config.model.preset=llama-tiny",
    "--config.tokenizer.train_vocab_size=128",
    "--config.data.path=synthetic:arithmetic_pref?n=120&digits=2",
    "--config.data.eval_split=0.1",
    "--config.render.template=chatml",
    "--config.optimizer.lr=3e-3",
    "--config.optimizer.warmup_steps=1",
    "--config.train.steps=4",
    "--config.train.batch_size=4",
    "--config.train.seq_len=64",
    "--config.train.log_every=2",
    "--config.train.eval_every=4",
    "--config.train.save_every=4",
]


KTO_DATA = "--config.data.path=synthetic:arithmetic_kto?n=120&digits=2"


def train(run_dir: Path, stage: str, *overrides: str) -> int:
    data = [KTO_DATA] if stage == "kto" else []
    return train_main.main(
        [*TINY, *data, f"--config.stage={stage}", f"--config.run_dir={run_dir}", *overrides]
    )


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def shared_args(stage: str) -> tuple[str, ...]:
    """What the shared runs below add to TINY: held-out metrics before the first step too, and (dpo, kto)
    beta 0.5. A test that compares another run with a shared one starts from the same arguments."""
    beta = ("--config.pref.beta=0.5",) if stage in ("dpo", "kto") else ()
    return ("--config.train.eval_at_start=true", *beta)


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """``stage_run(stage)``: the run directory of ``stage`` trained once on the synthetic data (TINY, with
    ``shared_args``); the tests of this module read the same run rather than train again."""
    root = tmp_path_factory.mktemp("stages")
    done: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in done:
            run_dir = root / stage
            assert train(run_dir, stage, *shared_args(stage)) == 0
            done[stage] = run_dir
        return done[stage]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto", "simpo", "orpo", "rm"])
def test_each_stage_trains_on_synthetic_pairs_and_reports_pair_metrics(stage_run, stage):
    run_dir = stage_run(stage)
    result = summary(run_dir)
    assert result["steps"] == 4
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert np.isfinite(result["final_train"][key]), key
        assert np.isfinite(result["final_eval"][key]), key  # held-out pairs
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in line for line in lines)
    assert (run_dir / "final" / "config.json").exists()


@pytest.mark.slow
def test_dpo_starts_from_the_reference_and_moves_away(stage_run):
    result = summary(stage_run("dpo"))
    first = result["first_eval"]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before training
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-5)  # -log sigmoid(0)
    assert result["final_eval"]["rewards/chosen"] != 0.0


@pytest.mark.slow
def test_reward_model_export_scores_in_the_reward_layer(stage_run):
    from jaxrl_llm.reward import RewardModel

    run_dir = stage_run("rm")
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    scorer = RewardModel.load(str(run_dir), template="chatml")
    scores = scorer.score_records(
        [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}]}] * 2, ["4", "5"]
    )
    assert scores.shape == (2,) and np.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])  # orpo and simpo read dpo's pairs the same way
def test_two_steps_on_the_llamafactory_demo_files(tmp_path, stage):
    data = (
        [f"--config.data.path={DEMO / 'kto_en_demo.json'}"]
        if stage == "kto"
        else [
            f"--config.data.path={DEMO / 'dpo_en_demo.json'}",
            "--config.data.format=sharegpt",
            "--config.data.kind=preference",
        ]
    )
    assert (
        train(
            tmp_path / stage,
            stage,
            *data,
            "--config.data.eval_split=0.0",
            "--config.tokenizer.train_vocab_size=300",
            "--config.train.steps=2",
            "--config.train.seq_len=256",
            "--config.data.max_tokens=256",
        )
        == 0
    )
    assert summary(tmp_path / stage)["steps"] == 2


def test_conversations_are_refused_with_the_stage_that_fits(tmp_path, capsys):
    code = train(tmp_path / "x", "dpo", "--config.data.path=synthetic:arithmetic?n=40")
    assert code != 0
    assert "stage='dpo' trains on preference records" in capsys.readouterr().err
    code = train(tmp_path / "y", "dpo", KTO_DATA)
    assert code != 0
    assert "labelled completions train with stage=kto" in capsys.readouterr().err
    code = train(tmp_path / "z", "kto", "--config.data.path=synthetic:arithmetic_pref?n=40")
    assert code != 0
    err = capsys.readouterr().err
    assert "preference pairs train with stage=rm, stage=dpo, stage=orpo, stage=simpo" in err


@pytest.mark.slow
def test_kto_starts_at_the_reference(stage_run):
    first = summary(stage_run("kto"))["first_eval"]
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigmoid(0): policy == reference, z = 0
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["count/desirable"] + first["count/undesirable"] == first["examples"] == 12


@pytest.mark.slow
def test_precomputed_reference_log_probs_train_as_the_live_reference(stage_run, tmp_path, capsys):
    live = summary(stage_run("dpo"))
    capsys.readouterr()
    assert train(tmp_path / "pre", "dpo", *shared_args("dpo"), "--config.pref.precompute_ref=true") == 0
    out = capsys.readouterr()
    assert "reference log-probs precomputed for 120 records" in out.out + out.err
    pre = summary(tmp_path / "pre")
    for part in ("first_eval", "final_eval", "final_train"):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
            assert pre[part][key] == pytest.approx(live[part][key], rel=1e-4, abs=1e-5), (part, key)


@pytest.mark.slow
def test_sigint_stops_a_dpo_run_cleanly_and_it_resumes_bit_for_bit(stage_run, tmp_path, monkeypatch, capsys):
    import signal

    from jaxrl_llm.train import iteration
    from tests.fault_worker import checkpoints, signal_at_call

    whole = stage_run("dpo")
    run_dir = tmp_path / "ctrl-c"
    signal_at_call(monkeypatch, iteration, 2, signal.SIGINT)  # Ctrl-C during step 2 of 4
    assert train(run_dir, "dpo", *shared_args("dpo")) == 0
    out = capsys.readouterr()
    assert "SIGINT: stopping after this step" in out.err and "Traceback" not in out.err
    assert "stopped at step 2 of 4 (SIGINT)" in out.out and "run the same command again" in out.out
    assert checkpoints(run_dir) == [2] and not (run_dir / "summary.json").exists()

    monkeypatch.undo()
    assert train(run_dir, "dpo", *shared_args("dpo")) == 0
    assert summary(run_dir)["resumed_from"] == 2
    assert summary(run_dir)["params_sha256"] == summary(whole)["params_sha256"]
