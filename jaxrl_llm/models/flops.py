"""FLOPs of an architecture's forward pass: what MFU and the benchmarks' fractions of peak divide by."""

from __future__ import annotations

from .config import ModelConfig


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward: 2 per weight per token (LM head included), plus attention scores/values."""
    e, h, kv, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = e * d * (2 * h + 2 * kv) + 3 * e * m
    weights = cfg.num_layers * per_layer + e * cfg.vocab_size
    attention = 4 * cfg.num_layers * h * d * seq_len  # per token: q.k over T keys and p.v, unmasked
    return batch * seq_len * (2 * weights + attention)


def train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step: forward + backward = 3 forwards (the standard 6N estimate)."""
    return 3.0 * forward_flops(cfg, batch, seq_len)
