"""Preference and reward-model losses: pure, per-example (unreduced) JAX functions.

Every function takes per-example float arrays ``[B]`` (sequence log-probabilities or reward-model scores) and
returns per-example losses ``[B]`` (KTO: ``[B_chosen + B_rejected]``); the caller reduces them (the step
factory sums them and divides by the number of pairs of the global batch). They are jittable and
differentiable, and stable at extreme inputs: log-sigmoids are ``jax.nn.log_sigmoid``, ``1 - sigmoid(x)`` is
``sigmoid(-x)``, ``log(1 - exp(p))`` is computed with ``log1p``/``expm1`` and never as a difference of
rounded numbers. Inputs are promoted to at least float32 (bf16 log-probs are computed in float32).

The formulas follow TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``kto_trainer.py``, ``reward_trainer.py``,
``experimental/orpo``, ``experimental/cpo``) and are compared with TRL's own code in
``tests/test_objectives_preference.py``; the deviations are listed in each docstring (conservative-DPO
label smoothing for ``sigmoid``, which TRL 1.16 dropped; ``bco_pair`` without a running reward mean, as in
TRL 1.16; IPO on length-averaged log-probs that the caller supplies; a clamp that keeps ORPO finite at
log-prob 0; DiscoPOP's exponential term evaluated in log space).

Notation: ``*_logps`` are *summed* completion log-probs ``log pi(y|x)`` (``*_mean_logps``: divided by the
completion's token count); ``ref_*`` are the frozen reference model's; ``beta`` is the KL coefficient.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "DPO_LOSS_TYPES",
    "bradley_terry_loss",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
]

DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
)

_log_sigmoid = jax.nn.log_sigmoid
_sigmoid = jax.nn.sigmoid


def _as_float(*xs: Any) -> tuple[jax.Array, ...]:
    """The inputs as arrays of one float dtype: their common type, at least float32."""
    dtype = jnp.result_type(*xs, jnp.float32)
    return tuple(jnp.asarray(x, dtype) for x in xs)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_positive(name: str, value: Any) -> None:
    if _is_number(value) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _smoothed_sigmoid_loss(x: jax.Array, label_smoothing: Any) -> jax.Array:
    """``-(1 - ls) log_sigmoid(x) - ls log_sigmoid(-x)``: the logistic loss, labels flipped w.p. ``ls``."""
    if _is_number(label_smoothing) and label_smoothing == 0:
        return -_log_sigmoid(x)
    return -(1 - label_smoothing) * _log_sigmoid(x) - label_smoothing * _log_sigmoid(-x)


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Direct Preference Optimization and its pairwise variants (TRL's ``DPOTrainer`` loss types).

    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with the implicit rewards
    ``chosen_rewards = beta * (chosen_logps - ref_chosen_logps)`` (same for rejected), returned as they are
    (not stop-gradient'ed): callers log them.

    Notation: ``cl = chosen_logps - ref_chosen_logps``, ``rl = rejected_logps - ref_rejected_logps``,
    ``logits = cl - rl`` (``= (chosen - rejected) - (ref_chosen - ref_rejected)``), ``x = beta * logits``,
    ``ls = label_smoothing``, ``s = sigmoid``, ``logsig = log_sigmoid``.

    ================  =========================================================  ===========================
    loss_type         per-example loss                                           paper (arXiv id)
    ================  =========================================================  ===========================
    ``sigmoid``       ``-(1-ls) logsig(x) - ls logsig(-x)``                      DPO, Rafailov et al. 2023
                                                                                 (2305.18290); ``ls > 0``:
                                                                                 cDPO, Mitchell 2023 (note
                                                                                 "A note on DPO with noisy
                                                                                 preferences", no arXiv)
    ``robust``        ``(-(1-ls) logsig(x) + ls logsig(-x)) / (1 - 2 ls)``,      rDPO, Chowdhury et al.
                      ``0 <= ls < 0.5`` (the label-flip probability)             2024 (2403.00409)
    ``hinge``         ``relu(1 - x)``                                            SLiC-HF, Zhao et al. 2023
                                                                                 (2305.10425); RSO, Liu et
                                                                                 al. 2023 (2309.06657)
    ``ipo``           ``(logits - 1 / (2 beta))**2`` on length-averaged          IPO, Azar et al. 2023
                      log-probs (see below)                                      (2310.12036), Eq. 17
    ``exo_pair``      ``s(x) (logsig(x) - log(1-ls))``                           EXO, Ji et al. 2024
                      ``+ s(-x) (logsig(-x) - log ls)``, ``0 < ls < 1``          (2402.00856), Eq. 16
                      (paper: 1e-3)
    ``nca_pair``      ``-logsig(beta cl) - logsig(-beta cl) / 2``                NCA, Chen et al. 2024
                      ``- logsig(-beta rl) / 2``                                 (2402.05369)
    ``bco_pair``      ``-logsig(beta cl) - logsig(-beta rl)``                    BCO, Jung et al. 2024
                                                                                 (2404.04656)
    ``sppo_hard``     ``(cl - 1/(2 beta))**2 + (rl + 1/(2 beta))**2``            SPPO, Wu et al. 2024
                                                                                 (2405.00675), hard labels
    ``aot``           ``sigmoid``'s loss (with ls) of ``beta d``, ``d =          AOT, Melnyk et al. 2024
                      sort(chosen - rejected) - sort(ref_chosen -                (2406.05882), paired
                      ref_rejected)`` (sorted over the batch)
    ``aot_unpaired``  the same with ``d = sort(cl) - sort(rl)``                  AOT, unpaired
    ``apo_zero``      ``1 - s(beta cl) + s(beta rl)``                            APO, D'Oosterlinck et al.
                                                                                 2024 (2408.06266), Eq. 7
    ``apo_down``      ``s(beta cl) + 1 - s(x)``                                  APO, Eq. 8
    ``discopop``      ``-logsig(x) (1 - m) + exp(-x) m``, ``m = s(x / tau)``     DiscoPOP (LRML), Lu et al.
                                                                                 2024 (2406.08414), Eq. 5
    ================  =========================================================  ===========================

    Notes and deviations from TRL 1.16:

    * ``sigmoid`` with ``label_smoothing > 0`` is conservative DPO, as in the 0.x releases of TRL and in TRL's
      ``CPOTrainer``; TRL 1.16's ``DPOTrainer`` ignores ``label_smoothing`` for ``sigmoid``. With
      ``label_smoothing == 0`` (the default) both agree. ``label_smoothing`` also enters ``robust``,
      ``exo_pair``, ``aot`` and ``aot_unpaired`` (as in TRL) and is ignored by the other types.
    * ``bco_pair``: the BCO paper shifts both rewards by ``delta``, a running mean of past rewards. TRL 1.16's
      ``bco_pair`` has no shift, and a pure per-batch function has no running state, so ``delta = 0`` here
      (identical to TRL 1.16).
    * ``ipo``: pass *length-averaged* log-probs (each summed log-prob divided by its completion's token count,
      the same count for policy and reference). TRL 1.16 divides the summed log-ratios by the token counts
      itself, which gives the same ``logits``; the returned rewards are then per-token averages.
    * ``aot`` / ``aot_unpaired`` sort within the arrays given, so the losses are a function of the whole
      batch (of each micro-batch when gradients are accumulated), and loss ``i`` belongs to the i-th
      smallest sorted quantities, not to pair ``i``; only their sum/mean is meaningful. Rewards stay per pair.
    * ``discopop``: ``exp(-x) * m`` is computed as ``exp(-x + log_sigmoid(x / tau))``, which is equal but
      does not overflow (TRL's ``exp(-x)`` overflows to ``inf * 0 = nan`` for very negative ``x``).
    * Only TRL's default ``f_divergence_type="reverse_kl"`` (standard DPO) is implemented; TRL's ``sft`` and
      ``sigmoid_norm`` types and WPO weighting are not loss types here.

    Args:
      chosen_logps, rejected_logps: ``[B]`` policy log-probs of the chosen / rejected completions (summed
        over completion tokens; length-averaged for ``ipo``).
      ref_chosen_logps, ref_rejected_logps: ``[B]`` reference-model log-probs, same convention.
      beta: the KL coefficient (IPO's tau).
      loss_type: one of ``DPO_LOSS_TYPES``.
      label_smoothing: see the table; ``robust`` needs ``[0, 0.5)``, ``exo_pair`` needs ``(0, 1)``.
      discopop_tau: DiscoPOP's temperature (paper: 0.05).

    Raises:
      ValueError: unknown ``loss_type``, or a Python-number ``beta``/``label_smoothing``/``discopop_tau``
        outside the range the loss type needs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(
            f"Unknown DPO loss_type {loss_type!r}; valid loss types: {', '.join(DPO_LOSS_TYPES)}"
        )
    _check_positive("beta", beta)
    ls = label_smoothing
    if _is_number(ls):
        if loss_type == "robust" and not 0 <= ls < 0.5:
            raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {ls}")
        if loss_type == "exo_pair" and not 0 < ls < 1:
            raise ValueError(
                f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3), got {ls}"
            )
        if loss_type in ("sigmoid", "aot", "aot_unpaired") and not 0 <= ls <= 1:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {ls}")
    if loss_type == "discopop":
        _check_positive("discopop_tau", discopop_tau)

    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = _as_float(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    x = beta * logits

    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(x, ls)
    elif loss_type == "robust":
        losses = (-(1 - ls) * _log_sigmoid(x) + ls * _log_sigmoid(-x)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - x)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        losses = _sigmoid(x) * (_log_sigmoid(x) - jnp.log1p(-ls)) + _sigmoid(-x) * (
            _log_sigmoid(-x) - jnp.log(ls)
        )
    elif loss_type == "nca_pair":
        losses = (
            -_log_sigmoid(chosen_rewards)
            - 0.5 * _log_sigmoid(-chosen_rewards)
            - 0.5 * _log_sigmoid(-rejected_rewards)
        )
    elif loss_type == "bco_pair":
        losses = -_log_sigmoid(chosen_rewards) - _log_sigmoid(-rejected_rewards)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "aot":
        delta = jnp.sort(chosen_logps - rejected_logps, axis=0) - jnp.sort(
            ref_chosen_logps - ref_rejected_logps, axis=0
        )
        losses = _smoothed_sigmoid_loss(beta * delta, ls)
    elif loss_type == "aot_unpaired":
        delta = jnp.sort(chosen_logratios, axis=0) - jnp.sort(rejected_logratios, axis=0)
        losses = _smoothed_sigmoid_loss(beta * delta, ls)
    elif loss_type == "apo_zero":
        losses = _sigmoid(-chosen_rewards) + _sigmoid(rejected_rewards)
    elif loss_type == "apo_down":
        losses = _sigmoid(chosen_rewards) + _sigmoid(-x)
    else:  # discopop
        logistic = -_log_sigmoid(x)
        losses = logistic * _sigmoid(-x / discopop_tau) + jnp.exp(-x + _log_sigmoid(x / discopop_tau))
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    policy_kl_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    ref_kl_logps: jax.Array,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""Kahneman-Tversky Optimization on unpaired desirable / undesirable completions.

    KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv
    2402.01306), Eq. 7, as in TRL 1.16's ``KTOTrainer`` (``loss_type="kto"``)::

        z      = stop_gradient(max(0, mean(policy_kl_logps - ref_kl_logps)))      # the reference point
        loss_c = desirable_weight   * (1 - sigmoid(beta * (chosen_logratio - z)))
        loss_r = undesirable_weight * (1 - sigmoid(beta * (z - rejected_logratio)))
        losses = concat([loss_c, loss_r])                                           # TRL's order

    with ``*_logratio = policy_*_logps - ref_*_logps``. ``1 - sigmoid(t)`` is computed as ``sigmoid(-t)``.
    ``policy_kl_logps`` / ``ref_kl_logps`` are the log-probs of mismatched (prompt, completion) pairs (TRL
    cycles the completions within the batch); ``z`` is a constant for the gradient. ``z`` is the mean over
    the arrays given (TRL: the mean over processes of the per-process means, then the clamp; equal for
    equal per-process sizes); when gradients are accumulated it is per micro-batch. Empty KL arrays give
    ``z = 0`` (TRL's ``calculate_KL=False``).

    Args:
      policy_chosen_logps, ref_chosen_logps: ``[Bc]`` summed log-probs of the desirable completions
        (``Bc`` may be 0).
      policy_rejected_logps, ref_rejected_logps: ``[Br]`` the same for the undesirable ones (``Br`` may be 0).
      policy_kl_logps, ref_kl_logps: ``[K]`` summed log-probs of the KL (mismatched) completions.
      beta: the KL coefficient.
      desirable_weight, undesirable_weight: the paper's lambda_D and lambda_U.

    Returns:
      ``(losses [Bc + Br], chosen_rewards [Bc], rejected_rewards [Br], kl [])`` with
      ``chosen_rewards = beta * chosen_logratio`` (same for rejected) and ``kl = z``.
    """
    _check_positive("beta", beta)
    (
        policy_chosen_logps,
        policy_rejected_logps,
        policy_kl_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        ref_kl_logps,
    ) = _as_float(
        policy_chosen_logps,
        policy_rejected_logps,
        policy_kl_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        ref_kl_logps,
    )
    dtype = policy_chosen_logps.dtype
    if policy_kl_logps.size == 0:
        kl = jnp.zeros((), dtype)
    else:
        kl = jnp.maximum(jnp.mean(policy_kl_logps - ref_kl_logps), 0)
    kl = jax.lax.stop_gradient(kl)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = desirable_weight * _sigmoid(-beta * (chosen_logratios - kl))
    rejected_losses = undesirable_weight * _sigmoid(-beta * (kl - rejected_logratios))
    losses = jnp.concatenate([chosen_losses, rejected_losses], axis=0)
    return losses, beta * chosen_logratios, beta * rejected_logratios, kl


