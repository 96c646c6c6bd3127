"""Greedy decoding with a KV cache: one compiled program per (batch, prompt length, budget).

Used by evaluation (held-out exact match). The rollout issue's ``Sampler`` generalises it (sampling, groups,
log-probs); this is the deterministic core: prefill the left-padded prompts once, then one cached forward
per token in a ``lax.while_loop`` that stops when every row has produced an EOS id.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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


@partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "eos_ids"))
def _generate(
    graphdef, state, prompt_ids, prompt_mask, cache, *, max_new_tokens: int, eos_ids: tuple[int, ...]
):
    model = nnx.merge(graphdef, state)
    batch = prompt_ids.shape[0]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    out = model.forward(prompt_ids, attention_mask=prompt_mask, cache=cache)
    token = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~done.all()

    def body(carry):
        i, token, tokens, done, cache = carry
        out = model.forward(token[:, None], attention_mask=jnp.ones((batch, 1), jnp.int32), cache=cache)
        token = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        tokens = tokens.at[:, i].set(jnp.where(done, 0, token))
        return i + 1, token, tokens, done | jnp.isin(token, eos), out.cache

    _, _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, tokens, done, out.cache))
    return tokens


def greedy_generate(
    model: nnx.Module,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    mesh=None,
) -> list[list[int]]:
    """Greedy continuations of left-padded prompts, each cut after its first EOS id (which is kept)."""
    batch, width = prompt_ids.shape
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, width + max_new_tokens, mesh=mesh)
    eos = tuple(int(e) for e in eos_ids)
    tokens = np.asarray(
        _generate(
            graphdef,
            state,
            jnp.asarray(prompt_ids),
            jnp.asarray(prompt_mask),
            cache,
            max_new_tokens=max_new_tokens,
            eos_ids=eos,
        )
    )
    out = []
    for row in tokens.tolist():
        for j, t in enumerate(row):
            if t in eos:
                row = row[: j + 1]
                break
        out.append(row)
    return out
