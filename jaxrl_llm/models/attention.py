"""Grouped-query attention with RoPE, optional q/k norm, soft-capping and sliding windows.

The projections live here; the attention itself runs on the kernel ``cfg.attention`` picks for each call
(the einsum path, cuDNN or splash; see ``attention_kernels``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..parallel import constrain
from . import attention_kernels as kernels
from .config import ModelConfig
from .layers import RMSNorm, apply_rope, dense, dtype_of, param


@struct.dataclass
class AttentionMask:
    """What every layer needs to build its mask; computed once per forward.

    ``allowed``: bool[B, T, S], key slot is a real token at or before the query's slot.
    ``distance``: int32[B, T, S], query position minus key position (for sliding windows).
    ``segments``: int32[B, T] (forwards without a cache and without a shared prompt, else None): the same
    mask as causality + segment ids, 0 for padding, for kernels that take segment ids (splash).
    """

    allowed: jax.Array
    distance: jax.Array
    segments: jax.Array | None = None

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
        mask: AttentionMask,
        window: jax.Array,
        inv_freq: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
    ):
        """x: [B, T, E]; positions: int32[B, T]; window: int32[] this layer's sliding window (0 = global);
        inv_freq: float32[D/2] (this layer's RoPE).

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
        b, t = q.shape[:2]
        kernel = self._kernel(x.dtype, t, kv, mask)
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
            keys, values = keys[:b], values[:b]
        if kernel == "cudnn":
            if kv is not None:  # the kernel's layout, [B, S, K, D]
                k, v = keys.transpose(0, 3, 1, 2), values.transpose(0, 2, 1, 3)
            implementation = kernels.DPA_IMPLEMENTATION["cudnn"]
            out = kernels.attend_dpa(
                q,
                k,
                v,
                mask.for_window(window),
                scale=cfg.attn_scale,
                causal=kv is None,
                implementation=implementation,
            )
        elif kernel == "splash":
            out = self._splash(q, k, v, mask.segments, window)
        else:
            out = self._einsum(q, keys, values, mask.for_window(window), kv is not None, index)
        return self._output(out), new_kv

    def _output(self, out: jax.Array) -> jax.Array:
        """The output projection: the attention's heads [B, T, H, D] -> [B, T, E] in their dtype."""
        y = dense(out, self.o[...], 2)
        if self.cfg.attention_out_bias:
            y = y + self.o_bias[...].astype(out.dtype)
        return y

    def _kernel(self, dtype, t: int, kv, mask: AttentionMask) -> str:
        """Which kernel runs this call (``attention_kernels.choose_kernel``); an explicit request that
        cannot be met is logged once."""
        platform, capability = kernels.platform_facts()
        facts = kernels.CallFacts(
            platform=platform,
            dtype=jnp.dtype(dtype).name,
            head_dim=self.cfg.head_dim,
            q_len=t,
            kv_len=t if kv is None else kv[1].shape[2],
            cached=kv is not None,
            softcap=self.cfg.attn_logit_softcap is not None,
            segments=mask.segments is not None,
            gpu_capability=capability,
        )
        kernel, why = kernels.choose_kernel(self.cfg.attention, facts)
        kernels.log_fallback(self.cfg.attention, why)
        return kernel

    def _einsum(self, q, keys, values, allowed, cached: bool, index) -> jax.Array:
        """The einsum path: q [B, T, H, D] -> [B, T, H, D]; a cached call reads only the filled slots."""
        cfg = self.cfg
        b, t = q.shape[:2]
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)
        q = constrain(q, ("batch", "kv_heads", None, "seq", "head_dim"))
        scale, cap = cfg.attn_scale, cfg.attn_logit_softcap
        if cached:  # no query sees past the highest slot written by this call
            filled = jnp.max(index[:b] if jnp.ndim(index) else index) + t
            out = kernels.attend_cached(q, keys, values, allowed, filled, scale=scale, cap=cap)
        else:
            out = kernels.attend_reference(q, keys, values, allowed, scale=scale, cap=cap)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, cfg.head_dim)

    def _splash(self, q, k, v, segments, window) -> jax.Array:
        """The splash kernel with this layer's window, which must be static: a switch over the model's
        distinct windows when layers differ (scanned layers carry their window as data)."""
        windows = sorted({w or 0 for w in self.cfg.layer_windows()})
        branches = [
            functools.partial(
                kernels.attend_splash, scale=self.cfg.attn_scale, cap=self.cfg.attn_logit_softcap, window=w
            )
            for w in windows
        ]
        if len(branches) == 1:
            return branches[0](q, k, v, segments)
        which = jnp.argmax(jnp.asarray(windows, jnp.int32) == window)
        return jax.lax.switch(which, branches, q, k, v, segments)


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
