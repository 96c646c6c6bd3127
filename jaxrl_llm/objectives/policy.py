"""Policy-gradient and value losses for RL post-training: per-token, unreduced, jittable float32.

``policy_token_losses`` gives the per-token surrogate loss (PPO-clip with DAPO's asymmetric clip and
dual-clip, or CISPO; token- or sequence-level (GSPO) importance ratios; optional KL penalty and rollout
importance weights) and *summed* statistics; ``aggregate`` reduces per-token losses to a
``(numerator, denominator)`` pair that adds up over micro-batches; ``policy_loss`` does both and divides, for
a single batch. ``value_loss`` is PPO's clipped value loss.

The formulas follow TRL 1.16's ``GRPOTrainer._compute_loss`` (``trl/trainer/grpo_trainer.py`` 3020-3290) and
are compared with that code in ``tests/test_objectives_rl.py``; where they differ, the docstrings say so.
Notation: ``logps`` [N, T] are the policy's per-token log-probs of the sampled completion (the only input
differentiated), ``old_logps`` the sampling policy's, ``ref_logps`` the frozen reference's; ``mask`` [N, T]
marks the completion tokens the loss counts.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .advantages import check_option

__all__ = [
    "IMPORTANCE_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_AGGS",
    "POLICY_LOSSES",
    "aggregate",
    "entropy_from_logits",
    "kl_penalty",
    "policy_loss",
    "policy_token_losses",
    "value_loss",
]

LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
POLICY_LOSSES = ("ppo_clip", "cispo")
IMPORTANCE_LEVELS = ("token", "sequence")

_f32 = jnp.float32


def kl_penalty(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k3") -> jax.Array:
    """float32, the inputs' shape: a per-token estimate of KL(pi || pi_ref) from samples of pi.

    With ``d = ref_logps - logps`` (Schulman 2020, "Approximating KL divergence",
    http://joschu.net/blog/kl-approx.html): ``k1 = -d`` (unbiased, can be negative), ``k2 = d^2 / 2``
    (biased, low variance), ``k3 = exp(d) - d - 1`` (unbiased, >= 0; GRPO's penalty). Unclamped, as in
    TRL; k3 uses its Taylor series for ``|d| < 0.5``, where ``exp(d) - 1 - d`` loses float32 digits to
    cancellation (all of them as d -> 0; the series' truncation error is below 5e-8 relative there).
    """
    check_option("kl_estimator", estimator, KL_ESTIMATORS)
    d = jnp.asarray(ref_logps, _f32) - jnp.asarray(logps, _f32)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    series = jnp.zeros_like(d)
    for k in range(8, 1, -1):  # Horner: sum_{k=2..8} d^k / k!
        series = (series + 1 / math.factorial(k)) * d
    return jnp.where(jnp.abs(d) < 0.5, series * d, jnp.expm1(d) - d)


def _log_ratio(logps, old_logps, mask, level: str) -> jax.Array:
    """[N, T] log importance ratio; ``sequence`` (GSPO) broadcasts each row's masked mean to its tokens."""
    log_ratio = jnp.where(mask, logps - old_logps, 0.0)
    if level == "token":
        return log_ratio
    tokens = jnp.maximum(mask.sum(axis=1, keepdims=True, dtype=_f32), 1.0)
    return jnp.broadcast_to(log_ratio.sum(axis=1, keepdims=True) / tokens, log_ratio.shape)


def policy_token_losses(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    importance_level: str = "token",
    ref_logps: jax.Array | None = None,
    beta: Any = 0.0,
    kl_estimator: str = "k3",
    dual_clip: float | None = None,
    loss: str = "ppo_clip",
    is_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token policy loss float32[N, T] (0 where ``mask`` is False) and summed statistics.

    With ``r = exp(logps - old_logps)`` and ``A`` the advantage (per row [N] or per token [N, T]):

    - ``ppo_clip`` (Schulman et al. 2017, arXiv:1707.06347):
      ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``; ``clip_low != clip_high`` is DAPO's
      clip-higher (Yu et al. 2025, arXiv:2503.14476). ``dual_clip=c > 1`` (Ye et al. 2020,
      arXiv:1912.09729) caps the loss of a negative-advantage token at ``-c A``: ``min(loss, -c A)`` where
      ``A < 0``, as verl does.
    - ``cispo`` (MiniMax-M1, arXiv:2506.13585): ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) A logps``; the
      clipped ratio only weights the REINFORCE gradient, so clipped tokens still get one. TRL 1.16 (line
      3110) clamps only from above and at ``epsilon_high`` itself, ``clamp(r, max=epsilon_high)``; TRL's
      ``epsilon_high=E`` is ``clip_high=E - 1, clip_low=1`` here.
    - ``importance_level="sequence"`` (GSPO, Zheng et al. 2025, arXiv:2507.18071): ``log r`` is the masked
      mean over the row's tokens of ``logps - old_logps``, one value per row broadcast to its tokens, as TRL
      (lines 3086-3088).
    - ``is_weights`` [N, T] (truncated importance weights of rollout correction; constants) multiply each
      token's policy loss, before the KL term is added (TRL's ``importance_sampling_ratio``, line 3147).
    - ``beta > 0`` adds ``beta * kl_penalty(logps, ref_logps, kl_estimator)`` per token (TRL adds k3 the same
      way; its ``use_bias_correction_kl`` is not offered).

    Statistics (sums and counts over masked tokens, so they add up over micro-batches): ``tokens``,
    ``clip_low`` (``r < 1 - clip_low`` and ``A < 0``), ``clip_high`` (``r > 1 + clip_high`` and ``A > 0``),
    ``ratio_sum``, ``kl_sum`` when ``ref_logps`` is given, and the extremes ``max/ratio`` and ``min/ratio``
    (-inf / +inf without tokens), whose prefix tells ``base.combine_sums`` to combine them by max / min.
    With sequence ratios the clip counts are per token (each row's tokens share its ratio); TRL counts
    sequences there.
    """
    check_option("importance_level", importance_level, IMPORTANCE_LEVELS)
    check_option("loss", loss, POLICY_LOSSES)
    check_option("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (a cap of -c*A on negative advantages), got {dual_clip}")
    beta_is_zero = isinstance(beta, (int, float)) and beta == 0
    if ref_logps is None and not beta_is_zero:
        raise ValueError(f"beta={beta} adds a KL penalty to the reference policy: pass ref_logps")
    mask = jnp.asarray(mask, bool)
    # Padding may hold garbage (inf log-probs, NaN advantages): zeroed inputs keep it out of the gradient,
    # where masking only the output would still give 0 * inf = NaN there.
    clean = lambda x: jnp.where(mask, jnp.broadcast_to(jnp.asarray(x, _f32), mask.shape), 0.0)
    adv = jnp.asarray(advantages, _f32)
    adv = clean(adv[:, None] if adv.ndim == 1 else adv)
    logps, old_logps = clean(logps), clean(old_logps)

    ratio = jnp.exp(_log_ratio(logps, old_logps, mask, importance_level))
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    if loss == "cispo":
        per_token = -jax.lax.stop_gradient(clipped) * adv * logps
    else:
        per_token = -jnp.minimum(ratio * adv, clipped * adv)
        if dual_clip is not None:
            per_token = jnp.where(adv < 0, jnp.minimum(per_token, -dual_clip * adv), per_token)
    if is_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(clean(is_weights))
    if ref_logps is not None:
        kl = kl_penalty(logps, clean(ref_logps), kl_estimator)
        if not beta_is_zero:
            per_token = per_token + beta * kl
    per_token = jnp.where(mask, per_token, 0.0)

    count = lambda x: (x & mask).sum(dtype=_f32)
    sr = jax.lax.stop_gradient(ratio)
    stats = {
        "tokens": mask.sum(dtype=_f32),
        "clip_low": count((sr < 1.0 - clip_low) & (adv < 0)),
        "clip_high": count((sr > 1.0 + clip_high) & (adv > 0)),
        "ratio_sum": jnp.where(mask, sr, 0.0).sum(),
        "max/ratio": jnp.where(mask, sr, -jnp.inf).max(),
        "min/ratio": jnp.where(mask, sr, jnp.inf).min(),
    }
    if ref_logps is not None:
        stats["kl_sum"] = jnp.where(mask, jax.lax.stop_gradient(kl), 0.0).sum()
    return per_token, stats


def aggregate(
    per_token: jax.Array, mask: jax.Array, loss_agg: str, *, max_completion_length: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(numerator [], denominator []) float32, loss = numerator / denominator; both add over micro-batches.

    - ``seq_mean_token_mean`` (GRPO): each row's token mean, averaged over rows with at least one token.
      TRL's ``grpo`` (line 3154) averages over *all* rows (an empty row counts as a 0 loss) and over
      micro-batches by dividing by the accumulation steps, which equals this only when every micro-batch
      has as many non-empty rows.
    - ``token_mean`` (DAPO): the mean over all masked tokens of the batch (TRL's ``dapo``/``cispo`` with its
      ``num_items_in_batch`` normaliser; TRL's ``bnpo`` is the same per micro-batch).
    - ``seq_mean_token_sum_norm`` (Dr.GRPO): the token sum divided by ``max_completion_length``, averaged over
      all rows (TRL's ``dr_grpo``).

    The denominator is the raw count (0 for an empty micro-batch); divide by ``max(sum, 1)``.
    """
    check_option("loss_agg", loss_agg, LOSS_AGGS)
    mask = jnp.asarray(mask, bool)
    per_token = jnp.where(mask, jnp.asarray(per_token, _f32), 0.0)
    row_sum = per_token.sum(axis=1)
    row_tokens = mask.sum(axis=1, dtype=_f32)
    if loss_agg == "seq_mean_token_mean":
        return (row_sum / jnp.maximum(row_tokens, 1.0)).sum(), (row_tokens > 0).sum(dtype=_f32)
    if loss_agg == "token_mean":
        return row_sum.sum(), row_tokens.sum()
    if max_completion_length is None:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' (Dr.GRPO) needs max_completion_length")
    return row_sum.sum() / max_completion_length, jnp.asarray(mask.shape[0], _f32)


def policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: str = "seq_mean_token_mean",
    importance_level: str = "token",
    ref_logps: jax.Array | None = None,
    beta: Any = 0.0,
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
    dual_clip: float | None = None,
    loss: str = "ppo_clip",
    is_weights: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [], metrics) for one batch: ``policy_token_losses`` reduced by ``aggregate``.

    Metrics are means over masked tokens: ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, and the
    extremes ``ratio_min``/``ratio_max`` (1 without tokens); ``kl`` when ``ref_logps`` is given; ``entropy``
    (the masked mean of the given per-token entropy [N, T]) when given.
    """
    per_token, stats = policy_token_losses(
        logps,
        old_logps,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        importance_level=importance_level,
        ref_logps=ref_logps,
        beta=beta,
        kl_estimator=kl_estimator,
        dual_clip=dual_clip,
        loss=loss,
        is_weights=is_weights,
    )
    num, den = aggregate(per_token, mask, loss_agg, max_completion_length=max_completion_length)
    tokens = stats["tokens"]
    per = 1.0 / jnp.maximum(tokens, 1.0)
    metrics = {
        "clip_frac_low": stats["clip_low"] * per,
        "clip_frac_high": stats["clip_high"] * per,
        "ratio_mean": stats["ratio_sum"] * per,
        "ratio_min": jnp.where(tokens > 0, stats["min/ratio"], 1.0),
        "ratio_max": jnp.where(tokens > 0, stats["max/ratio"], 1.0),
    }
    if "kl_sum" in stats:
        metrics["kl"] = stats["kl_sum"] * per
    if entropy is not None:
        ent = jnp.where(jnp.asarray(mask, bool), jnp.asarray(entropy, _f32), 0.0)
        metrics["entropy"] = jax.lax.stop_gradient(ent.sum()) * per
    return num / jnp.maximum(den, 1.0), metrics


def value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *, clip: Any
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss float32[N, T] (0 where ``mask`` is False) and counts.

        0.5 * max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2)

    PPO2's value clipping (baselines' ``ppo2``; TRL's PPO ``vf_loss``). Stats: ``clip_count``, tokens where
    the clipped term is the larger one (TRL's ``vf_clipfrac`` numerator), and ``tokens``. TRL's PPO trains
    the value on one position past the last token as well (``padding_mask_p1``); here the caller's mask says.
    """
    v = jnp.asarray(values, _f32)
    old = jnp.asarray(old_values, _f32)
    ret = jnp.asarray(returns, _f32)
    mask = jnp.asarray(mask, bool)
    unclipped = jnp.square(v - ret)
    clipped = jnp.square(jnp.clip(v, old - clip, old + clip) - ret)
    per_token = jnp.where(mask, 0.5 * jnp.maximum(unclipped, clipped), 0.0)
    stats = {
        "clip_count": ((clipped > unclipped) & mask).sum(dtype=_f32),
        "tokens": mask.sum(dtype=_f32),
    }
    return per_token, stats


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """float32[...]: ``-sum_v p_v log p_v`` over the last axis of ``logits`` [..., V], by float32 log-softmax.

    Entries with probability 0 (``-inf`` logits) contribute 0 and no NaN, to the value or the gradient.
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, _f32), axis=-1)
    p = jnp.exp(logp)
    return -(p * jnp.where(p > 0, logp, 0.0)).sum(axis=-1)
