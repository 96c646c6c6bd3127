"""The benchmark command runs and reports its fields (timings are measured, never asserted)."""

from __future__ import annotations

import json
import math

import pytest

from jaxrl_llm.bench.__main__ import main
from jaxrl_llm.bench.forward import forward_flops
from jaxrl_llm.bench.rollout import cache_slots
from jaxrl_llm.bench.train import bench_train
from jaxrl_llm.errors import UserError
from jaxrl_llm.models import get_preset
from jaxrl_llm.models.cache import KVCache


def test_forward_flops_by_hand():
    cfg = get_preset("llama-tiny")  # E=64, H=4, KV=2, D=16, M=128, V=256, L=2
    per_layer = 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128
    per_token = 2 * (2 * per_layer + 64 * 256) + 4 * 2 * 4 * 16 * 10
    assert forward_flops(cfg, batch=3, seq_len=10) == 3 * 10 * per_token


def test_forward_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "forward.json"
    assert (
        main(
            [
                "forward",
                "--model",
                "llama-tiny",
                "--batch",
                "2",
                "--seq-len",
                "16",
                "--repeats",
                "1",
                "--compare-hf",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for key in ("tokens_per_s", "step_s", "compile_s", "peak_fraction", "peer_tokens_per_s", "speedup"):
        assert result[key] > 0, key
    assert "tokens_per_s" in capsys.readouterr().out


def test_bad_model_is_a_message_not_a_traceback(capsys):
    assert main(["forward", "--model", "llama-tiyn"]) == 2
    assert "unknown model preset 'llama-tiyn'. Did you mean 'llama-tiny'" in capsys.readouterr().err


def test_train_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    args = ["train", "--objective", "sft", "--model", "llama-tiny", "--batch", "4", "--seq-len", "16"]
    assert main([*args, "--repeats", "1", "--accum", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("tokens_per_s", "step_s", "compile_s", "peak_fraction"):
        assert result[key] > 0, key
    assert result["grad_accum_steps"] == 2 and result["tokens_per_s"] == 4 * 16 / result["step_s"]
    assert "peak_fraction" in capsys.readouterr().out


def test_train_bench_compare_trl(tmp_path):
    out = tmp_path / "train_trl.json"
    args = ["train", "--objective", "sft", "--model", "llama-tiny", "--batch", "2", "--seq-len", "16"]
    assert main([*args, "--repeats", "1", "--compare-trl", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["peer_tokens_per_s"] > 0 and result["speedup"] > 0
    assert result["peer"].startswith("trl ")
    # Same initial weights, same rows, AdamW with the same settings: after one update the losses still agree.
    assert abs(result["peer_loss"] - result["loss"]) < 1e-3 * result["loss"], (
        result["peer_loss"],
        result["loss"],
    )


def test_rollout_bench_writes_json(tmp_path, monkeypatch):
    made = []  # the KV caches' slot counts
    init = KVCache.init.__func__
    monkeypatch.setattr(
        KVCache,
        "init",
        classmethod(lambda cls, cfg, b, n, *a, **kw: made.append(n) or init(cls, cfg, b, n, *a, **kw)),
    )
    out = tmp_path / "rollout.json"
    args = ["rollout", "--model", "llama-tiny", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4"]
    assert (
        main([*args, "--repeats", "1", "--sample", "--compare-hf", "--max-len", "40", "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    for key in (
        "tokens_per_s",
        "decode_tokens_per_s",
        "compile_s",
        "peak_fraction",
        "memory_bytes_per_s",
        "limit_tokens_per_s",
        "peer_tokens_per_s",
        "speedup",
    ):
        assert result[key] >= 0, key
    assert result["tokens_per_s"] > 0 and result["peer_tokens_per_s"] > 0
    assert result["max_len"] == 40 and set(made) == {40}  # the sampler's own would be 16 (bucket) + 4


def test_rollout_bench_refuses_a_cache_the_generation_does_not_fit():
    assert cache_slots(8, 4, max_seq_len=512) == 16 + 4  # the sampler's: the prompts' bucket + new tokens
    assert cache_slots(64, 128, max_seq_len=2048, max_len=2048) == 2048
    with pytest.raises(UserError, match=r"--max-len 19 is smaller than --prompt-len 8 \+ --new-tokens 4 "):
        cache_slots(8, 4, max_seq_len=512, max_len=19)  # 8 + 4 fit, but the prompts are left-padded to 16
    with pytest.raises(UserError, match="exceeds the model's max_seq_len 512"):
        cache_slots(8, 4, max_seq_len=512, max_len=4096)


@pytest.mark.slow
def test_serve_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "serve.json"
    args = [
        "serve",
        "--model",
        "llama-tiny",
        "--streams",
        "1,3",
        "--prompt-len",
        "8",
        "--new-tokens",
        "8",
        "--uneven",
    ]
    assert main([*args, "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["slots"] == 3
    for c in (1, 3):
        for key in ("engine_tokens_per_s", "engine_ttft_s", "sampler_tokens_per_s", "sampler_ttft_s"):
            assert result[f"{key}@{c}"] > 0, (key, c)
    assert main(["serve", "--streams", "1,x"]) == 2
    assert "--streams '1,x'" in capsys.readouterr().err


PAIR_ARGS = ["--model", "llama-tiny", "--batch", "2", "--prompt-len", "6", "--completion-len", "10"]


def test_pair_tokens_and_batch_layout():
    from jaxrl_llm.bench.train import pair_batch, pair_tokens

    sides = pair_tokens(vocab_size=256, batch=3, prompt_len=4, completion_len=5)
    assert sides.shape == (3, 2, 9) and sides.min() >= 1  # 0 is the TRL peer's pad id
    assert (sides[:, 0, :4] == sides[:, 1, :4]).all()  # one prompt per pair
    assert (sides[:, 0, 4:] != sides[:, 1, 4:]).any()  # a completion per side
    b = pair_batch(sides, prompt_len=4)  # one row per pair: prompt | chosen | rejected
    assert b["tokens"].shape == b["loss_mask"].shape == b["positions"].shape == (3, 4 + 5 + 5)
    assert (b["tokens"][:, :9] == sides[:, 0]).all() and (b["tokens"][:, 9:] == sides[:, 1, 4:]).all()
    assert not b["loss_mask"][:, :4].any() and b["loss_mask"][:, 4:].all()
    assert (b["segment_ids"] == [1] * 4 + [2] * 5 + [3] * 5).all()
    assert (b["positions"] == [*range(9), *range(4, 9)]).all()
    assert b["num_truncated"].shape == (3,) and not b["num_truncated"].any()


def test_train_bench_dpo_writes_json(tmp_path, capsys):
    out = tmp_path / "dpo.json"
    assert main(["train", "--objective", "dpo", *PAIR_ARGS, "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("tokens_per_s", "step_s", "compile_s", "peak_fraction", "reference_s", "flops_per_s"):
        assert result[key] > 0, key
    assert result["reference"] == "live" and result["tokens_per_step"] == 2 * 2 * (6 + 10)
    assert result["tokens_per_s"] == 2 * 2 * 16 / result["step_s"]
    # The policy starts as the reference: every log-ratio is 0 and the sigmoid loss is log 2.
    assert abs(result["first_loss"] - math.log(2)) < 1e-4, result["first_loss"]
    printed = capsys.readouterr().out
    assert "reference_s" in printed and "peak_fraction" in printed


@pytest.mark.slow
def test_train_bench_dpo_precomputed_and_rm():
    pre = bench_train(
        "llama-tiny",
        objective="dpo",
        batch=2,
        prompt_len=6,
        completion_len=10,
        reference="precomputed",
        repeats=1,
    )
    assert pre["reference"] == "precomputed" and pre["step_s"] > 0 and pre["reference_s"] > 0
    assert abs(pre["first_loss"] - math.log(2)) < 1e-4
    rm = bench_train("llama-tiny", objective="rm", batch=3, prompt_len=4, completion_len=4, repeats=1)
    assert "reference" not in rm and "reference_s" not in rm
    assert rm["tokens_per_step"] == 3 * 2 * 8 and rm["tokens_per_s"] == 48 / rm["step_s"]
    assert rm["peak_fraction"] > 0 and rm["flops_per_s"] > 0 and math.isfinite(rm["loss"])
    # FLOPs count the 3 rows of prompt | chosen | rejected (4 + 2 * 4 tokens) the model reads; a score
    # model's leave out the vocabulary-wide LM head that DPO's forwards pay for.
    cfg = get_preset("llama-tiny")
    head = 2 * 3 * 12 * cfg.hidden_size * (cfg.vocab_size - 1)
    assert rm["flops_per_s"] * rm["step_s"] == pytest.approx(3 * (forward_flops(cfg, 3, 12) - head))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "dpo", "--seq-len", "16"], "--seq-len: objective 'dpo' trains on preference pairs"),
        (["--objective", "rm", "--seq-len", "16"], "give --prompt-len and --completion-len instead"),
        (["--objective", "sft", "--prompt-len", "8"], "--prompt-len: objective 'sft' trains on full rows"),
        (["--objective", "rm", "--reference", "live"], "only objective 'dpo' has a reference model"),
        (["--objective", "dpo", "--compare-trl", "--accum", "2"], "--compare-trl with --accum=2"),
        (["--objective", "rm", "--compare-trl", "--remat", "full"], "--compare-trl with --remat='full'"),
    ],
)
def test_train_bench_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "llama-tiny", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "rm"])
def test_train_bench_pairs_compare_trl(objective):
    result = bench_train(
        "llama-tiny",
        objective=objective,
        batch=2,
        prompt_len=6,
        completion_len=10,
        repeats=1,
        compare_trl=True,
    )
    assert result["peer_tokens_per_s"] > 0 and result["speedup"] > 0
    assert (
        result["peer"].startswith("trl ")
        and ("DPOTrainer" if objective == "dpo" else "RewardTrainer") in result["peer"]
    )
    # Same initial weights, same token ids, AdamW with the same settings: the losses agree step for step.
    for ours, theirs in (("first_loss", "peer_first_loss"), ("loss", "peer_loss")):
        assert abs(result[ours] - result[theirs]) < 1e-3 * result[ours], (ours, result[ours], result[theirs])


def test_trl_grpo_peer(tmp_path):
    import numpy as np

    from jaxrl_llm.bench.peer import trl_grpo
    from jaxrl_llm.models import create_model, save_hf

    save_hf(create_model(get_preset("llama-tiny")), tmp_path)
    prompts = np.random.RandomState(0).randint(1, 256, (2, 6)).astype(np.int32)
    # trl_grpo itself raises unless TRL sampled 2 x 2 completions of exactly 4 tokens from these prompt ids in
    # each of its 2 iterations, and ran 2 optimizer steps.
    result = trl_grpo(str(tmp_path), prompts, group=2, new_tokens=4, repeats=1)
    assert result["peer"].startswith("trl ") and "GRPOTrainer" in result["peer"]
    assert result["peer_loss_type"] == "dapo"
    for key in ("peer_iteration_s", "peer_rollout_s", "peer_update_s", "peer_rollout_tokens_per_s"):
        assert result[key] > 0, key
    assert result["peer_rollout_tokens_per_s"] == pytest.approx(2 * 2 * 4 / result["peer_rollout_s"])
    # One iteration: the two medians are of the same iteration's parts.
    assert result["peer_rollout_s"] + result["peer_update_s"] == pytest.approx(result["peer_iteration_s"])
    # Ratio 1 and advantages of zero mean in each group (equal lengths): the loss is 0 up to rounding.
    assert abs(result["peer_loss"]) < 1e-5
