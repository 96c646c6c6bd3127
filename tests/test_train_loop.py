"""The training spine end to end through ``python -m jaxrl_llm.train`` (in process): run directory
artifacts, TensorBoard events, checkpoints with exact resume after a crash, fine-tuning from a previous
run, continued pre-training, bucketed batches, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import load_hf
from jaxrl_llm.train import __main__ as train_main
from jaxrl_llm.train import iteration

TINY = [
    "--config.stage=sft",
    "--config.model.preset=llama-tiny",
    "--config.tokenizer.train_vocab_size=128",
    "--config.data.path=synthetic:arithmetic?n=240&digits=2",
    "--config.data.eval_split=0.1",
    "--config.render.template=chatml",
    "--config.optimizer.lr=3e-3",
    "--config.optimizer.warmup_steps=2",
    "--config.train.steps=6",
    "--config.train.batch_size=4",
    "--config.train.seq_len=64",
    "--config.train.log_every=2",
    "--config.train.eval_every=3",
    "--config.train.save_every=3",
    "--config.train.eval_generate=4",
    "--config.train.eval_max_new_tokens=4",
]


def train(run_dir: Path, *overrides: str) -> int:
    return train_main.main([*TINY, f"--config.run_dir={run_dir}", *overrides])


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def finished(tiny_sft_run) -> Path:
    """The finished TINY run (a session fixture in tests/conftest.py, shared with tests/test_train_faults.py)."""
    return tiny_sft_run


def test_run_directory_holds_what_reproduces_the_run(finished):
    info = json.loads((finished / "run_info.json").read_text())
    assert info["seed"] == 0
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= set(info["versions"])
    assert info["devices"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert info["tokenizer"]["template"] == "chatml" and len(info["tokenizer"]["template_sha256"]) == 64
    assert info["data_manifests"]["train"]["content_hash"]
    config = json.loads((finished / "train_config.json").read_text())
    assert config["train"]["steps"] == 6 and config["data"]["eval_split"] == 0.1
    assert (finished / "data_manifest.json").exists() and (finished / "tokenizer").is_dir()

    done = summary(finished)
    assert done["steps"] == 6 and done["resumed_from"] is None
    assert len(done["params_sha256"]) == 64
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "step_s", "mfu"} <= set(done["final_train"])
    assert {"loss", "token_accuracy", "exact_match"} <= set(done["final_eval"])


def test_final_export_is_the_trained_model(finished):
    from flax import nnx

    from jaxrl_llm.checkpoint.run_info import params_digest
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.render import load_tokenizer

    model = load_hf(finished / "final")
    assert params_digest(nnx.state(model, nnx.Param)) == summary(finished)["params_sha256"]
    assert load_tokenizer(finished / "final").vocab_size == load_tokenizer(finished / "tokenizer").vocab_size


def test_metrics_reach_tensorboard_and_the_jsonl_mirror(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "step_s", "mfu"):
        assert f"train/{name}" in tags
    assert {"eval/loss", "eval/exact_match"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [2, 4, 6]
    lines = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    mirrored = [x["loss"] for x in lines if x["split"] == "train"]
    assert mirrored == pytest.approx([e.value for e in losses], rel=1e-6)
    assert [x["step"] for x in lines if x["split"] == "eval"] == [3, 6]


@pytest.mark.slow
def test_checkpoints_are_kept_and_a_crashed_run_resumes_exactly(finished, tmp_path, monkeypatch):
    assert sorted(int(p.name) for p in (finished / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]

    run_dir = tmp_path / "crashed"
    calls = {"n": 0}
    real = iteration.to_device

    def crash_at_step_5(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated preemption")
        return real(batch, mesh)

    monkeypatch.setattr(iteration, "to_device", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(run_dir)
    monkeypatch.setattr(iteration, "to_device", real)
    assert not (run_dir / "summary.json").exists()

    assert train(run_dir) == 0  # the same command again picks up the step-3 checkpoint
    resumed = summary(run_dir)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    # Same parameters: state, RNG and the data iterator's position were all restored. Bit for bit on CPU;
    # GPU embedding gradients (scatter-add with atomics) may differ in the last bits between runs.
    if jax.default_backend() == "cpu":
        assert resumed["params_sha256"] == summary(finished)["params_sha256"]
    want, got = load_hf(finished / "final"), load_hf(run_dir / "final")
    for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(got)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    assert resumed["final_train"]["loss"] == pytest.approx(summary(finished)["final_train"]["loss"], rel=1e-6)
    # Tokens of step 3 (saved at 3, logged only at 4 by the crashed run) are counted exactly once.
    assert resumed["tokens_seen"] == summary(finished)["tokens_seen"]
    assert list(run_dir.glob("run_info.resume-*.json"))
    # What the crashed run logged after its checkpoint is replaced, not duplicated.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == [2, 4, 6]
    assert [x["step"] for x in lines if x["split"] == "eval"] == [3, 6]


def test_a_finished_run_is_not_retrained_and_resume_false_refuses(finished, capsys):
    before = (finished / "summary.json").read_text()
    assert train(finished) == 0
    assert "already finished 6 steps: nothing to do" in capsys.readouterr().out
    assert (finished / "summary.json").read_text() == before  # kept, not overwritten with empty metrics

    assert train(finished, "--config.train.resume=false") == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints (latest step 6)" in err and "train.resume" in err

    assert train(finished, "--config.train.steps=4") == 2
    assert "checkpoint at step 6, past train.steps=4" in capsys.readouterr().err


def test_resuming_with_settings_that_change_the_data_order_is_refused(finished, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "changed"
    shutil.copytree(finished, run_dir)
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "6")
    assert train(run_dir, "--config.train.batch_size=8") == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "train.batch_size: 4 in the checkpoint, 8 now" in err


def test_model_path_to_an_unfinished_run_says_so(finished, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "unfinished"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "final")
    args = [a for a in TINY if "train_vocab_size" not in a and "model.preset" not in a]
    assert (
        train_main.main([*args, f"--config.model.path={run_dir}", f"--config.run_dir={tmp_path / 'x'}"]) == 2
    )
    assert "a training run's directory without a final HF export" in capsys.readouterr().err


def test_fine_tune_from_a_previous_run(finished, tmp_path):
    run_dir = tmp_path / "ft"
    code = train_main.main(
        [
            *[a for a in TINY if "train_vocab_size" not in a and "model.preset" not in a],
            f"--config.model.path={finished}",
            "--config.train.steps=2",
            "--config.optimizer.warmup_steps=0",
            "--config.train.eval_generate=0",
            f"--config.run_dir={run_dir}",
        ]
    )
    assert code == 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["tokenizer"]["tokenizer"].endswith("final")
    assert summary(run_dir)["steps"] == 2


def test_continued_pretraining_on_raw_text(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"Line {i}: the quick brown fox jumps over {i} lazy dogs."}) + "\n"
            for i in range(40)
        )
    )
    run_dir = tmp_path / "pt"
    args = [a for a in TINY if "data.path" not in a and "eval_generate" not in a and "stage" not in a]
    assert (
        train_main.main(
            [*args, "--config.stage=pt", f"--config.data.path={data}", f"--config.run_dir={run_dir}"]
        )
        == 0
    )
    done = summary(run_dir)
    assert done["final_train"]["loss"] < done["final_train"]["loss"] + 1  # finite
    assert done["final_eval"]["token_accuracy"] >= 0


def test_bucketed_batches_train_too(tmp_path):
    run_dir = tmp_path / "bucket"
    assert (
        train(
            run_dir,
            "--config.data.packing=bucket",
            "--config.train.steps=3",
            "--config.train.eval_generate=0",
        )
        == 0
    )
    assert summary(run_dir)["steps"] == 3


def test_wrong_kind_of_data_is_a_clear_error(tmp_path, capsys):
    prefs = Path(__file__).parent / "data" / "llamafactory"
    pref_file = next(p for p in prefs.rglob("*dpo*") if p.suffix in (".json", ".jsonl"))
    code = train(
        tmp_path / "x",
        f"--config.data.path={pref_file}",
        "--config.data.format=auto",
        "--config.data.eval_split=0",
        "--config.train.eval_generate=0",
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "stage='sft' trains on conversation or text records" in err and "stage=dpo" in err


def test_no_tokenizer_is_a_clear_error(tmp_path, capsys):
    args = [a for a in TINY if "train_vocab_size" not in a]
    assert train_main.main([*args, f"--config.run_dir={tmp_path}"]) == 2
    assert "no tokenizer: set tokenizer.path" in capsys.readouterr().err


def test_generation_stops_at_the_templates_end_of_turn_even_when_eos_differs(tmp_path):
    """A base model's EOS (here <|endoftext|>) is not the ChatML turn terminator (<|im_end|>)."""
    from jaxrl_llm.render import Renderer, load_tokenizer
    from jaxrl_llm.rollout import end_of_turn_ids
    from tests.fixtures_tokenizers import make_hf_tokenizer_dir

    out = make_hf_tokenizer_dir(tmp_path)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(out)
    ids = end_of_turn_ids(Renderer(tok, "chatml"))
    assert tok.token_to_id("<|endoftext|>") in ids and tok.token_to_id("<|im_end|>") in ids