_MINUS_LOG_2 = -math.log(2.0)


def _log1mexp(p: jax.Array) -> jax.Array:
    """``log(1 - exp(p))`` for ``p <= 0``, accurate everywhere (Maechler 2012), finite value and gradient.

    ``log1p(-exp(p))`` below ``-log 2``, ``log(-expm1(p))`` above, as TRL's ``log1mexp``; each branch sees
    only inputs from its own side (so the branch not taken has a finite gradient that ``where`` can zero),
    and ``p`` is clamped to ``<= -tiny`` so that ``p = 0`` (probability 1) gives ``log(tiny)``, not ``-inf``.
    """
    p = jnp.minimum(p, -jnp.finfo(p.dtype).tiny)
    low = p < _MINUS_LOG_2
    from_low = jnp.log1p(-jnp.exp(jnp.where(low, p, _MINUS_LOG_2)))
    from_high = jnp.log(-jnp.expm1(jnp.where(low, _MINUS_LOG_2, p)))
    return jnp.where(low, from_low, from_high)


def orpo_loss(
    chosen_mean_logps: jax.Array, rejected_mean_logps: jax.Array, *, beta: float
) -> tuple[jax.Array, jax.Array]:
    r"""The odds-ratio term of ORPO (the SFT term is the caller's).

    ORPO, Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv 2403.07691), Eqs. 4 and 7; TRL 1.16 ``experimental/orpo`` ``ORPOTrainer.odds_ratio_loss``::

        log_odds(p)    = log(P / (1 - P)) = p - log(1 - exp(p))          # p = log P, length-averaged
        log_odds_ratio = log_odds(chosen) - log_odds(rejected)
        losses         = -beta * log_sigmoid(log_odds_ratio)

    TRL returns ``beta * log_sigmoid(log_odds_ratio)`` and subtracts its mean from the NLL; here the sign is
    folded in so that the losses are minimized (ORPO total = NLL + mean(losses)). ``log(1 - exp(p))`` uses
    TRL's two-branch ``log1mexp``; in addition ``p`` is clamped to ``<= -tiny`` (the smallest normal float),
    so a log-prob of exactly 0 (probability 1, reachable by rounding) gives a large finite log-odds instead
    of TRL's ``inf``. The ratio is grouped as TRL's ``(c - r) - (log1mexp(c) - log1mexp(r))``.

    Args:
      chosen_mean_logps, rejected_mean_logps: ``[B]`` per-token *averaged* completion log-probs (``<= 0``).
      beta: the odds-ratio weight (the paper's lambda; TRL's ``beta``, default 0.1).

    Returns:
      ``(losses [B], log_odds_ratio [B])``.
    """
    chosen_mean_logps, rejected_mean_logps = _as_float(chosen_mean_logps, rejected_mean_logps)
    log_odds_ratio = (chosen_mean_logps - rejected_mean_logps) - (
        _log1mexp(chosen_mean_logps) - _log1mexp(rejected_mean_logps)
    )
    return -beta * _log_sigmoid(log_odds_ratio), log_odds_ratio


