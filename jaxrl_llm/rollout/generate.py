"""Generation as one pure function: ``generate(graphdef, params, prompt_ids, prompt_mask, key, sampling, ...)``.

1. an empty KV cache (prompt width + ``max_new_tokens`` slots, or ``cache_len``) is created inside the program;
2. one batched prefill writes the prompts into it; for ``n`` samples per prompt the cache is then repeated
   row-wise (row ``i * n + j`` = sample ``j`` of prompt ``i``), never re-prefilled;
3. a ``lax.while_loop`` over a ``DecodeState`` decodes one token per step for every row, and exits as soon
   as every row is done (an EOS id, a stop token sequence, or ``max_new_tokens``).

It is not jitted here: ``Sampler`` jits it for host callers, and an RL iteration calls it inside its own
compiled program. Sampling parameters are traced (``SamplingParams`` is a pytree of scalars): changing them
does not recompile. Each row draws with its own key, ``fold_in(key, row)``, so a row's output depends on its
prompt, its index and the key, never on the other rows. Prompts may be left- or right-padded
(``prompt_mask`` marks real tokens): each row's first new token follows its last real prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..models.cache import KVCache
from ..parallel import constrain
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


@struct.dataclass
class DecodeState:
    """The decode loop's carry: what one step reads and writes.

    Attributes:
      step: int32[] tokens drawn so far (the column the next token is written to).
      token: int32[R] the last drawn token (the next forward's input).
      cache: the KV cache, prompt and generated tokens so far.
      tokens, logprobs, model_logprobs: [R, N] what has been drawn (``pad_id`` / 0 after a row ends).
      history: int32[R, W] each row's last W tokens (W: the longest stop sequence), newest last.
      done: bool[R] the row has ended; reason: int32[R] why (``FINISH_REASONS``; 0 while running).
    """

    step: jax.Array
    token: jax.Array
    cache: KVCache
    tokens: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    history: jax.Array
    done: jax.Array
    reason: jax.Array


def stop_table(stop_sequences: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Stop sequences as a hashable table (a static argument of ``generate``)."""
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


def _constrain_cache(cache: KVCache) -> KVCache:
    """Rows over the data axes and KV heads over ``tensor`` (a no-op without a mesh): the cache is made and
    repeated inside the program, and must never be gathered onto every device."""
    return cache.replace(
        k=tuple(constrain(k, ("batch", "kv_heads", "head_dim", "cache_seq")) for k in cache.k),
        v=tuple(constrain(v, ("batch", "kv_heads", "cache_seq", "head_dim")) for v in cache.v),
        valid=constrain(cache.valid, ("batch", "cache_seq")),
        positions=constrain(cache.positions, ("batch", "cache_seq")),
        lengths=constrain(cache.lengths, ("batch",)),
    )


def completion_mask(tokens, eos, stops, max_new_tokens) -> jax.Array:
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


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    sampling: SamplingParams,
    *,
    n: int = 1,
    max_new_tokens: int,
    eos_ids: tuple[int, ...] = (),
    stops: tuple[tuple[int, ...], ...] = (),
    pad_id: int = 0,
    cache_len: int | None = None,
) -> Rollout:
    """``n`` completions of at most ``max_new_tokens`` for each of the ``B`` prompts (see the module docstring).

    Args:
      graphdef, params: the policy (``nnx.split`` of a ``CausalLM``; a training state's params work).
      prompt_ids, prompt_mask: int32[B, P]; mask 1 on real tokens.
      key: the PRNG key; row ``r`` draws with ``fold_in(key, r)``, step ``s`` with a further ``fold_in(s)``.
      sampling: ``SamplingParams`` (``as_arrays()`` so the dtypes, and the program, never change).
      eos_ids, stops, pad_id: static: what ends a row, and what fills it after.
      cache_len: static: the KV cache's slot count, at least ``P + max_new_tokens`` (the slots written);
        ``None`` for exactly that. A longer cache (one sized for a longer request) gives the same tokens:
        the slots never written are masked out.
    """
    batch, width = prompt_ids.shape
    if cache_len is None:
        cache_len = width + max_new_tokens
    elif cache_len < width + max_new_tokens:
        raise ValueError(
            f"cache_len {cache_len} is smaller than the prompt width {width} + max_new_tokens {max_new_tokens}: "
            f"the generation writes {width + max_new_tokens} cache slots"
        )
    model = nnx.merge(graphdef, params)
    layers = model.layer_states()  # sliced once: inside the loop every slice would copy the weights again
    cache = _constrain_cache(model.init_cache(batch, cache_len))
    hidden, cache = model.forward_hidden(prompt_ids, attention_mask=prompt_mask, cache=cache, layers=layers)
    rows = batch * n
    cache = _constrain_cache(cache.repeat_rows(n))
    # Each row's next token follows its last real prompt token (the last column only when left-padded); the
    # LM head runs on that position alone.
    last = jnp.max(jnp.where(prompt_mask > 0, jnp.arange(width), 0), axis=1)
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]
    logits = jnp.repeat(logits, n, axis=0)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def draw(step, logits):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        token, logp, model_logp = jax.vmap(lambda k, lg: sample(k, lg[None], sampling))(keys, logits)
        return token[:, 0], logp[:, 0], model_logp[:, 0]

    def record(s: DecodeState, token, logp, model_logp) -> DecodeState:
        live = ~s.done
        history = jnp.concatenate([s.history[:, 1:], token[:, None]], axis=1)
        is_eos = jnp.isin(token, eos)
        is_stop = _ends_with_stop(history, stops) if stops else jnp.zeros_like(s.done)
        return s.replace(
            step=s.step + 1,
            token=token,
            tokens=s.tokens.at[:, s.step].set(jnp.where(live, token, pad_id)),
            logprobs=s.logprobs.at[:, s.step].set(jnp.where(live, logp, 0.0)),
            model_logprobs=s.model_logprobs.at[:, s.step].set(jnp.where(live, model_logp, 0.0)),
            history=history,
            done=s.done | is_eos | is_stop,
            reason=jnp.where(live & is_eos, 1, jnp.where(live & is_stop, 2, s.reason)),
        )

    def by_row(x):
        return constrain(x, ("batch",) + (None,) * (x.ndim - 1))

    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        token=by_row(jnp.zeros((rows,), jnp.int32)),
        cache=cache,
        tokens=by_row(jnp.full((rows, max_new_tokens), pad_id, jnp.int32)),
        logprobs=by_row(jnp.zeros((rows, max_new_tokens), jnp.float32)),
        model_logprobs=by_row(jnp.zeros((rows, max_new_tokens), jnp.float32)),
        history=by_row(jnp.full((rows, max((len(s) for s in stops), default=1)), -1, jnp.int32)),
        done=by_row(jnp.zeros((rows,), bool)),
        reason=by_row(jnp.zeros((rows,), jnp.int32)),
    )
    state = record(state, *draw(0, logits))

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~s.done.all()

    def body(s: DecodeState) -> DecodeState:
        out = model.forward(
            s.token[:, None], attention_mask=jnp.ones((rows, 1), jnp.int32), cache=s.cache, layers=layers
        )
        return record(s.replace(cache=out.cache), *draw(s.step, out.logits[:, -1]))

    state = jax.lax.while_loop(cond, body, state)
    mask = completion_mask(state.tokens, eos, stops, max_new_tokens)
    return Rollout(
        tokens=state.tokens,
        completion_mask=mask,
        logprobs=jnp.where(mask, state.logprobs, 0.0),
        model_logprobs=jnp.where(mask, state.model_logprobs, 0.0),
        lengths=mask.sum(axis=1, dtype=jnp.int32),
        finish_reason=state.reason,
    )
