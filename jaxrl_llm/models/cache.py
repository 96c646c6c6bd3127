"""The KV cache: a plain pytree of fixed-size arrays, written with ``dynamic_update_slice``.

Rows may be left- or right-padded: ``valid`` marks which slots hold real tokens and ``positions`` their
RoPE positions, so a row's attention never depends on the other rows' padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, D] keys after RoPE
    v: jax.Array  # [L, B, S, K, D]
    valid: jax.Array  # bool[B, S]: the slot holds a real (non-padding) token
    positions: jax.Array  # int32[B, S]: RoPE position of the token in each slot
    index: jax.Array  # int32[]: the next slot to write (shared by all rows)
    lengths: jax.Array  # int32[B]: real tokens written so far per row (the next token's position)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for ``batch`` rows of at most ``max_len`` tokens (prompt + generated)."""
        dtype = dtype or {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]
