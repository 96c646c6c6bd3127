"""Sampled groups, and DAPO's dynamic sampling: keep only groups whose rewards differ, refill from new rollouts.

A group whose samples all got the same reward has zero advantages: it costs a forward and a backward and
teaches nothing. With dynamic sampling (Yu et al. 2025, DAPO, arXiv:2503.14476, section 3.2) such groups
are dropped and the batch is refilled with informative groups from further rollouts of new prompts, at most
``rounds`` more; slots still empty after the last round are left out of the loss (and counted).

Everything has fixed shapes, so the same ``refill`` runs inside the fused iteration's ``lax.while_loop``
(device rewards: rounds continue only while slots are empty) and between the host-scored rounds of the
two-program iteration. Each iteration draws the prompts of every round up front, so its data position does
not depend on how many rounds it needed (a resumed run draws the same prompts).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_llm.rollout import Rollout

from .rl_data import Prompts


@struct.dataclass
class Scores:
    """Rewards of an iteration's ``R`` samples.

    Attributes:
      total: float32[R] the weighted sum of the components.
      valid: bool[R] the sample counts (False: a failing host reward excluded it, or an unfilled slot).
      components: ``{key: float32[R]}`` raw values; applies: ``{key: bool[R]}`` the value is real.
    """

    total: jax.Array
    valid: jax.Array
    components: dict[str, jax.Array]
    applies: dict[str, jax.Array]


@struct.dataclass
class Sampled:
    """``P`` prompts with their ``R = P * G`` scored completions (row ``i * G + j``: sample ``j`` of prompt ``i``),
    and ``ref_logps``: float32[R, N] the reference's log-probs of the completions when they were computed on
    a mesh of its own (``rl.reference_mesh``; None: the update computes them)."""

    prompts: Prompts
    rollout: Rollout
    scores: Scores
    ref_logps: jax.Array | None = None


def informative(scores: Scores, group_size: int) -> jax.Array:
    """bool[P]: the group's counted rewards are not all equal (its advantages are not all zero)."""
    total = scores.total.reshape(-1, group_size)
    valid = scores.valid.reshape(-1, group_size)
    high = jnp.where(valid, total, -jnp.inf).max(axis=1)
    low = jnp.where(valid, total, jnp.inf).min(axis=1)
    return valid.any(axis=1) & (high > low)


def _by_group(tree, prompts: int):
    """Every leaf ``[P * G, ...]`` or ``[P, ...]`` as ``[P, ...]``-leading (``[P, G, ...]`` for rows)."""
    return jax.tree.map(lambda x: x.reshape(prompts, -1, *x.shape[1:]), tree)


def _by_row(tree, like):
    return jax.tree.map(lambda x, y: x.reshape(y.shape), tree, like)


def refill(buffer: Sampled, filled: jax.Array, new: Sampled, group_size: int) -> tuple[Sampled, jax.Array]:
    """``buffer``'s slots from ``filled`` on take ``new``'s informative groups, in order; returns the buffer
    and the new count of filled slots (at most ``P``). ``refill(x, 0, x)`` moves ``x``'s informative groups
    to the front."""
    prompts = buffer.prompts.ids.shape[0]
    keep = informative(new.scores, group_size)
    order = jnp.argsort(~keep, stable=True)  # informative groups first, in their order
    slot = jnp.arange(prompts) - filled
    take = (slot >= 0) & (slot < keep.sum())
    source = order[jnp.clip(slot, 0, prompts - 1)]
    grouped_new, grouped_old = _by_group(new, prompts), _by_group(buffer, prompts)

    def pick(old, fresh):
        mask = take.reshape(-1, *(1,) * (old.ndim - 1))
        return jnp.where(mask, fresh[source], old)

    merged = jax.tree.map(pick, grouped_old, grouped_new)
    return _by_row(merged, buffer), jnp.minimum(filled + keep.sum(), prompts)


def mark_unfilled(sampled: Sampled, filled: jax.Array, group_size: int) -> Sampled:
    """Samples of slots no informative group filled no longer count."""
    slot = jnp.arange(sampled.scores.valid.shape[0]) // group_size
    return sampled.replace(scores=sampled.scores.replace(valid=sampled.scores.valid & (slot < filled)))


def round_prompts(prompts: Prompts, rounds: int, k) -> Prompts:
    """Round ``k``'s prompts out of an iteration's ``rounds * P`` (``k`` may be traced)."""
    return jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x.reshape(rounds, -1, *x.shape[1:]), k, 0, False), prompts
    )


@struct.dataclass
class _Filling:
    buffer: Sampled
    filled: jax.Array
    round: jax.Array


def sample_groups(
    sample_round: Callable[[Prompts, jax.Array], Sampled],
    prompts: Prompts,
    key: jax.Array,
    *,
    group_size: int,
    rounds: int,
) -> tuple[Sampled, dict[str, jax.Array]]:
    """Dynamic sampling inside one program: ``sample_round(prompts, key) -> Sampled`` on round 0's prompts,
    then on the next rounds' while slots are empty. ``prompts`` holds ``rounds`` batches of ``P``; round 0
    draws with ``key``, round ``k`` with ``fold_in(key, k)``."""
    first = sample_round(round_prompts(prompts, rounds, 0), key)
    buffer, filled = refill(first, jnp.zeros((), jnp.int32), first, group_size)
    slots = first.prompts.ids.shape[0]

    def cond(s: _Filling):
        return (s.filled < slots) & (s.round < rounds)

    def body(s: _Filling):
        new = sample_round(round_prompts(prompts, rounds, s.round), jax.random.fold_in(key, s.round))
        buffer, filled = refill(s.buffer, s.filled, new, group_size)
        return _Filling(buffer, filled, s.round + 1)

    done = jax.lax.while_loop(cond, body, _Filling(buffer, filled, jnp.ones((), jnp.int32)))
    metrics = filling_metrics(first, done.filled, done.round, group_size)
    return mark_unfilled(done.buffer, done.filled, group_size), metrics


def filling_metrics(first: Sampled, filled, rounds_run, group_size: int) -> dict[str, jax.Array]:
    slots = first.prompts.ids.shape[0]
    return {
        "dynamic_sampling/flat_groups": 1.0 - informative(first.scores, group_size).mean(dtype=jnp.float32),
        "dynamic_sampling/extra_rounds": jnp.asarray(rounds_run - 1, jnp.float32),
        "dynamic_sampling/unfilled": 1.0 - jnp.asarray(filled, jnp.float32) / slots,
    }
