"""The benchmark command runs and reports its fields (timings are measured, never asserted)."""

from __future__ import annotations

import json

from jaxrl_llm.bench.__main__ import main
from jaxrl_llm.bench.forward import forward_flops
from jaxrl_llm.models import get_preset


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


def test_rollout_bench_writes_json(tmp_path):
    out = tmp_path / "rollout.json"
    args = ["rollout", "--model", "llama-tiny", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4"]
    assert main([*args, "--repeats", "1", "--sample", "--compare-hf", "--json", str(out)]) == 0
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
