"""Attention kernels behind one choice (``ModelConfig.attention``), and decoding that reads only the filled cache.

- ``xla``: the einsum path (``attend_reference``): scores ``[B, K, G, T, S]`` in float32, masked, softmaxed.
  The reference every other path is tested against, and the path on CPU.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's flash attention on NVIDIA
  GPUs (bfloat16/float16; GQA is native). The whole mask (causality, padding, windows, packed documents and
  their shared prompts) goes in as one boolean ``[B, 1, T, S]`` mask, which cuDNN applies as an additive bias:
  ``B*T*S`` elements in the compute dtype instead of the einsum path's ``B*H*T*S`` float32 scores and
  probabilities.
- ``splash``: the Pallas splash-attention kernel on TPU: causal or local (sliding-window) block-sparse
  masks, padding and packed documents as segment ids, Gemma 2's soft-cap built in. Its window counts slots
  (the einsum path counts positions): the same for rows whose real tokens are contiguous (left or right
  padding, packed documents with their own positions), which is what this project's batches hold.

``choose_kernel`` is a pure function of a call's static facts (:class:`CallFacts`): which kernel runs, and
why an explicit request could not be met (the model logs that once and runs the einsum path).

A call with a KV cache and few query tokens (a decode step) never uses a kernel: ``attend_cached`` reads the
cache block by block up to the highest slot any query may see, with an online softmax (flash decoding), so
a step costs what the filled part costs, not ``max_len``. Its trip count is traced: cached forwards are for
inference and are not differentiated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from ..parallel import fitting_axes, logical_to_spec
from .config import ATTENTION_KERNELS as KERNELS
from .layers import softcap

log = logging.getLogger(__name__)

DECODE_MAX_TOKENS = 16  # a cached call with at most this many queries is a decode step (attend_cached)
DECODE_BLOCK = 128  # cache slots a decode step reads per iteration
SPLASH_BLOCK = 128  # the splash kernel's smallest tile (TPU lanes): sequence lengths must be multiples
# The ``implementation=`` each kernel passes to jax.nn.dot_product_attention. Tests map "cudnn" to "xla" to
# run the very same call on CPU; ``SPLASH_INTERPRET`` runs the Pallas kernel in interpret mode.
DPA_IMPLEMENTATION = {"cudnn": "cudnn"}
SPLASH_INTERPRET = False


@dataclasses.dataclass(frozen=True)
class CallFacts:
    """What decides the kernel of one attention call; all static (known while tracing)."""

    platform: str  # jax.default_backend(): "cpu" | "gpu" | "tpu"
    dtype: str  # compute dtype of queries, keys and values
    head_dim: int
    q_len: int  # T
    kv_len: int  # S (the cache's max_len for a cached call)
    cached: bool = False  # keys and values are a KV cache's slots
    softcap: bool = False  # Gemma 2 attention-logit soft-capping
    segments: bool = True  # the mask is causal + per-row segment ids (False: a shared prompt)
    gpu_capability: float = 0.0  # CUDA compute capability (9.0 = Hopper)


def _cudnn_blocker(f: CallFacts) -> str:
    """Why cuDNN flash attention cannot run this call ("" when it can)."""
    max_dim = 256 if f.gpu_capability >= 9.0 else 128
    if f.platform != "gpu":
        return f"cuDNN needs an NVIDIA GPU (platform: {f.platform})"
    if f.dtype not in ("bfloat16", "float16"):
        return f"cuDNN flash attention needs bfloat16 or float16 (compute dtype: {f.dtype})"
    if f.head_dim % 8 or f.head_dim > max_dim:
        return (
            f"cuDNN needs a head dim that is a multiple of 8 and at most {max_dim} (head dim: {f.head_dim})"
        )
    if f.softcap:
        return "cuDNN has no attention-logit soft-capping (Gemma 2)"
    if f.q_len % 2 or f.kv_len % 2:  # cuDNN's backward with a bias (our mask) wants even lengths
        return f"cuDNN with a mask needs even lengths (queries {f.q_len}, keys {f.kv_len})"
    return ""


def _splash_blocker(f: CallFacts) -> str:
    """Why the splash kernel cannot run this call ("" when it can)."""
    if f.platform != "tpu":
        return f"the splash kernel needs a TPU (platform: {f.platform})"
    if f.cached:
        return "the splash kernel runs forwards without a KV cache (a cached prefill uses the einsum path)"
    if not f.segments:
        return "a shared prompt (packed preference pairs) is not expressible as splash segment ids"
    if f.q_len % SPLASH_BLOCK:
        return f"the splash kernel needs a sequence length that is a multiple of {SPLASH_BLOCK} ({f.q_len})"
    if f.head_dim % 128:
        return f"the splash kernel needs a head dim that is a multiple of 128 ({f.head_dim})"
    return ""


_BLOCKERS = {"cudnn": _cudnn_blocker, "splash": _splash_blocker}
_AUTO = {"gpu": "cudnn", "tpu": "splash"}


def choose_kernel(requested: str, facts: CallFacts) -> tuple[str, str]:
    """``(kernel, why)``: the kernel that runs (``xla``, ``cudnn`` or ``splash``) and, when an explicit request
    falls back to ``xla``, why. ``auto`` takes the platform's kernel where the call allows it, silently."""
    if requested not in KERNELS:
        raise ValueError(f"attention={requested!r}; supported: {', '.join(KERNELS)}")
    if facts.cached and facts.q_len <= DECODE_MAX_TOKENS:
        return "xla", ""  # decode steps read only the filled slots (attend_cached), on every platform
    wanted = _AUTO.get(facts.platform, "xla") if requested == "auto" else requested
    if wanted == "xla":
        return "xla", ""
    why = _BLOCKERS[wanted](facts)
    if not why:
        return wanted, ""
    return "xla", "" if requested == "auto" else why


