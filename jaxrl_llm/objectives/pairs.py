"""Pairwise objectives (DPO and its variants, SimPO, ORPO, reward modelling) as ``Objective`` s.

A pair batch holds ``B`` preference pairs, one row each laid out ``prompt | chosen | rejected``
(``data.packing.pad_pair``): ``segment_ids`` 1 on the prompt, 2 on the chosen answer, 3 on the rejected
one; ``shared`` marks the prompt, which both answers attend to; each answer's ``positions`` continue from
the prompt's end. So one forward over ``B`` rows reads the prompt once and gives both answers exactly the
log-probs two separate ``prompt + answer`` forwards would (tested), with a quarter fewer tokens when
prompts and answers are as long; the step factory's micro-batches never split a pair. A completion's
log-prob is the sum over its target tokens (``loss_mask``: the answer) of the next-token log-probs, the
first one read at the prompt's last position (``pair_targets``); its mean divides by their count. A pair
with no target tokens on a side (the batcher's filler) counts for nothing.

DPO needs the frozen reference model's log-probs of both answers (summed, ``[B, 2]``): the batch carries them
as ``ref_logps`` when they were computed in one pass before training, else the loss computes them with the
step's ``frozen["reference"]`` model (``reference_logps``, no gradient).
The loss is the mean over the global batch's pairs; metrics follow TRL's names: ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .base import NO_MODELS, Batch, Frozen, Objective
from .preference import bradley_terry_loss, dpo_loss, orpo_loss, simpo_loss

SIDES = (2, 3)  # the answers' segment ids


def _forward(model, batch: Batch) -> jax.Array:
    return model(
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        shared=batch["shared"],
    )


def pair_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """``(source [B, T], weights [B, 2, T])``: token ``t`` is predicted by the logits at ``source[b, t]``
    (``t - 1``, or the prompt's last position for an answer's first token) and is a target of side ``s``
    where ``weights[b, s, t]``."""
    seg = batch["segment_ids"]
    t = seg.shape[-1]
    index = jnp.arange(t, dtype=jnp.int32)
    prompt_end = (seg == 1).sum(-1, dtype=jnp.int32)  # the prompt starts the row
    previous = jnp.concatenate([jnp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
    first = (seg != previous) & (seg > 1)  # an answer's first token
    source = jnp.where(first, prompt_end[:, None] - 1, index[None, :] - 1)
    has_source = (source >= 0) & (seg > 0)
    mask = batch["loss_mask"].astype(bool) & has_source
    weights = jnp.stack([mask & (seg == s) for s in SIDES], axis=1)
    return jnp.maximum(source, 0), weights


def pair_logps(model, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(summed log-probs [B, 2], target counts [B, 2], correctly predicted counts [B, 2])`` of both sides."""
    logits = _forward(model, batch).astype(jnp.float32)  # [B, T, V]
    source, weights = pair_targets(batch)
    rows = jnp.arange(logits.shape[0])[:, None]
    picked = logits[rows, source, batch["tokens"]]  # [B, T]
    lse = jax.nn.logsumexp(logits, axis=-1)[rows, source]
    best = jnp.argmax(logits, axis=-1)[rows, source]
    weights = weights.astype(jnp.float32)
    logps = ((picked - lse)[:, None, :] * weights).sum(-1)
    correct = ((best == batch["tokens"])[:, None, :] * weights).sum(-1)
    return logps, weights.sum(-1), correct


def side_has_targets(batch: Batch) -> jax.Array:
    """bool[B, 2]: whether each answer of a row has target tokens."""
    mask, seg = batch["loss_mask"].astype(bool), batch["segment_ids"]
    return jnp.stack([(mask & (seg == s)).any(-1) for s in SIDES], axis=1)


def pair_mask(batch: Batch) -> jax.Array:
    """float32[B]: 1 for a real pair (both sides have target tokens), 0 for filler."""
    has = side_has_targets(batch)
    return (has[:, 0] & has[:, 1]).astype(jnp.float32)


def pair_normalizer(batch: Batch) -> jax.Array:
    """Number of real pairs in the (global) batch, at least 1."""
    return jnp.maximum(pair_mask(batch).sum(), 1.0)


def _pair_sums(real, losses, chosen_rewards, rejected_rewards, logps) -> dict[str, jax.Array]:
    return {
        "loss": (losses * real).sum(),
        "chosen_rewards": (chosen_rewards * real).sum(),
        "rejected_rewards": (rejected_rewards * real).sum(),
        "accurate": ((chosen_rewards > rejected_rewards) * real).sum(),
        "chosen_logps": (logps[:, 0] * real).sum(),
        "rejected_logps": (logps[:, 1] * real).sum(),
    }


def pair_summarize(sums: dict[str, jax.Array], pairs: jax.Array) -> dict[str, jax.Array]:
    out = {
        "loss": sums["loss"] / pairs,
        "rewards/chosen": sums["chosen_rewards"] / pairs,
        "rewards/rejected": sums["rejected_rewards"] / pairs,
        "rewards/margins": (sums["chosen_rewards"] - sums["rejected_rewards"]) / pairs,
        "rewards/accuracies": sums["accurate"] / pairs,
        "logps/chosen": sums["chosen_logps"] / pairs,
        "logps/rejected": sums["rejected_logps"] / pairs,
        "pairs": pairs,
    }
    if "nll" in sums:
        out["nll"] = sums["nll"] / pairs
    return out


