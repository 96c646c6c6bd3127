"""The policy update of the RL stages as an ``Objective``, and the GRPO family's presets.

An RL batch holds ``R`` sampled completions, each a row ``prompt | completion`` of ``W + N`` tokens:

- ``tokens`` int32[R, W + N]: the left-padded prompt (width ``W``) then the completion (``N`` slots);
- ``attention_mask`` bool[R, W + N]: real prompt tokens and generated tokens (padding after the end of a
  completion is neither attended to nor trained on);
- ``completion_mask`` bool[R, N]: the completion tokens the loss counts (generated, and of a sample that
  counts: a sample whose reward failed or, optionally, a truncated one, has none);
- ``advantages`` float32[R] (GRPO family) or [R, N] (PPO);
- ``sampler_logps`` float32[R, N]: the sampler's log-probs of the tokens under the distribution they were
  drawn from (``Rollout.logprobs``: the logits over the rollout temperature, top-k/top-p/min-p applied);
- ``old_logps`` float32[R, N], optional: the policy's log-probs before this iteration's updates. Absent when
  there is one update per iteration (``mu = 1``, one minibatch): the policy *is* the old policy then, and
  the loss uses ``stop_gradient(logps)``, which gives the same value and gradient without a second forward;
- ``ref_logps`` float32[R, N], optional: the frozen reference's, for the KL penalty (``beta > 0``).

The policy the loss trains is the one the rollouts sampled from: its logits are divided by the rollout
temperature (``PolicyLossConfig.temperature``) before the log-softmax, for the current, old and reference
log-probs alike, as TRL and verl do; otherwise a temperature above 1 would make every update off-policy.
The loss (``policy_token_losses`` + ``aggregate``) sees only arrays, never text. Rollout correction
(``rollout_is``): the sampler's and the trainer's log-probs of the same tokens differ (bf16 rollouts and fp32
updates, other devices, a lagging sampler); truncated importance sampling weights each token's loss by
``min(pi_old / pi_sampler, cap)``, per token or per sequence (Yao et al. 2025, "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training"), and the mismatch is reported either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .base import NO_MODELS, Batch, Frozen, Objective
from .policy import aggregate, entropy_from_logits, kl_penalty, policy_token_losses, value_loss
from .sft import token_logps

ROLLOUT_IS = ("none", "token", "sequence")

# The GRPO family as settings of one loss (``rl.algorithm``; every setting can still be overridden).
_GRPO = {
    "baseline": "group_mean",
    "scale": "group_std",
    "loss": "ppo_clip",
    "loss_agg": "seq_mean_token_mean",
    "importance_level": "token",
    "clip_low": 0.2,
    "clip_high": 0.2,
    "dynamic_sampling": False,
}
RL_ALGORITHMS: dict[str, dict[str, Any]] = {
    # Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300): group-normalised rewards, per-sequence token means.
    "grpo": _GRPO,
    # Liu et al. 2025 (arXiv:2503.20783): no std scaling, token sums over a constant length (no length bias).
    "dr_grpo": {**_GRPO, "scale": "none", "loss_agg": "seq_mean_token_sum_norm"},
    # Yu et al. 2025 (arXiv:2503.14476): clip-higher, token-level mean, dynamic sampling of informative groups.
    "dapo": {**_GRPO, "loss_agg": "token_mean", "clip_high": 0.28, "dynamic_sampling": True},
    # Zheng et al. 2025 (arXiv:2507.18071): sequence-level ratio, the paper's narrow clip range.
    "gspo": {**_GRPO, "importance_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4},
    # Ahmadian et al. 2024 (arXiv:2402.14740): leave-one-out baseline, no scaling.
    "rloo": {**_GRPO, "baseline": "leave_one_out", "scale": "none", "loss_agg": "token_mean"},
    # Hu 2025 (arXiv:2501.03262), REINFORCE++-baseline: group mean, then normalised over the whole batch.
    "reinforce_pp": {**_GRPO, "scale": "batch_std", "loss_agg": "token_mean"},
    # MiniMax-M1 (arXiv:2506.13585): clipped, stop-gradient IS weight times the log-prob; no lower clip, TRL's
    # epsilon_high 5 (an upper bound of 5 on the weight).
    "cispo": {**_GRPO, "loss": "cispo", "loss_agg": "token_mean", "clip_low": 1.0, "clip_high": 4.0},
}


# Stage ppo's policy-loss defaults (rl.algorithm does not apply; explicit rl.* keys still do).
PPO_DEFAULTS: dict[str, Any] = {
    **_GRPO,
    "loss_agg": "token_mean",
    "baseline": "none",
    "scale": "none",
}


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """How the policy update's loss is formed (see ``policy_token_losses`` and ``aggregate``)."""

    loss: str = "ppo_clip"
    loss_agg: str = "seq_mean_token_mean"
    importance_level: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    rollout_is: str = "none"
    rollout_is_cap: float = 2.0
    max_completion_length: int | None = None
    temperature: float = 1.0  # the rollouts' (greedy rollouts count as 1)

    def __post_init__(self):
        if self.rollout_is not in ROLLOUT_IS:
            raise ValueError(f"rollout_is={self.rollout_is!r}; valid: {', '.join(ROLLOUT_IS)}")


