"""The in-graph sampler: one compiled program per (batch, prompt bucket, budget, n) does the whole generation.

``Sampler(model, eos_ids=..., pad_id=...).sample(prompt_ids, prompt_mask, n=..., key=..., max_new_tokens=...,
sampling=SamplingParams(...)) -> Rollout``:

1. prompts (left- or right-padded; ``prompt_mask`` marks real tokens) are left-padded further up to their
   length bucket, so every call with prompts of the same bucket reuses one compiled program;
2. one batched prefill writes the prompts into a fixed-size KV cache (prompt bucket + ``max_new_tokens``
   slots); for ``n`` samples per prompt the cache is then repeated row-wise, never re-prefilled;
3. a ``lax.while_loop`` decodes one token per step for every row, and exits as soon as every row is done
   (an EOS id, a stop token sequence, or ``max_new_tokens``).

Sampling parameters are traced arguments (``SamplingParams`` is a pytree of scalars): changing them does not
recompile. Each row draws with its own key, ``fold_in(key, row)``, so a row's output depends on its prompt,
its index and the key, never on the other rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ..parallel import constrain, named_sharding
from .sampling import SamplingParams, sample

FINISH_REASONS = ("length", "eos", "stop")  # Rollout.finish_reason indexes this tuple


@struct.dataclass
class Rollout:
    """Generated completions, row ``i * n + j`` = sample ``j`` of prompt ``i``.

    Attributes:
      tokens: int32[R, N] completion tokens; ``pad_id`` after a row ends.
      completion_mask: bool[R, N] True on generated tokens (the final EOS or stop token included).
      logprobs: float32[R, N] log-prob of each token under the distribution it was drawn from.
      model_logprobs: float32[R, N] log-prob under the plain model distribution (temperature 1, full
        vocabulary): what a policy-gradient ratio needs.
      lengths: int32[R] generated tokens per row.
      finish_reason: int32[R] index into ``FINISH_REASONS``.
    """

    tokens: jax.Array
    completion_mask: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32[B, W], mask int32[B, W])`` with each prompt right-aligned (left padding)."""
    width = width or max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > width:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the width {width}")
        if len(p):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
    return ids, mask


def prompt_bucket(length: int, smallest: int = 16) -> int:
    """The padded prompt length a prompt of ``length`` tokens compiles for: the next power of two."""
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return bucket


def _stop_table(stop_sequences: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    table = tuple(tuple(int(t) for t in s) for s in stop_sequences)
    if any(not s for s in table):
        raise ValueError("stop_sequences: an empty stop sequence would stop every row at once")
    return table


def _ends_with_stop(history: jax.Array, stops: tuple[tuple[int, ...], ...]) -> jax.Array:
    """bool[R]: the last tokens of ``history`` (int32[R, W], newest last) equal one of ``stops``."""
    hit = jnp.zeros(history.shape[0], bool)
    for seq in stops:
        tail = history[:, history.shape[1] - len(seq) :]
        hit = hit | (tail == jnp.asarray(seq, jnp.int32)[None]).all(axis=1)
    return hit


@partial(jax.jit, static_argnums=(0,), static_argnames=("n", "max_new_tokens", "eos_ids", "stops", "pad_id"))
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    cache,
    key,
    params: SamplingParams,
    *,
    n: int,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    stops: tuple[tuple[int, ...], ...],
    pad_id: int,
) -> Rollout:
    model = nnx.merge(graphdef, state)
    layers = model.layer_states()  # sliced once: inside the loop every slice would copy the weights again
    hidden, cache = model.forward_hidden(prompt_ids, attention_mask=prompt_mask, cache=cache, layers=layers)
    rows = prompt_ids.shape[0] * n
    cache = _constrain_cache(cache.repeat_rows(n))
    # Each row's next token follows its last real prompt token (the last column only when left-padded); the
    # LM head runs on that position alone.
    last = jnp.max(jnp.where(prompt_mask > 0, jnp.arange(prompt_ids.shape[1]), 0), axis=1)
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]
    logits = jnp.repeat(logits, n, axis=0)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    width = max((len(s) for s in stops), default=1)

    def draw(step, logits):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        return jax.vmap(lambda k, lg: sample(k, lg[None], params), in_axes=(0, 0))(keys, logits)

    def record(step, carry, token, logp, model_logp):
        tokens, logps, model_logps, history, done, reason = carry
        live = ~done
        tokens = tokens.at[:, step].set(jnp.where(live, token, pad_id))
        logps = logps.at[:, step].set(jnp.where(live, logp, 0.0))
        model_logps = model_logps.at[:, step].set(jnp.where(live, model_logp, 0.0))
        history = jnp.concatenate([history[:, 1:], token[:, None]], axis=1)
        is_eos = jnp.isin(token, eos)
        is_stop = _ends_with_stop(history, stops) if stops else jnp.zeros_like(done)
        reason = jnp.where(live & is_eos, 1, jnp.where(live & is_stop, 2, reason))
        done = done | is_eos | is_stop
        return tokens, logps, model_logps, history, done, reason

    token, logp, model_logp = (x[:, 0] for x in draw(0, logits))
    carry = (
        jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((rows, max_new_tokens), jnp.float32),
        jnp.zeros((rows, max_new_tokens), jnp.float32),
        jnp.full((rows, width), -1, jnp.int32),
        jnp.zeros((rows,), bool),
        jnp.zeros((rows,), jnp.int32),
    )
    carry = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), carry)
    carry = record(0, carry, token, logp, model_logp)

    def cond(state):
        step, _, _, carry = state
        return (step < max_new_tokens) & ~carry[4].all()

    def body(state):
        step, token, cache, carry = state
        out = model.forward(
            token[:, None], attention_mask=jnp.ones((rows, 1), jnp.int32), cache=cache, layers=layers
        )
        token, logp, model_logp = (x[:, 0] for x in draw(step, out.logits[:, -1]))
        return step + 1, token, out.cache, record(step, carry, token, logp, model_logp)

    _, _, _, carry = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, carry))
    tokens, logps, model_logps, _, _, reason = carry
    mask = _completion_mask(tokens, eos, stops, max_new_tokens)
    return Rollout(
        tokens=tokens,
        completion_mask=mask,
        logprobs=jnp.where(mask, logps, 0.0),
        model_logprobs=jnp.where(mask, model_logps, 0.0),
        lengths=mask.sum(axis=1, dtype=jnp.int32),
        finish_reason=reason,
    )


