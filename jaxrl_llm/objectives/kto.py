"""KTO as an ``Objective``: unpaired desirable / undesirable completions with a KL reference point.

A KTO batch (``data.pipeline`` ``mode="kto"``) has the pair batches' rows ``prompt | completion |
mismatched completion``: the example's own completion (its tokens targets) as side 0, another example's
completion from the same batch after the same prompt (the mismatched pair) as side 1; ``desirable`` [B] is
each example's label. The frozen reference's summed log-probs of both sides come from the step's
``frozen["reference"]`` (or a precomputed ``ref_logps`` [B, 2] in the batch). One
forward over ``B`` rows gives the policy's log-probs of the examples and of the mismatched pairs.

The KL reference point ``z = max(0, mean(policy_kl - ref_kl))`` averages over the batch's mismatched
pairs: the mean is over the *global* batch (the step sees the arrays of every data shard), so it is
gathered over data shards as TRL gathers it over processes; with gradient accumulation it is per
micro-batch, as in TRL. The loss is the mean over the batch's examples (TRL's ``losses.nanmean()``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import NO_MODELS, Batch, Frozen, Objective
from .pairs import pair_logps, reference_of, side_has_targets
from .preference import kto_loss


def example_mask(batch: Batch) -> jax.Array:
    """float32[B]: 1 for a real example (side 0 has targets), 0 for the batcher's filler."""
    return side_has_targets(batch)[:, 0].astype(jnp.float32)


def example_normalizer(batch: Batch) -> jax.Array:
    return jnp.maximum(example_mask(batch).sum(), 1.0)


def _summarize(sums: dict[str, jax.Array], examples: jax.Array) -> dict[str, jax.Array]:
    chosen = jnp.maximum(sums["desirable"], 1.0)
    rejected = jnp.maximum(sums["undesirable"], 1.0)
    return {
        "loss": sums["loss"] / examples,
        "rewards/chosen": sums["chosen_rewards"] / chosen,
        "rewards/rejected": sums["rejected_rewards"] / rejected,
        "rewards/margins": sums["chosen_rewards"] / chosen - sums["rejected_rewards"] / rejected,
        "rewards/accuracies": sums["accurate"] / examples,
        "logps/chosen": sums["chosen_logps"] / chosen,
        "logps/rejected": sums["rejected_logps"] / rejected,
        "kl": sums["kl"] / examples,
        "count/desirable": sums["desirable"],
        "count/undesirable": sums["undesirable"],
        "examples": examples,
    }


def kto_objective(
    *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> Objective:
    """KTO (``kto_loss``; Ethayarajh et al. 2024, arXiv:2402.01306) on a ``mode="kto"`` batch.

    Rewards are ``beta * (logps - ref_logps)`` of each example's completion; ``rewards/chosen`` averages
    them over the desirable examples, ``rewards/rejected`` over the undesirable ones;
    ``rewards/accuracies`` is the fraction of examples on their label's side of the reference point
    (a desirable one's reward above ``beta * z``, an undesirable one's below); ``kl`` is ``z``.
    """

    def loss(model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS):
        del rng
        logps, _, _ = pair_logps(model, batch)
        ref = reference_of(batch, frozen)
        real = example_mask(batch)
        has_kl = side_has_targets(batch)[:, 1].astype(jnp.float32) * real
        kl_mean = ((logps[:, 1] - ref[:, 1]) * has_kl).sum() / jnp.maximum(has_kl.sum(), 1.0)
        # kto_loss on every example in both roles; each row keeps the one its label picks. The reference
        # point is passed as a one-element KL batch: the masked mean above (filler rows left out).
        both, chosen_rewards, _, kl = kto_loss(
            logps[:, 0],
            logps[:, 0],
            kl_mean[None],
            ref[:, 0],
            ref[:, 0],
            jnp.zeros((1,), jnp.float32),
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )
        b = logps.shape[0]
        desirable = batch["desirable"].astype(bool)
        losses = jnp.where(desirable, both[:b], both[b:])
        rewards = chosen_rewards  # beta * (logps - ref) whatever the label
        good, bad = desirable.astype(jnp.float32) * real, (~desirable).astype(jnp.float32) * real
        accurate = jnp.where(desirable, rewards > beta * kl, rewards < beta * kl)
        sums = {
            "loss": (losses * real).sum(),
            "chosen_rewards": (rewards * good).sum(),
            "rejected_rewards": (rewards * bad).sum(),
            "accurate": (accurate * real).sum(),
            "chosen_logps": (logps[:, 0] * good).sum(),
            "rejected_logps": (logps[:, 0] * bad).sum(),
            "kl": kl * real.sum(),
            "desirable": good.sum(),
            "undesirable": bad.sum(),
        }
        return sums["loss"], sums

    return Objective("kto", loss, example_normalizer, _summarize)
