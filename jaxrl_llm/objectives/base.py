"""``Objective``: what the step factory needs to know about a loss, and nothing about how it is stepped.

The step factory (``jaxrl_llm.train.step``) splits a batch into micro-batches and adds their gradients, so
an objective reports *sums*, never means: ``loss(model, micro_batch, rng, frozen) -> (loss_sum, sums)``. The
factory divides by ``normalizer(batch)`` computed once on the whole (global) batch, so that one step with
``grad_accum_steps = k`` equals one step on the k-times larger batch up to rounding, whatever the number
of target tokens in each micro-batch. ``summarize(sums, normalizer)`` turns the summed statistics into the
logged metrics. A statistic whose key starts with ``max/`` or ``min/`` is an extreme, combined across
micro-batches with ``max`` / ``min`` instead of ``+``.

``frozen`` maps names to the models a loss reads but never trains (``"reference"``: DPO's and KTO's frozen
initial policy; RL's reference for the KL term): separate arguments of the step, never nested inside the
policy (the architecture's second principle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Batch = Mapping[str, jax.Array]
Frozen = Mapping[str, nnx.Module]
NO_MODELS: Frozen = MappingProxyType({})  # a loss called without frozen models
LossFn = Callable[[nnx.Module, Batch, jax.Array, Frozen], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A trainable objective.

    Attributes:
      name: shown in logs.
      loss: ``(model, batch, rng, frozen) -> (loss_sum [], sums {name: []})``; sums of per-unit losses and
        of statistics over the batch's units (target tokens for SFT, pairs for DPO).
      normalizer: ``batch -> []`` the number of units in a (global) batch; the loss is ``loss_sum / it``.
      summarize: ``(sums, normalizer) -> metrics`` computed after accumulation.
    """

    name: str
    loss: LossFn
    normalizer: Callable[[Batch], jax.Array]
    summarize: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]


def identity_sums(shapes: dict[str, Any]) -> dict[str, jax.Array]:
    """What ``combine_sums`` starts from: 0 for sums, -inf for ``max/...``, +inf for ``min/...``."""

    def one(key: str, shape: Any) -> jax.Array:
        fill = -jnp.inf if key.startswith("max/") else jnp.inf if key.startswith("min/") else 0
        return jnp.full(shape.shape, fill, shape.dtype)

    return {k: one(k, v) for k, v in shapes.items()}


def combine_sums(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Two micro-batches' statistics as one batch's: added, except ``max/...`` and ``min/...`` extremes."""

    def one(key: str, x: jax.Array, y: jax.Array) -> jax.Array:
        if key.startswith("max/"):
            return jnp.maximum(x, y)
        if key.startswith("min/"):
            return jnp.minimum(x, y)
        return x + y

    return {k: one(k, a[k], b[k]) for k in a}