def _constrain_cache(cache):
    """Rows over the data axes and KV heads over ``tensor`` (a no-op without a mesh): the group repeat must not
    gather the cache onto every device."""
    return cache.replace(
        k=tuple(constrain(k, ("batch", "kv_heads", "head_dim", "cache_seq")) for k in cache.k),
        v=tuple(constrain(v, ("batch", "kv_heads", "cache_seq", "head_dim")) for v in cache.v),
        valid=constrain(cache.valid, ("batch", "cache_seq")),
        positions=constrain(cache.positions, ("batch", "cache_seq")),
        lengths=constrain(cache.lengths, ("batch",)),
    )


def _completion_mask(tokens, eos, stops, max_new_tokens) -> jax.Array:
    """True up to and including the first EOS or the end of the first stop sequence."""
    rows = tokens.shape[0]
    is_end = jnp.isin(tokens, eos)
    for seq in stops:
        m = len(seq)
        if m > max_new_tokens:
            continue
        windows = jnp.stack([tokens[:, i : max_new_tokens - m + 1 + i] for i in range(m)], axis=-1)
        match = (windows == jnp.asarray(seq, jnp.int32)).all(-1)  # [R, N - m + 1]: a stop starting at t
        ends = jnp.zeros((rows, max_new_tokens), bool).at[:, m - 1 :].set(match)
        is_end = is_end | ends
    ended_before = jnp.cumsum(is_end, axis=1) - is_end  # ends strictly before t
    return ended_before == 0


@dataclasses.dataclass
class Sampler:
    """Generates from ``model`` (a ``CausalLM``); see the module docstring.

    Args:
      model: the policy; its parameters are read at every call (``update`` after training steps).
      eos_ids: ids that end a row (the tokenizer's ``eos_ids`` plus the template's end-of-turn).
      pad_id: written after a row ends and used to pad prompts.
      mesh: shard the cache (and so the decode) over it: batch over the data axes, heads over ``tensor``.
    """

    model: nnx.Module
    eos_ids: Sequence[int] = ()
    pad_id: int = 0
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.model)

    def update(self, model: nnx.Module) -> None:
        self.graphdef, self.state = nnx.split(model)

    def sample(
        self,
        prompt_ids: np.ndarray,
        prompt_mask: np.ndarray,
        *,
        key: jax.Array,
        max_new_tokens: int,
        n: int = 1,
        sampling: SamplingParams | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
    ) -> Rollout:
        sampling = sampling or SamplingParams()
        sampling.validate()
        prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
        if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(
                f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape}: expected [B, P] each"
            )
        if max_new_tokens < 1 or n < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} and n={n} must be >= 1")
        batch, length = prompt_ids.shape
        limit = self.model.cfg.max_seq_len
        if length + max_new_tokens > limit:
            raise ValueError(
                f"prompts of {length} tokens + max_new_tokens {max_new_tokens} exceed the model's max_seq_len {limit}"
            )
        bucket = min(prompt_bucket(length), limit - max_new_tokens)  # the last bucket ends at the context
        if bucket > length:  # more left padding: the same bucket, the same program
            pad = bucket - length
            prompt_ids = np.concatenate([np.full((batch, pad), self.pad_id, np.int32), prompt_ids], 1)
            prompt_mask = np.concatenate([np.zeros((batch, pad), np.int32), prompt_mask], 1)
        cache = self.model.init_cache(batch, bucket + max_new_tokens, mesh=self.mesh)
        if self.mesh is None:
            prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
        else:  # prompts arrive split over the data axes, like the cache
            rows = named_sharding(("batch", None), prompt_ids.shape, self.mesh)
            prompt_ids, prompt_mask = jax.device_put(prompt_ids, rows), jax.device_put(prompt_mask, rows)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return _generate(
                self.graphdef,
                self.state,
                prompt_ids,
                prompt_mask,
                cache,
                key,
                sampling.as_arrays(),
                n=n,
                max_new_tokens=max_new_tokens,
                eos_ids=tuple(int(e) for e in self.eos_ids),
                stops=_stop_table(stop_sequences),
                pad_id=int(self.pad_id),
            )
