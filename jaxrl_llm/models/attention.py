"""Grouped-query attention with RoPE, optional q/k norm, soft-capping and sliding windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..parallel import constrain
from .config import ModelConfig
from .layers import RMSNorm, apply_rope, dense, dtype_of, param, softcap


@struct.dataclass
class AttentionMask:
    """What every layer needs to build its mask; computed once per forward.

    ``allowed``: bool[B, T, S], key slot is a real token at or before the query's slot.
    ``distance``: int32[B, T, S], query position minus key position (for sliding windows).
    """

    allowed: jax.Array
    distance: jax.Array

    def for_window(self, window: jax.Array) -> jax.Array:
        """bool[B, T, S]; ``window`` is an int32 scalar, 0 meaning global attention."""
        return self.allowed & ((window <= 0) | (self.distance < window))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, h, k, d, pd = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype_of(cfg.param_dtype),
        )
        self.q = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), pd)
        self.k = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd)
        self.v = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd)
        self.o = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), pd)
        if cfg.attention_bias:
            self.q_bias = param(None, (h, d), ("heads", "head_dim"), pd, "zeros")
            self.k_bias = param(None, (k, d), ("kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = param(None, (k, d), ("kv_heads", "head_dim"), pd, "zeros")
        if cfg.attention_out_bias:
            self.o_bias = param(None, (e,), ("embed",), pd, "zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg, axes=("head_dim",))
            self.k_norm = RMSNorm(d, cfg, axes=("head_dim",))
        self.cfg = cfg

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = dense(x, getattr(self, name)[...])
        if self.cfg.attention_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        inv_freq: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
    ):
        """x: [B, T, E]; positions: int32[B, T]; mask: bool[B, T, S]; inv_freq: float32[D/2] (this layer's RoPE).

        Without ``kv`` the keys are this call's tokens (S = T) and ``None`` is returned for them. With ``kv``
        (this layer's cache: keys [B, K, D, S], values [B, K, S, D]; see ``KVCache``) the new keys and values
        are written at slot ``index`` first (int32[], or int32[B]: each row at its own slot) and the updated
        pair is returned.
        Returns (output [B, T, E], (keys, values) or None).
        """
        cfg = self.cfg
        q, k, v = self._project(x, "q"), self._project(x, "k"), self._project(x, "v")
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        # Heads-major from here on (queries [B, K, G, T, D], keys [B, K, D, S], values [B, K, S, D]): both
        # products are plain per-head matmuls (on XLA CPU the [B, T, K, D] layouts were 2-10x slower).
        keys, values = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
        new_kv = None
        if kv is not None:  # write this call's keys and values at slot ``index`` of the cache
            keys = write_slots(kv[0], keys.astype(kv[0].dtype), index, axis=3)
            values = write_slots(kv[1], values.astype(kv[1].dtype), index, axis=2)
            new_kv = (keys, values)
            # A call over the leading rows of a larger slot cache reads those rows back (after the write, so
            # the cache is updated in place, never copied whole).
            keys, values = keys[: x.shape[0]], values[: x.shape[0]]
        b, t = q.shape[:2]
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)
        q = constrain(q, ("batch", "kv_heads", None, "seq", "head_dim"))
        scores = jnp.einsum("bkgtd,bkds->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = softcap(scores * cfg.attn_scale, cfg.attn_logit_softcap)
        # A finite minimum (not -inf) keeps fully masked rows (padding queries) free of NaNs.
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, values.astype(x.dtype))
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, cfg.head_dim)
        out = dense(out, self.o[...], 2)
        if cfg.attention_out_bias:
            out = out + self.o_bias[...].astype(x.dtype)
        return out, new_kv


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``new`` written into ``cache`` along ``axis`` from slot ``index``: one slot for every row (int32[]),
    or each row's own (int32[B], a slot-per-request cache); in place under jit when the cache is donated.

    In a slot cache ``new`` may cover only its leading rows (a decode step over the occupied slots): it is
    padded with zeros, which land at the other rows' next slot, unused until those rows write there.
    """
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis)
    if new.shape[0] < cache.shape[0]:
        new = jnp.pad(new, [(0, cache.shape[0] - new.shape[0])] + [(0, 0)] * (new.ndim - 1))
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis - 1))(cache, new, index)


def make_mask(
    positions: jax.Array,
    valid: jax.Array,
    key_positions: jax.Array,
    key_valid: jax.Array,
    query_slots: jax.Array,
    segment_ids: jax.Array | None = None,
    shared: jax.Array | None = None,
) -> AttentionMask:
    """positions/valid: [B, T] for the queries; key_*: [B, S]; query_slots: int32[T] (or [B, T], rows writing
    at their own slots) slot of each query.

    ``segment_ids`` (int32[B, T], without a cache, so S = T) keeps packed documents apart: a query sees only
    keys of its own segment, and the keys marked ``shared`` (bool[B, T]: a prompt that every segment after
    it continues, e.g. both answers of a preference pair laid out as ``prompt | chosen | rejected``).
    """
    key_slots = jnp.arange(key_valid.shape[1])
    query_slots = query_slots if query_slots.ndim == 2 else query_slots[None]  # [B or 1, T]
    causal = key_slots[None, None, :] <= query_slots[:, :, None]
    allowed = causal & key_valid[:, None, :] & valid[:, :, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        if shared is not None:
            same = same | shared[:, None, :].astype(bool)
        allowed = allowed & same
    # Padding queries attend to themselves only, so their (ignored) outputs stay finite.
    allowed = allowed | (~valid[:, :, None] & (key_slots[None, None, :] == query_slots[:, :, None]))
    distance = positions[:, :, None] - key_positions[:, None, :]
    return AttentionMask(allowed=allowed, distance=distance)
