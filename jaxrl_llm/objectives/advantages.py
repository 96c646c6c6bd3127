"""Advantages and reward shaping for RL post-training: pure, jittable float32 functions.

Two families:

- *Group* advantages (GRPO, RLOO, REINFORCE++, Dr.GRPO): one scalar reward per completion, ``G``
  completions per prompt in consecutive rows; ``group_advantages`` picks a baseline and a scale by name.
- *Token* advantages (PPO with a value model): ``kl_shaped_rewards`` spreads a per-token KL penalty and the
  sequence score over the completion's tokens, ``gae`` turns rewards and values into advantages and returns,
  ``whiten`` normalises them, ``adaptive_kl_coef`` steers the KL coefficient.

String options are checked when the function is traced (plain Python), so a wrong name fails before any
compilation, listing the valid ones. Nothing here branches on traced values.

Where the formulas depart from TRL 1.16 (``trl/trainer/grpo_trainer.py``, ``rloo_trainer.py``; TRL 1.16 ships
no PPO trainer, so the PPO parts follow the last ``trl/experimental/ppo/ppo_trainer.py`` on GitHub), each
docstring says how.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "BASELINES",
    "SCALES",
    "adaptive_kl_coef",
    "gae",
    "group_advantages",
    "kl_shaped_rewards",
    "whiten",
]

BASELINES = ("group_mean", "leave_one_out", "batch_mean", "none")
SCALES = ("group_std", "batch_std", "none")


def check_option(name: str, value: Any, options: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the valid ``options`` unless ``value`` is one of them."""
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, options))}")


