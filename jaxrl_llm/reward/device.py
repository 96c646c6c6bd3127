"""Device rewards: pure ``jnp`` functions of one sample's token arrays, jittable and vmappable.

Each takes a ``SampleArrays`` (one sample: no batch axis) and its keyword parameters and returns a float32
scalar; the reward layer ``vmap`` s it over the batch. Masks are booleans; ids past a mask are padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from .base import RewardError, register


@struct.dataclass
class SampleArrays:
    """What a device reward sees (batched ``[N, ...]`` when vmapped over a batch).

    ``answer_ids`` are the record's ground truth encoded with the policy's tokenizer (no special tokens);
    ``answer_mask`` is all False for records without one.
    """

    prompt_ids: jax.Array  # int32[P]
    prompt_mask: jax.Array  # bool[P]
    completion_ids: jax.Array  # int32[C]
    completion_mask: jax.Array  # bool[C]
    answer_ids: jax.Array  # int32[A]
    answer_mask: jax.Array  # bool[A]


def _length(s: SampleArrays) -> jax.Array:
    return s.completion_mask.sum(dtype=jnp.int32)


def _compact(ids: jax.Array, keep: jax.Array, fill: int = -1) -> tuple[jax.Array, jax.Array]:
    """The kept ids moved to the front in order (``fill`` after them), and how many were kept."""
    slot = jnp.where(keep, jnp.cumsum(keep) - 1, ids.shape[0])  # dropped ids go past the end (discarded)
    out = jnp.full(ids.shape[0] + 1, fill, ids.dtype).at[slot].set(ids)[:-1]
    return out, keep.sum(dtype=jnp.int32)


def _ids_param(params: dict[str, Any], key: str, tokenizer: Any, reward: str) -> tuple[int, ...]:
    """A parameter given as token ids or as strings (encoded with the policy's tokenizer) -> token ids."""
    value = params[key]
    if isinstance(value, str):
        value = [value]
    out: list[int] = []
    for v in value:
        if isinstance(v, str):
            if tokenizer is None:
                raise RewardError(f"reward {reward!r}: {key} given as text needs the policy's tokenizer")
            out.extend(int(i) for i in tokenizer.encode(v, add_special_tokens=False))
        else:
            out.append(int(v))
    return tuple(out)


def _prepare_answer_match(params: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    return {**params, "ignore_ids": _ids_param(params, "ignore_ids", tokenizer, "answer_match")}


@register("answer_match", "device", prepare=_prepare_answer_match)
def answer_match(s: SampleArrays, *, ignore_ids: Sequence[int] | Sequence[str] = ()) -> jax.Array:
    """1.0 when the completion's tokens, minus ``ignore_ids`` (EOS, end-of-turn), equal the answer's tokens.

    A record without a ground truth scores 0.
    """
    ignore = jnp.asarray(tuple(ignore_ids) or (-1,), jnp.int32)
    keep = s.completion_mask & ~jnp.isin(s.completion_ids, ignore)
    got, n_got = _compact(s.completion_ids, keep)
    want, n_want = _compact(s.answer_ids, s.answer_mask)
    width = min(got.shape[0], want.shape[0])
    same = (got[:width] == want[:width]) | (jnp.arange(width) >= n_want)
    fits = n_want <= got.shape[0]
    return ((n_got == n_want) & same.all() & fits & (n_want > 0)).astype(jnp.float32)


@register("overlong", "device")
def overlong(s: SampleArrays, *, max_length: int = 1024, cache_length: int = 256) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to ``max_length - cache_length``
    tokens, then falling linearly to -1 at ``max_length``, and -1 beyond."""
    if not 0 < cache_length <= max_length:
        raise RewardError(f"overlong: need 0 < cache_length ({cache_length}) <= max_length ({max_length})")
    length = _length(s).astype(jnp.float32)
    start = max_length - cache_length
    return jnp.clip((start - length) / cache_length, -1.0, 0.0)


@register("repetition", "device")
def repetition(s: SampleArrays, *, n: int = 3, max_penalty: float = -1.0) -> jax.Array:
    """N-gram repetition penalty: ``max_penalty`` times the fraction of the completion's n-grams that repeat
    an earlier one (0 for a completion without repeats or shorter than ``n``)."""
    if n < 1:
        raise RewardError(f"repetition: n must be >= 1, got {n}")
    c = s.completion_ids.shape[0]
    count = c - n + 1
    if count < 1:
        return jnp.zeros((), jnp.float32)
    grams = jnp.stack([s.completion_ids[i : i + count] for i in range(n)], axis=1)  # [count, n]
    valid = jnp.arange(count) + n <= _length(s)
    same = (grams[:, None, :] == grams[None, :, :]).all(-1) & valid[None, :]  # [i, j]: gram j equals gram i
    earlier = jnp.arange(count)[None, :] < jnp.arange(count)[:, None]
    repeated = (same & earlier).any(axis=1) & valid
    total = valid.sum()
    return jnp.where(total > 0, max_penalty * repeated.sum() / jnp.maximum(total, 1), 0.0).astype(jnp.float32)


@register("length", "device")
def length(s: SampleArrays, *, coef: float = -0.001, free_tokens: int = 0) -> jax.Array:
    """``coef`` per completion token beyond ``free_tokens`` (negative ``coef`` penalises length)."""
    return (coef * jnp.maximum(_length(s) - free_tokens, 0)).astype(jnp.float32)


def _prepare_markers(params: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    markers = params["markers"]
    if isinstance(markers, str) or not markers:
        raise RewardError("format_tokens: markers must be a non-empty list (of strings or of token-id lists)")
    out = []
    for m in markers:
        ids = _ids_param({"m": [m] if isinstance(m, str) else m}, "m", tokenizer, "format_tokens")
        if not ids:
            raise RewardError(f"format_tokens: marker {m!r} encodes to no tokens")
        out.append(ids)
    return {**params, "markers": tuple(out)}


@register("format_tokens", "device", prepare=_prepare_markers)
def format_tokens(
    s: SampleArrays,
    *,
    markers: Sequence[Sequence[int]] | Sequence[str] = ("<think>", "</think>", "<answer>", "</answer>"),
    partial: bool = False,
) -> jax.Array:
    """Format markers present in order: each marker's token sequence found after the previous one's end.

    1.0 when all are found in order, else 0.0 (or, with ``partial``, the fraction found before the first
    missing one). Markers are token sequences, or strings encoded with the policy's tokenizer (a marker the
    model writes with different tokens is not seen: markers are usually special tokens).
    """
    ids, c = s.completion_ids, s.completion_ids.shape[0]
    length = _length(s)
    end = jnp.zeros((), jnp.int32)  # where the search for the next marker starts
    ok = jnp.ones((), bool)
    found = jnp.zeros((), jnp.float32)
    for marker in markers:
        m = len(marker)
        if m > c:
            ok = jnp.zeros((), bool)
            continue
        starts = jnp.arange(c - m + 1)
        windows = jnp.stack([ids[i : i + c - m + 1] for i in range(m)], axis=1)
        hit = (windows == jnp.asarray(marker, ids.dtype)).all(1) & (starts >= end) & (starts + m <= length)
        ok = ok & hit.any()
        found = found + ok.astype(jnp.float32)
        end = jnp.where(hit.any(), jnp.argmax(hit) + m, c + 1)
    score = found / len(markers) if partial else ok.astype(jnp.float32)
    return jnp.asarray(score, jnp.float32)