def completion_logps(model, batch: Batch, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """``(logps, entropy)`` float32[R, N] of each completion token under ``model`` at ``temperature``: one
    forward over the ``prompt | completion`` rows, the LM head applied only at the ``N`` positions that
    predict a completion token (the last prompt position and the completion's own, but its last)."""
    width = batch["tokens"].shape[1] - batch["completion_mask"].shape[1]
    hidden, _ = model.forward_hidden(batch["tokens"], attention_mask=batch["attention_mask"])
    logits = model.logits(hidden[:, width - 1 : -1])
    if temperature != 1.0:
        logits = logits / temperature
    return token_logps(logits, batch["tokens"][:, width:]), entropy_from_logits(logits)


def rollout_is_weights(old_logps, sampler_logps, mask, level: str, cap: float) -> jax.Array:
    """float32[R, N] truncated importance weights ``min(pi_old / pi_sampler, cap)`` (constants): per token,
    or one per sequence (the ratio of the sequences' likelihoods) broadcast to its tokens; 0 off the mask."""
    log_ratio = jnp.where(mask, old_logps - sampler_logps, 0.0)
    if level == "sequence":
        log_ratio = jnp.broadcast_to(log_ratio.sum(axis=1, keepdims=True), log_ratio.shape)
    weights = jnp.minimum(jnp.exp(log_ratio), cap)
    return jax.lax.stop_gradient(jnp.where(mask, weights, 0.0))


def _normalizer(cfg: PolicyLossConfig):
    def normalizer(batch: Batch) -> jax.Array:
        mask = batch["completion_mask"]
        _, count = aggregate(
            jnp.zeros(mask.shape, jnp.float32), mask, cfg.loss_agg, max_completion_length=mask.shape[1]
        )
        return jnp.maximum(count, 1.0)

    return normalizer


def _summarize(sums: dict[str, jax.Array], normalizer: jax.Array) -> dict[str, jax.Array]:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    out = {
        "loss": sums["loss"] / normalizer,
        "clip_frac/low": sums["clip_low"] / tokens,
        "clip_frac/high": sums["clip_high"] / tokens,
        "ratio/mean": sums["ratio_sum"] / tokens,
        "ratio/max": jnp.where(sums["tokens"] > 0, sums["max/ratio"], 1.0),
        "ratio/min": jnp.where(sums["tokens"] > 0, sums["min/ratio"], 1.0),
        "entropy": sums["entropy_sum"] / tokens,
        "rollout/mismatch_kl": sums["mismatch_kl_sum"] / tokens,
        "rollout/mismatch_max": jnp.maximum(sums["max/mismatch"], 0.0),
        "loss_tokens": sums["tokens"],
    }
    if "kl_sum" in sums:
        out["kl"] = sums["kl_sum"] / tokens
    if "is_weight_sum" in sums:
        out["rollout/is_weight"] = sums["is_weight_sum"] / tokens
    return out


def _policy_terms(model, batch: Batch, cfg: PolicyLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(per-token policy loss [R, N], summed statistics)`` of ``model`` on an RL batch."""
    logps, entropy = completion_logps(model, batch, cfg.temperature)
    mask = batch["completion_mask"].astype(bool)
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
    sampler = batch["sampler_logps"]
    weights = None
    if cfg.rollout_is != "none":
        weights = rollout_is_weights(old, sampler, mask, cfg.rollout_is, cfg.rollout_is_cap)
    per_token, stats = policy_token_losses(
        logps,
        old,
        batch["advantages"],
        mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        importance_level=cfg.importance_level,
        ref_logps=batch.get("ref_logps"),
        beta=cfg.beta,
        kl_estimator=cfg.kl_estimator,
        dual_clip=cfg.dual_clip,
        loss=cfg.loss,
        is_weights=weights,
    )
    on_mask = lambda x: jnp.where(mask, jax.lax.stop_gradient(x), 0.0)
    sums = {
        **stats,
        "entropy_sum": on_mask(entropy).sum(),
        # k3 of KL(sampler || trainer), estimated on the sampler's own draws: r - 1 - log r, r = old / sampler.
        "mismatch_kl_sum": on_mask(kl_penalty(sampler, old, "k3")).sum(),
        "max/mismatch": jnp.abs(on_mask(old - sampler)).max(),
    }
    if weights is not None:
        sums["is_weight_sum"] = weights.sum()
    return per_token, sums


def policy_objective(cfg: PolicyLossConfig) -> Objective:
    """The RL policy update on an RL batch (module docstring): ``policy_token_losses`` aggregated by
    ``cfg.loss_agg``, over the completion tokens the batch's ``completion_mask`` counts.

    Metrics: ``loss``, ``clip_frac/low|high``, ``ratio/mean|min|max``, ``entropy``, ``kl`` (with a
    reference), ``rollout/mismatch_kl`` (k3 between the sampler's and the trainer's log-probs of the same
    tokens, per token), ``rollout/mismatch_max`` (max |difference|), ``rollout/is_weight`` (the mean
    truncated IS weight, with ``rollout_is``) and ``loss_tokens``.
    """

    def loss(model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS):
        del rng, frozen  # the reference's log-probs come precomputed in the batch (one pass an iteration)
        per_token, sums = _policy_terms(model, batch, cfg)
        mask = batch["completion_mask"].astype(bool)
        numerator, _ = aggregate(
            per_token, mask, cfg.loss_agg, max_completion_length=cfg.max_completion_length or mask.shape[1]
        )
        return numerator, {"loss": numerator, **sums}

    return Objective("policy", loss, _normalizer(cfg), _summarize)


def completion_values(critic, batch: Batch) -> jax.Array:
    """float32[R, N] the critic's value of each completion token's state: its output at the position that
    predicts the token (the prompt's last, then the completion's own but its last), as the policy's
    log-probs are read."""
    width = batch["tokens"].shape[1] - batch["completion_mask"].shape[1]
    values = critic(batch["tokens"], attention_mask=batch["attention_mask"])
    return values[:, width - 1 : -1].astype(jnp.float32)


def ppo_objective(cfg: PolicyLossConfig, *, vf_coef: float = 0.1, value_clip: float = 0.2) -> Objective:
    """PPO (Schulman et al. 2017, arXiv:1707.06347) on an ``ActorCritic``: the clipped policy loss on per-token
    advantages plus ``vf_coef`` times the clipped value loss (``value_loss``) against the batch's ``returns``
    and ``old_values``, both means over the batch's completion tokens (TRL's ``masked_mean``; ``cfg.loss_agg``
    applies to the policy term). Metrics: the policy objective's, plus ``policy_loss``, ``value_loss``,
    ``value_clip_frac`` and ``value/mean``."""

    def loss(model, batch: Batch, rng: jax.Array, frozen: Frozen = NO_MODELS):
        del rng, frozen
        per_token, sums = _policy_terms(model.policy, batch, cfg)
        mask = batch["completion_mask"].astype(bool)
        policy_num, _ = aggregate(per_token, mask, "token_mean")
        values = completion_values(model.critic, batch)
        value_tokens, value_stats = value_loss(
            values, batch["old_values"], batch["returns"], mask, clip=value_clip
        )
        value_num, _ = aggregate(value_tokens, mask, "token_mean")
        total = policy_num + vf_coef * value_num
        return total, {
            "loss": total,
            **sums,
            "policy_loss": policy_num,
            "value_loss": value_num,
            "value_clip": value_stats["clip_count"],
            "value_sum": jnp.where(mask, jax.lax.stop_gradient(values), 0.0).sum(),
        }

    def summarize(sums: dict[str, jax.Array], normalizer: jax.Array) -> dict[str, jax.Array]:
        tokens = jnp.maximum(sums["tokens"], 1.0)
        return {
            **_summarize(sums, normalizer),
            "policy_loss": sums["policy_loss"] / normalizer,
            "value_loss": sums["value_loss"] / normalizer,
            "value_clip_frac": sums["value_clip"] / tokens,
            "value/mean": sums["value_sum"] / tokens,
        }

    token_mean = dataclasses.replace(cfg, loss_agg="token_mean")
    return Objective("ppo", loss, _normalizer(token_mean), summarize)
