"""The KV cache: a plain pytree of fixed-size arrays, written with ``dynamic_update_slice``.

Rows may be left- or right-padded: ``valid`` marks which slots hold real tokens and ``positions`` their
RoPE positions, so a row's attention never depends on the other rows' padding.

The cache has a fixed size, ``max_len`` slots. A forward call longer than that is refused; inside a
compiled decode loop the index is traced, so the caller bounds the number of steps (prompt + new tokens
<= ``max_len``): writes past the end would be clamped onto the last slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from ..parallel import DEFAULT_RULES, named_sharding
from .config import ModelConfig
from .layers import dtype_of


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, D] keys after RoPE
    v: jax.Array  # [L, B, S, K, D]
    valid: jax.Array  # bool[B, S]: the slot holds a real (non-padding) token
    positions: jax.Array  # int32[B, S]: RoPE position of the token in each slot
    index: jax.Array  # int32[]: the next slot to write (shared by all rows)
    lengths: jax.Array  # int32[B]: real tokens written so far per row (the next token's position)

    @classmethod
    def init(
        cls,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        dtype=None,
        *,
        mesh: Mesh | None = None,
        rules=DEFAULT_RULES,
    ) -> KVCache:
        """An empty cache for ``batch`` rows of at most ``max_len`` tokens (prompt + generated).

        With a ``mesh`` it is created sharded (batch over the data axes, KV heads over ``tensor``), never
        whole on one device.
        """
        dtype = dtype or dtype_of(cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)

        def make() -> KVCache:
            return cls(
                k=jnp.zeros(shape, dtype),
                v=jnp.zeros(shape, dtype),
                valid=jnp.zeros((batch, max_len), bool),
                positions=jnp.zeros((batch, max_len), jnp.int32),
                index=jnp.zeros((), jnp.int32),
                lengths=jnp.zeros((batch,), jnp.int32),
            )

        if mesh is None:
            return make()
        kv = named_sharding(("layers", "batch", "cache_seq", "kv_heads", "head_dim"), shape, mesh, rules)
        rows = named_sharding(("batch", "cache_seq"), (batch, max_len), mesh, rules)
        shardings = cls(
            k=kv,
            v=kv,
            valid=rows,
            positions=rows,
            index=named_sharding((), (), mesh, rules),
            lengths=named_sharding(("batch",), (batch,), mesh, rules),
        )
        return jax.jit(make, out_shardings=shardings)()

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def repeat_rows(self, n: int) -> KVCache:
        """Each row repeated ``n`` times (row ``i`` -> rows ``i*n .. i*n+n-1``): one prefill, n samples."""
        if n == 1:
            return self
        return self.replace(
            k=jnp.repeat(self.k, n, axis=1),
            v=jnp.repeat(self.v, n, axis=1),
            valid=jnp.repeat(self.valid, n, axis=0),
            positions=jnp.repeat(self.positions, n, axis=0),
            lengths=jnp.repeat(self.lengths, n, axis=0),
        )
