"""The KV cache: a plain pytree of fixed-size arrays, written with ``dynamic_update_slice``.

Keys and values are one array per layer, heads-major: keys ``[B, K, D, S]``, values ``[B, K, S, D]``. A
decode step writes each layer's new slot in place and reads it back without slicing or restacking an
``[L, ...]`` array (on XLA both copy the whole cache at every generated token), and both attention matmuls
are plain ``[G, D] x [D, S]`` and ``[G, S] x [S, D]`` products per (row, head) with no transposed operand:
on XLA's CPU matmuls the ``[S, D]`` key layout made the score product ~3x slower.

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
    k: tuple[jax.Array, ...]  # per layer [B, K, D, S]: keys after RoPE, slots last
    v: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    valid: jax.Array  # bool[B, S]: the slot holds a real (non-padding) token
    positions: jax.Array  # int32[B, S]: RoPE position of the token in each slot
    index: jax.Array  # int32[]: the next slot to write (shared by all rows); int32[B] in a per-row cache
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
        per_row: bool = False,
    ) -> KVCache:
        """An empty cache for ``batch`` rows of at most ``max_len`` tokens (prompt + generated).

        ``per_row``: every row has its own write index (``index`` int32[B]): a slot-per-request cache whose
        rows hold sequences of different lengths, started and ended independently (continuous batching).

        With a ``mesh`` it is created sharded (batch over the data axes, KV heads over ``tensor``), never
        whole on one device.
        """
        dtype = dtype or dtype_of(cfg.dtype)
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
        v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        layers = cfg.num_layers

        def make() -> KVCache:
            return cls(
                k=tuple(jnp.zeros(k_shape, dtype) for _ in range(layers)),
                v=tuple(jnp.zeros(v_shape, dtype) for _ in range(layers)),
                valid=jnp.zeros((batch, max_len), bool),
                positions=jnp.zeros((batch, max_len), jnp.int32),
                index=jnp.zeros((batch,) if per_row else (), jnp.int32),
                lengths=jnp.zeros((batch,), jnp.int32),
            )

        if mesh is None:
            return make()
        k = named_sharding(("batch", "kv_heads", "head_dim", "cache_seq"), k_shape, mesh, rules)
        v = named_sharding(("batch", "kv_heads", "cache_seq", "head_dim"), v_shape, mesh, rules)
        rows = named_sharding(("batch", "cache_seq"), (batch, max_len), mesh, rules)
        shardings = cls(
            k=(k,) * layers,
            v=(v,) * layers,
            valid=rows,
            positions=rows,
            index=named_sharding(("batch",), (batch,), mesh, rules)
            if per_row
            else named_sharding((), (), mesh, rules),
            lengths=named_sharding(("batch",), (batch,), mesh, rules),
        )
        return jax.jit(make, out_shardings=shardings)()

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]

    def repeat_rows(self, n: int) -> KVCache:
        """Each row repeated ``n`` times (row ``i`` -> rows ``i*n .. i*n+n-1``): one prefill, n samples."""
        if n == 1:
            return self
        return self.replace(
            k=tuple(jnp.repeat(k, n, axis=0) for k in self.k),
            v=tuple(jnp.repeat(v, n, axis=0) for v in self.v),
            valid=jnp.repeat(self.valid, n, axis=0),
            positions=jnp.repeat(self.positions, n, axis=0),
            lengths=jnp.repeat(self.lengths, n, axis=0),
            index=jnp.repeat(self.index, n, axis=0) if self.index.ndim else self.index,
        )
