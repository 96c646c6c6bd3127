"""Building blocks: parameters with logical axes, RMSNorm, embeddings, gated MLP, RoPE, soft-capping.

Shapes: B batch, T query length, S key length, E embed, H heads, K kv heads, D head dim, M mlp, V vocab.
Weights are stored in einsum layout (input axes first), not HF's ``[out, in]``; ``hf_io`` converts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from ..parallel import fitting_axes, logical_to_spec
from .config import ModelConfig, RopeScaling

INIT_STD = 0.02  # HF's default `initializer_range`, so from-scratch models match HF's init scale.


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, *, out_dtype=None) -> jax.Array:
    """Contracts the last ``n_in`` axes of ``x`` with the first ``n_in`` axes of ``w`` (``w`` cast to ``x``'s dtype).

    ``x [..., *in] , w [*in, *out] -> [..., *out]``, computed as one 2-D matrix product over the flattened
    leading axes: XLA's CPU backend runs a [B*T, E] @ [E, M] product (and above all its weight gradient,
    which contracts over B*T) markedly faster than the same einsum with separate batch and time axes, and
    on accelerators the two compile to the same GEMM. Results accumulate in ``out_dtype`` when given.
    """
    lead, inner = x.shape[: x.ndim - n_in], w.shape[:n_in]
    if x.shape[x.ndim - n_in :] != inner:
        raise ValueError(f"dense: x {x.shape} and w {w.shape} do not share {n_in} contracted axes")
    size = math.prod(inner)
    y = jnp.matmul(x.reshape(-1, size), w.astype(x.dtype).reshape(size, -1), preferred_element_type=out_dtype)
    return y.reshape(*lead, *w.shape[n_in:])


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init: str = "normal"
) -> nnx.Param:
    """A parameter annotated with the logical names of its axes (read by ``parallel.state_shardings``)."""
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """``x / rms(x) * (offset + w)``, computed in float32 (offset 1 with zero init for Gemma)."""

    def __init__(self, size: int, cfg: ModelConfig, *, axes: tuple[str | None, ...] = ("norm",)):
        self.offset = cfg.norm_offset
        self.eps = cfg.rms_norm_eps
        init = "zeros" if cfg.norm_offset else "ones"
        self.weight = param(None, (size,), axes, dtype_of(cfg.param_dtype), init)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding ``[V, E]``; also the output projection when embeddings are tied."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype_of(cfg.param_dtype)
        )
        self.scale = math.sqrt(cfg.hidden_size) if cfg.embed_scale else None
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int32[B, T] -> float[B, T, E].

        An id outside [0, V) (negative ones included) embeds as NaN rather than wrapping or clipping to
        another token's row, so a tokenizer/model vocabulary mismatch fails loudly.
        """
        x = embed_lookup(self.embedding[...], tokens).astype(self.dtype)
        if self.scale is not None:
            # Gemma rounds the scale to the compute dtype before multiplying; so do we.
            x = x * jnp.asarray(self.scale, self.dtype)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: float[B, T, E] -> float32[B, T, V]."""
        return dense(x, self.embedding[...].T, out_dtype=jnp.float32)


def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows of ``table`` [V, E] for ``tokens`` int32[B, T] -> [B, T, E]; NaN rows for ids outside [0, V).

    Under a mesh that splits the table, each device looks up the ids in its own vocabulary shard (zeros for
    the others' ids) and the shards' partial rows are summed over the vocabulary axes (``shard_map`` +
    ``psum``): a plain gather from a vocab-sharded table makes XLA all-gather the whole table first.
    """
    vocab = table.shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        tokens = jnp.where(tokens < 0, vocab, tokens)
        return jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan)
    vocab_axes, embed_axes = (
        fitting_axes(e, d, mesh)
        for e, d in zip(logical_to_spec(("vocab", "embed")), table.shape, strict=True)
    )
    # Rows go over the batch axes the table does not use: a device holds every row its embed columns serve.
    rows = fitting_axes(logical_to_spec(("batch",))[0], tokens.shape[0], mesh)
    batch_axes = fitting_axes(
        tuple(a for a in rows if a not in vocab_axes + embed_axes), tokens.shape[0], mesh
    )
    spec = lambda *entries: PartitionSpec(*(e if e else None for e in entries))  # noqa: E731

    def local(table, tokens):  # table [V/v, E/e], tokens [B/b, T]
        rows = table.shape[0]
        ids = tokens - jax.lax.axis_index(vocab_axes) * rows if vocab_axes else tokens
        here = (ids >= 0) & (ids < rows)
        x = jnp.where(here[..., None], jnp.take(table, jnp.where(here, ids, 0), axis=0), 0)
        x = jax.lax.psum(x, vocab_axes) if vocab_axes else x
        return jnp.where(((tokens < 0) | (tokens >= vocab))[..., None], jnp.nan, x)

    return jax.shard_map(
        local,
        in_specs=(spec(vocab_axes, embed_axes), spec(batch_axes, None)),
        out_specs=spec(batch_axes, None, embed_axes),
    )(table, tokens)


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` with SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, m, pd = cfg.hidden_size, cfg.intermediate_size, dtype_of(cfg.param_dtype)
        self.gate = param(rngs, (e, m), ("embed", "mlp"), pd)
        self.up = param(rngs, (e, m), ("embed", "mlp"), pd)
        self.down = param(rngs, (m, e), ("mlp", "embed"), pd)
        self.act = jax.nn.silu if cfg.activation == "silu" else lambda v: jax.nn.gelu(v, approximate=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[B, T, E] -> float[B, T, E]."""
        gate, up = dense(x, self.gate[...]), dense(x, self.up[...])
        return dense(self.act(gate) * up, self.down[...])


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ``[D/2]`` (float32, as HF computes them), with Llama 3 or linear scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, HF's half-rotation layout. x: [B, T, N, D], positions: int32[B, T], inv_freq: [D/2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2 soft-capping ``cap * tanh(x / cap)``; identity when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)
