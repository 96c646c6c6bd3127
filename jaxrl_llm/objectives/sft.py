"""Supervised fine-tuning (and continued pre-training): masked next-token cross-entropy.

    loss = - sum_{b,t} w[b,t] log p(tokens[b,t+1] | tokens[b,:t+1]) / sum_{b,t} w[b,t]

``w`` is 1 where token ``t + 1`` is a target (``loss_mask``) in the same packed document as token ``t``
(``jaxrl_llm.data.packing.next_token_targets``). The mean is over the target tokens of the whole global
batch, not per row or per micro-batch: a long answer weighs as many tokens as it has, and gradient
accumulation gives the same step as one large batch. Raw text (``stage=pt``) is the same loss with every
token a target. Log-softmax runs in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.data.packing import next_token_targets

from .base import NO_MODELS, Batch, Frozen, Objective


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32[B, T]: ``log softmax(logits)[b, t, targets[b, t]]``, computed in float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    return next_token_targets(batch["tokens"], batch["loss_mask"].astype(bool), batch["segment_ids"])


def sft_loss(
    model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed target-token NLL of a packed row batch, with the count of correctly predicted targets."""
    del rng, frozen  # deterministic: the decoder has no dropout
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    targets, weights = _targets(batch)
    logits = logits[:, :-1]
    weights = weights.astype(jnp.float32)
    nll_sum = -(token_logps(logits, targets) * weights).sum()
    correct = ((jnp.argmax(logits, axis=-1) == targets) * weights).sum()
    return nll_sum, {"nll": nll_sum, "correct": correct}


def sft_normalizer(batch: Batch) -> jax.Array:
    """Number of target tokens in the batch (at least 1, so an all-padding batch gives loss 0, not NaN)."""
    _, weights = _targets(batch)
    return jnp.maximum(weights.sum(dtype=jnp.float32), 1.0)


def sft_summarize(sums: dict[str, jax.Array], normalizer: jax.Array) -> dict[str, jax.Array]:
    return {
        "loss": sums["nll"] / normalizer,
        "token_accuracy": sums["correct"] / normalizer,
        "target_tokens": normalizer,
    }


def sft_objective() -> Objective:
    return Objective("sft", sft_loss, sft_normalizer, sft_summarize)