def _masked_std(x: jax.Array, valid: jax.Array, axis: int | None) -> jax.Array:
    """Unbiased (n - 1) std of ``x`` over ``valid`` entries along ``axis``; 0 where fewer than 2 are valid."""
    n = valid.sum(axis=axis, keepdims=True, dtype=jnp.float32)
    mean = jnp.where(valid, x, 0.0).sum(axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
    sq = jnp.where(valid, jnp.square(x - mean), 0.0).sum(axis=axis, keepdims=True)  # 0 for n < 2
    return jnp.sqrt(sq / jnp.maximum(n - 1.0, 1.0))


def _shift_by_a_member(x: jax.Array, valid: jax.Array) -> jax.Array:
    """``x`` minus its first valid entry along the last axis, 0 where invalid.

    Means of shifted values are exactly 0 for a flat group (a float32 mean of G equal values need not equal
    the value), so a flat group's advantages are exactly 0, not rounding noise divided by ``eps``.
    """
    first = jnp.argmax(valid, axis=-1, keepdims=True)
    return jnp.where(valid, x - jnp.take_along_axis(x, first, axis=-1), 0.0)


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    baseline: str = "group_mean",
    scale: str = "group_std",
    eps: float = 1e-4,
    valid: jax.Array | None = None,
) -> jax.Array:
    """float32[N]: ``(r - b) / (std + eps)`` per completion; rows ``i*G .. i*G+G-1`` are prompt i's group.

    Baselines ``b`` (statistics over ``valid`` samples only; an invalid sample's reward is ignored, it may
    be NaN, and its advantage is 0):

    - ``group_mean``: the group's mean reward (GRPO, Shao et al. 2024, arXiv:2402.03300).
    - ``leave_one_out``: the mean of the *other* members, ``(sum - r_i) / (n - 1)`` (RLOO, Ahmadian et al.
      2024, arXiv:2402.14740); 0 advantage when the group has fewer than 2 valid members.
    - ``batch_mean``: the mean over the whole batch (REINFORCE++ without groups, Hu 2025, arXiv:2501.03262).
    - ``none``: 0.

    Scales (a std over fewer than 2 values is 0, so the division leaves ``r - b`` times ``1 / eps``; for a
    flat group under a group baseline ``r - b`` is exactly 0):

    - ``group_std``: unbiased std of the group's rewards (GRPO).
    - ``batch_std``: unbiased std of ``r - b`` over the batch (REINFORCE++'s global normalisation).
    - ``none``: no division (Dr.GRPO, Liu et al. 2025, arXiv:2503.20783).

    Differences from TRL 1.16: ``scale_rewards="batch"`` in ``grpo_trainer.py`` (lines 2774-2777) divides by
    the std of the raw *rewards* over the batch, ours by the std of ``r - b`` (REINFORCE++); RLOO's
    ``normalize_advantages`` (``rloo_trainer.py`` 1695-1696) also subtracts the batch mean of the advantages,
    which is a no-op for the group baselines (each group's ``r - b`` sums to 0) but not for ``none``, and
    leaves a group's lone valid member out of that std (its advantage is NaN there), where ours counts it as
    0; TRL marks invalid completions with NaN rewards and zeroes NaN advantages, we take a ``valid`` mask;
    TRL allows one completion per prompt in evaluation (all advantages 0), we reject it. The std
    (Bessel-corrected ``nanstd``, ``trainer/utils.py`` 1021) and ``eps`` added to the std are TRL's.

    Args:
      rewards: [N] float.
      group_size: G, completions per prompt; N must be a multiple of G. G < 2 is an error with
        ``group_std`` or ``leave_one_out``, and fine with batch statistics (REINFORCE++ proper).
      valid: [N] bool, default all True.
    """
    check_option("baseline", baseline, BASELINES)
    check_option("scale", scale, SCALES)
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    n = rewards.shape[0]
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of group_size={group_size}")
    if group_size < 2 and scale == "group_std":
        raise ValueError("scale='group_std' needs group_size >= 2: a one-sample group has no spread")
    if group_size < 2 and baseline == "leave_one_out":
        raise ValueError(
            "baseline='leave_one_out' needs group_size >= 2: a one-sample group has no other members"
        )
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != (n,):
        raise ValueError(f"valid must have shape {(n,)}, got {valid.shape}")

    groups, group_valid = rewards.reshape(-1, group_size), valid.reshape(-1, group_size)
    # Shifting by a member leaves every difference r - b and every std unchanged.
    d = _shift_by_a_member(groups, group_valid)  # [P, G]
    count = group_valid.sum(axis=1, keepdims=True, dtype=jnp.float32)
    total = d.sum(axis=1, keepdims=True)
    if baseline == "group_mean":
        centred = (d - total / jnp.maximum(count, 1.0)).reshape(n)
    elif baseline == "leave_one_out":
        loo = d - (total - d) / jnp.maximum(count - 1.0, 1.0)
        centred = jnp.where(count >= 2, loo, 0.0).reshape(n)
    elif baseline == "batch_mean":
        db = _shift_by_a_member(rewards, valid)
        centred = db - db.sum() / jnp.maximum(valid.sum(dtype=jnp.float32), 1.0)
    else:
        centred = rewards

    if scale == "group_std":
        adv = centred / (jnp.broadcast_to(_masked_std(d, group_valid, axis=1), d.shape).reshape(n) + eps)
    elif scale == "batch_std":
        adv = centred / (_masked_std(centred, valid, axis=None) + eps)
    else:
        adv = centred
    return jnp.where(valid, adv, 0.0)


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438) by a reverse scan over T.

        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}        (V and A beyond T are 0)
        R_t     = A_t + V_t

    A position with ``mask`` False is terminal (padding, or a token the policy did not produce): nothing
    bootstraps across it, and ``A`` and ``R`` are 0 there. Rewards and values at such positions are ignored
    (they may be garbage or NaN).

    Differences from TRL's PPO loop (``trl/experimental/ppo/ppo_trainer.py``, "6. compute advantages and
    returns"; TRL 1.16 ships no PPO): TRL runs the recursion unmasked and relies on ``values`` being zeroed
    after the response, but keeps the value one position *past* the last token (``padding_mask_p1``) and puts
    the score there too, so its last real token bootstraps from that extra value and sees the score one
    ``gamma * lam`` later; with a right-padded mask, zero rewards/values on padding and the score on the last
    token (``kl_shaped_rewards``) the two agree exactly. TRL whitens the advantages inside the loop; here that
    is a separate ``whiten`` call.

    Args:
      rewards, values: [N, T] float.
      mask: [N, T] bool.
      gamma, lam: discount and GAE lambda (Python floats or traced scalars).

    Returns:
      (advantages [N, T], returns [N, T]) float32.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, bool)

    def step(carry, xs):
        next_value, next_adv = carry  # already 0 where position t + 1 is masked or beyond T
        r_t, v_t, m_t = xs
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        adv = jnp.where(m_t, adv, 0.0)
        return (jnp.where(m_t, v_t, 0.0), adv), adv

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    adv = adv_t.T
    return adv, jnp.where(mask, adv + values, 0.0)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """float32, ``x``'s shape: ``(x - mean) / sqrt(var + eps)`` over the ``mask``ed entries, 0 elsewhere.

    ``var`` is unbiased (n - 1), as TRL's ``masked_whiten``; ``shift_mean=False`` adds the mean back (only
    the scale changes). Differences from TRL (``masked_var`` in ``trl/experimental/ppo/ppo_trainer.py``):
    TRL raises on an empty mask and divides by zero for a single entry; here the variance of fewer than 2
    entries is 0 (a single entry whitens to 0, or to itself with ``shift_mean=False``).
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    n = mask.sum(dtype=jnp.float32)
    mean = jnp.where(mask, x, 0.0).sum() / jnp.maximum(n, 1.0)
    var = jnp.where(mask, jnp.square(x - mean), 0.0).sum() / jnp.maximum(n - 1.0, 1.0)  # 0 for n < 2
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0.0)


def kl_shaped_rewards(
    scores: jax.Array, logps: jax.Array, ref_logps: jax.Array, mask: jax.Array, *, kl_coef: Any
) -> jax.Array:
    """float32[N, T]: per-token RLHF rewards ``-kl_coef * (logp - ref_logp)``, the score on the last token.

    The KL-regularised reward of Ziegler et al. 2019 (arXiv:1909.08593) and Stiennon et al. 2020
    (arXiv:2009.01325): every masked token pays the k1 KL estimate, and the row's sequence score
    ``scores[i]`` is added at its last masked token (a row with no masked token gets nothing). 0 where
    ``mask`` is False. ``kl_coef`` may be traced (see ``adaptive_kl_coef``).

    Differences from TRL's PPO (``trl/experimental/ppo/ppo_trainer.py``, "4. compute rewards"): TRL adds the
    score one position *after* the last token when the row is shorter than T (on the last token otherwise),
    and offers k3 as well as k1 for the per-token penalty.
    """
    scores = jnp.asarray(scores, jnp.float32)
    logps = jnp.asarray(logps, jnp.float32)
    ref_logps = jnp.asarray(ref_logps, jnp.float32)
    mask = jnp.asarray(mask, bool)
    t = mask.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # [N]; a row without tokens is excluded below
    is_last = (jnp.arange(t)[None, :] == last[:, None]) & mask
    per_token = -jnp.asarray(kl_coef, jnp.float32) * (logps - ref_logps)
    return jnp.where(mask, per_token, 0.0) + jnp.where(is_last, scores[:, None], 0.0)


def adaptive_kl_coef(coef: Any, current_kl: Any, n_steps: Any, *, target: float, horizon: float) -> jax.Array:
    """float32[]: the next KL coefficient of Ziegler et al. 2019's adaptive controller (arXiv:1909.08593).

        err = clip(current_kl / target - 1, -0.2, 0.2);   coef' = coef * (1 + err * n_steps / horizon)

    The coefficient grows while the measured KL is above ``target`` and shrinks below it, by at most 20%
    of ``n_steps / horizon`` per update. Pure: the caller keeps ``coef`` in its state (TRL's
    ``AdaptiveKLController`` mutates ``self.value``).
    """
    coef = jnp.asarray(coef, jnp.float32)
    err = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + err * jnp.asarray(n_steps, jnp.float32) / horizon)