_logged: set[tuple[str, str]] = set()


def log_fallback(requested: str, why: str) -> None:
    """One warning per (request, reason) for the life of the process."""
    if why and (requested, why) not in _logged:
        _logged.add((requested, why))
        log.warning("attention=%r: %s; this call uses the einsum path", requested, why)


@functools.cache
def platform_facts() -> tuple[str, float]:
    """(platform, CUDA compute capability or 0.0) of the default backend."""
    platform = jax.default_backend()
    capability = 0.0
    if platform == "gpu":
        try:
            capability = float(getattr(jax.devices()[0], "compute_capability", 0.0))
        except (TypeError, ValueError):
            capability = 0.0
    return platform, capability


# -------------------------------------------------------------------------------------------- the paths


def attend_reference(q, keys, values, allowed, *, scale: float, cap: float | None) -> jax.Array:
    """The einsum path. q [B, K, G, T, D]; keys [B, K, D, S]; values [B, K, S, D]; allowed bool[B, T, S].

    Returns [B, K, G, T, D] in q's dtype.
    """
    scores = jnp.einsum("bkgtd,bkds->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = softcap(scores * scale, cap)
    # A finite minimum (not -inf) keeps fully masked rows (padding queries) free of NaNs.
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, values.astype(q.dtype))


def attend_cached(
    q, keys, values, allowed, filled, *, scale: float, cap: float | None, block: int | None = None
) -> jax.Array:
    """Attention over a cache's slots ``[0, filled)`` only, ``block`` slots at a time (flash decoding).

    Shapes as ``attend_reference``; ``filled`` (int32[]) bounds the slots any query may see (the highest
    query slot + 1); ``block`` defaults to ``DECODE_BLOCK`` (a cache of at most two blocks is read whole:
    at that size the loop costs more than the slots it skips). Each block's scores update a running maximum,
    normaliser and weighted sum in float32, so the result is the softmax over every allowed slot. When
    ``block`` does not divide S the last block starts earlier and skips the slots the previous one covered.
    """
    b, k, g, t, d = q.shape
    s = keys.shape[-1]
    block = block or DECODE_BLOCK
    if s <= 2 * block:  # a short cache in one go: no loop to pay for
        return attend_reference(q, keys, values, allowed, scale=scale, cap=cap)
    steps = (jnp.clip(filled, 1, s) + block - 1) // block
    slot = jnp.arange(block)

    def body(i, carry):
        top, total, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, D]
        start = jnp.minimum(i * block, s - block)
        kb = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=3).astype(q.dtype)
        vb = jax.lax.dynamic_slice_in_dim(values, start, block, axis=2).astype(q.dtype)
        ok = jax.lax.dynamic_slice_in_dim(allowed, start, block, axis=2) & (start + slot >= i * block)
        scores = jnp.einsum("bkgtd,bkds->bkgts", q, kb, preferred_element_type=jnp.float32)
        scores = jnp.where(ok[:, None, None], softcap(scores * scale, cap), -jnp.inf)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        p = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(q.dtype), vb, preferred_element_type=jnp.float32)
        return new_top, total * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv

    init = (
        jnp.full((b, k, g, t), jnp.finfo(jnp.float32).min),
        jnp.zeros((b, k, g, t), jnp.float32),
        jnp.zeros((b, k, g, t, d), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(0, steps, body, init)
    return (acc / jnp.where(total > 0, total, 1.0)[..., None]).astype(q.dtype)


def attend_dpa(q, k, v, allowed, *, scale: float, causal: bool, implementation: str | None) -> jax.Array:
    """``jax.nn.dot_product_attention``. q [B, T, H, D]; k, v [B, S, K, D]; allowed bool[B, T, S].

    ``causal`` (queries and keys in the same slots, no cache) lets cuDNN skip the blocks above the diagonal;
    the mask holds causality anyway. Returns [B, T, H, D].
    """
    return jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        mask=allowed[:, None],
        scale=scale,
        is_causal=causal,
        implementation=implementation,
    )


def _splash_kernel(heads: int, length: int, window: int, cap: float | None, interpret: bool):
    """A splash kernel over ``heads`` query heads (made per trace: it holds arrays, which a cache would leak
    out of the trace)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, length)
    one = sm.LocalMask(shape, (window - 1, 0), offset=0) if window > 0 else sm.CausalMask(shape)
    tile = max(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
    sizes = sk.BlockSizes(
        block_q=tile,
        block_kv=tile,
        block_kv_compute=tile,
        block_q_dkv=tile,
        block_kv_dkv=tile,
        block_kv_dkv_compute=tile,
        block_q_dq=tile,
        block_kv_dq=tile,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([one] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=cap,
        interpret=interpret,
    )


def attend_splash(q, k, v, segments, *, scale: float, cap: float | None, window: int) -> jax.Array:
    """The splash kernel. q [B, T, H, D]; k, v [B, T, K, D]; segments int32[B, T] (0 = padding: real tokens
    see only their own segment). ``window`` (static) > 0 limits each query to its last ``window`` slots.

    Under a mesh the kernel runs per shard (``shard_map``): rows over the batch axes, heads over the
    ``heads`` axis when both the query and the KV heads divide it. Returns [B, T, H, D].
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, D]: the kernel does not scale
    k, v = k.astype(q.dtype).transpose(0, 2, 1, 3), v.astype(q.dtype).transpose(0, 2, 1, 3)

    def run(q, k, v, segments):
        kernel = _splash_kernel(q.shape[1], q.shape[2], window, cap, SPLASH_INTERPRET)
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))  # noqa: E731
        return jax.vmap(one)(q, k, v, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        rows = fitting_axes(logical_to_spec(("batch",))[0], q.shape[0], mesh) or None
        heads = (
            fitting_axes(logical_to_spec(("heads",))[0], int(np.gcd(q.shape[1], k.shape[1])), mesh) or None
        )
        spec = jax.sharding.PartitionSpec(rows, heads, None, None)
        run = jax.shard_map(
            run,
            in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(rows, None)),
            out_specs=spec,
            check_vma=False,
        )
    return run(q, k, v, segments.astype(jnp.int32)).transpose(0, 2, 1, 3)
