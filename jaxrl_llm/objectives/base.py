"""``Objective``: what the step factory needs to know about a loss, and nothing about how it is stepped.

The step factory (``jaxrl_llm.train.step``) splits a batch into micro-batches and adds their gradients, so
an objective reports *sums*, never means: ``loss(model, micro_batch, rng) -> (loss_sum, sums)``. The
factory divides by ``normalizer(batch)`` computed once on the whole (global) batch, so that one step with
``grad_accum_steps = k`` equals one step on the k-times larger batch up to rounding, whatever the number
of target tokens in each micro-batch. ``summarize(sums, normalizer)`` turns the summed statistics into the
logged metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
from flax import nnx

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A trainable objective.

    Attributes:
      name: shown in logs.
      loss: ``(model, batch, rng) -> (loss_sum [], sums {name: []})``; sums of per-unit losses and of
        statistics over the batch's units (target tokens for SFT, pairs for DPO).
      normalizer: ``batch -> []`` the number of units in a (global) batch; the loss is ``loss_sum / it``.
      summarize: ``(sums, normalizer) -> metrics`` computed after accumulation.
    """

    name: str
    loss: LossFn
    normalizer: Callable[[Batch], jax.Array]
    summarize: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]
