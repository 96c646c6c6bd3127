"""Tiny randomly initialised HF transformers (PyTorch) models: the reference our JAX models must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
VOCAB = 97

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    pad_token_id=0,
)


def hf_config(family: str, **overrides):
    """A tiny config exercising each family's distinctive features (windows short enough to matter)."""
    t = transformers
    extra = {
        # Llama 3.1 RoPE scaling with a short original context, so every frequency band is exercised.
        "llama": (
            t.LlamaConfig,
            dict(
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            ),
        ),
        "mistral": (t.MistralConfig, dict(sliding_window=4)),
        "qwen2": (t.Qwen2Config, dict(tie_word_embeddings=True)),
        "qwen3": (t.Qwen3Config, dict()),
        "gemma2": (
            t.Gemma2Config,
            dict(
                sliding_window=4,
                query_pre_attn_scalar=16,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0,
            ),
        ),
        # Every other layer global, distinct local/global RoPE bases, linear scaling on the global ones.
        "gemma3": (
            t.Gemma3TextConfig,
            dict(
                sliding_window=4,
                query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
            ),
        ),
    }[family]
    cls, kw = extra
    return cls(**{**_COMMON, **kw, **overrides})


def make_hf_model(family: str, path: Path, *, head: str = "lm", seed: int = 0, **overrides):
    """Builds, perturbs and saves an HF model; returns the torch model (eval mode) and the directory."""
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    auto = (
        transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    )
    if head != "lm":
        config.num_labels = 1
    model = auto.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF initialises norms to 1 (or 0 for Gemma's 1+w) and biases to 0: perturb them so a wrong
            # offset, a missing bias or a swapped norm shows in the logits.
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model, path


def padded_batch(seed: int = 0, batch: int = 4, length: int = 12):
    """Tokens and a mask with a full row, a left-padded row, a right-padded row and a both-sides-short row."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, VOCAB, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :5] = 0  # left padding
    if batch > 2:
        mask[2, 8:] = 0  # right padding
    if batch > 3:
        mask[3, :2] = 0
        mask[3, -3:] = 0
    tokens = np.where(mask == 1, tokens, 0)
    return tokens, mask


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()