def simpo_loss(
    chosen_mean_logps: jax.Array,
    rejected_mean_logps: jax.Array,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""Simple Preference Optimization: a reference-free, length-normalized DPO with a target margin.

    SimPO, Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv 2405.14734), Eq. 6, with TRL's label smoothing (TRL 1.16 ``experimental/cpo``
    ``CPOTrainer.cpo_loss``, ``loss_type="simpo"``, ``cpo_alpha=0``)::

        logits = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
        losses = -(1 - ls) * log_sigmoid(logits) - ls * log_sigmoid(-logits)

    ``gamma`` is the paper's target reward margin (in reward units). TRL's ``CPOConfig.simpo_gamma`` is the
    same quantity (TRL computes ``beta * ((c - r) - simpo_gamma / beta)``); the SimPO reference code's
    ``gamma_beta_ratio`` is ``gamma / beta``. The paper's total is this loss alone; CPO's NLL term
    (``cpo_alpha``) is the caller's.

    Args:
      chosen_mean_logps, rejected_mean_logps: ``[B]`` per-token averaged completion log-probs.
      beta: reward scale (paper: 2 to 10).
      gamma: target reward margin (paper: 0.3 to 1.6 in these units).
      label_smoothing: probability that a preference label is flipped (0: the paper's loss).

    Returns:
      ``losses [B]``.
    """
    chosen_mean_logps, rejected_mean_logps = _as_float(chosen_mean_logps, rejected_mean_logps)
    logits = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return _smoothed_sigmoid_loss(logits, label_smoothing)


def bradley_terry_loss(
    chosen_scores: jax.Array,
    rejected_scores: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_coef: float = 0.0,
) -> jax.Array:
    r"""Bradley-Terry pairwise loss of a scalar reward model, with optional margin and reward centering.

    As TRL 1.16's ``RewardTrainer.compute_loss``, per example::

        losses = -log_sigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected)**2

    (TRL: the batch mean of these, ``center_coef`` = ``center_rewards_coefficient``, whose ``None`` is 0.0
    here). Bradley and Terry 1952; the pairwise reward-model loss of InstructGPT, Ouyang et al. 2022 (arXiv
    2203.02155); the per-pair ``margin`` of Llama 2, Touvron et al. 2023 (arXiv 2307.09288); the centering
    term of Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
    Reward Hacking" (arXiv 2312.09244), Eq. 2 (recommended coefficient 0.01).

    Args:
      chosen_scores, rejected_scores: ``[B]`` reward-model scores.
      margin: ``[B]`` (or scalar) required score margin per pair, or ``None`` for 0.
      center_coef: weight of the squared sum of the pair's scores, which pulls the mean reward to 0
        (``None`` is accepted as 0, as TRL's default).

    Returns:
      ``losses [B]``.
    """
    chosen_scores, rejected_scores = _as_float(chosen_scores, rejected_scores)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - jnp.asarray(margin, diff.dtype)
    losses = -_log_sigmoid(diff)
    if center_coef is not None and not (_is_number(center_coef) and center_coef == 0):
        losses = losses + center_coef * (chosen_scores + rejected_scores) ** 2
    return losses