def _objective(name: str, loss: Callable) -> Objective:
    return Objective(name, loss, pair_normalizer, pair_summarize)


def dpo_objective(
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    sft_weight: float = 0.0,
) -> Objective:
    """DPO (``dpo_loss``; Rafailov et al. 2023, arXiv:2305.18290) against the reference (``reference_of``).

    ``reference_free`` uses a reference of log-prob 0 (no ``ref_logps`` needed); ``ipo`` gets length-averaged
    log-probs (policy and reference), as the IPO paper defines it; ``sft_weight`` adds that times the
    chosen answers' mean token NLL per pair (RPO, Pang et al. 2024).
    """

    def loss(model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS):
        del rng
        logps, counts, _ = pair_logps(model, batch)
        ref = jnp.zeros_like(logps) if reference_free else reference_of(batch, frozen)
        if loss_type == "ipo":
            scale = jnp.maximum(counts, 1.0)
            policy, reference = logps / scale, ref / scale
        else:
            policy, reference = logps, ref
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:, 0],
            policy[:, 1],
            reference[:, 0],
            reference[:, 1],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        real = pair_mask(batch)
        sums = _pair_sums(real, losses, chosen_rewards, rejected_rewards, logps)
        total = sums["loss"]
        if sft_weight:
            nll = (-logps[:, 0] / jnp.maximum(counts[:, 0], 1.0) * real).sum()
            sums["nll"] = nll
            total = total + sft_weight * nll
            sums["loss"] = total
        return total, sums

    return _objective("dpo", loss)


def simpo_objective(*, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> Objective:
    """SimPO (``simpo_loss``; Meng et al. 2024, arXiv:2405.14734): length-averaged log-probs, no reference.
    Rewards are ``beta`` times the mean log-probs."""

    def loss(model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS):
        del rng
        logps, counts, _ = pair_logps(model, batch)
        mean = logps / jnp.maximum(counts, 1.0)
        losses = simpo_loss(mean[:, 0], mean[:, 1], beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        sums = _pair_sums(pair_mask(batch), losses, beta * mean[:, 0], beta * mean[:, 1], logps)
        return sums["loss"], sums

    return _objective("simpo", loss)


def orpo_objective(*, beta: float = 0.1) -> Objective:
    """ORPO (Hong et al. 2024, arXiv:2403.07691): the chosen answers' mean token NLL plus ``orpo_loss``'s
    odds-ratio term, per pair. Rewards are ``beta`` times the mean log-probs (TRL's convention)."""

    def loss(model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS):
        del rng
        logps, counts, _ = pair_logps(model, batch)
        mean = logps / jnp.maximum(counts, 1.0)
        ratio_losses, _ = orpo_loss(mean[:, 0], mean[:, 1], beta=beta)
        nll = -mean[:, 0]
        real = pair_mask(batch)
        sums = _pair_sums(real, nll + ratio_losses, beta * mean[:, 0], beta * mean[:, 1], logps)
        sums["nll"] = (nll * real).sum()
        return sums["loss"], sums

    return _objective("orpo", loss)


def last_token_scores(model, batch: Batch) -> jax.Array:
    """float32[B, 2]: a score model's output at each answer's last token (that of ``prompt + answer``)."""
    scores = _forward(model, batch)
    seg = batch["segment_ids"]
    index = jnp.arange(seg.shape[-1], dtype=jnp.int32)
    last = jnp.stack([jnp.max(jnp.where(seg == s, index, 0), axis=-1) for s in SIDES], axis=1)
    return jnp.take_along_axis(scores, last, axis=-1).astype(jnp.float32)


def rm_objective(*, center_coef: float = 0.0) -> Objective:
    """Reward modelling: Bradley-Terry on a score model's last-token scores (``bradley_terry_loss``;
    ``batch["margin"]`` [B] when present). Rewards are the scores; accuracy is the pairwise accuracy."""

    def loss(model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS):
        del rng
        scores = last_token_scores(model, batch)
        margin = batch.get("margin")
        losses = bradley_terry_loss(scores[:, 0], scores[:, 1], margin=margin, center_coef=center_coef)
        sums = _pair_sums(pair_mask(batch), losses, scores[:, 0], scores[:, 1], jnp.zeros_like(scores))
        return sums["loss"], sums

    return _objective("rm", loss)


def reference_logps(model, batch: Batch) -> jax.Array:
    """float32[B, 2]: summed completion log-probs of both sides under ``model`` (the frozen reference):
    what ``dpo_objective`` and ``kto_objective`` read as ``batch["ref_logps"]`` when precomputed."""
    logps, _, _ = pair_logps(model, batch)
    return jax.lax.stop_gradient(logps)


def reference_of(batch: Batch, frozen: Frozen) -> jax.Array:
    """float32[B, 2]: the batch's precomputed ``ref_logps``, else ``frozen["reference"]``'s log-probs now."""
    if "ref_logps" in batch:
        return batch["ref_logps"].astype(jnp.float32)
    if "reference" not in frozen:
        raise ValueError("the objective needs ref_logps in the batch or a frozen 'reference' model")
    return reference_logps(frozen["reference"], batch)
