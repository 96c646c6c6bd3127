"""RL objectives (``objectives.advantages``, ``.policy``): hand values, float64 references, TRL 1.16.

The references are written independently of the code under test: literal hand-computed values, plain
float64 numpy / Python loops from the papers' formulas, TRL 1.16's own ``GRPOTrainer._compute_loss`` and
``nanstd`` called on torch tensors through minimal stand-ins, and ports of the TRL code that 1.16 no longer
ships (the PPO loop of ``trl/experimental/ppo/ppo_trainer.py``, RLOO's advantage lines, the adaptive KL
controller). Every function under test runs under ``jax.jit``.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.objectives.advantages import (
    BASELINES,
    SCALES,
    adaptive_kl_coef,
    gae,
    group_advantages,
    kl_shaped_rewards,
    whiten,
)
from jaxrl_llm.objectives.policy import (
    LOSS_AGGS,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    policy_token_losses,
    value_loss,
)

EPS = 1e-4
TOL = dict(rtol=2e-5, atol=2e-5)
sg = jax.lax.stop_gradient


@functools.cache  # one compiled function per option set, reused across tests
def jit_adv(group_size, baseline, scale):
    return jax.jit(functools.partial(group_advantages, group_size=group_size, baseline=baseline, scale=scale))


def right_padded(lengths, t):
    return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


# --------------------------------------------------------------------------------------------------------
# group_advantages


def np_group_advantages(r, g, baseline, scale, eps=EPS, valid=None):
    """float64 reference, one sample at a time, straight from the definitions."""
    r = np.asarray(r, np.float64)
    n = len(r)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)

    def std(x):  # unbiased; a std over fewer than 2 values is 0
        return float(np.std(x, ddof=1)) if len(x) >= 2 else 0.0

    members = [[j for j in range(s, s + g) if valid[j]] for s in range(0, n, g)]
    centred = np.zeros(n)
    for idx in members:
        for i in idx:
            if baseline == "group_mean":
                b = np.mean(r[idx])
            elif baseline == "leave_one_out":
                others = [j for j in idx if j != i]
                b = np.mean(r[others]) if others else r[i]  # no other member: advantage 0
            elif baseline == "batch_mean":
                b = np.mean(r[valid])
            else:
                b = 0.0
            centred[i] = r[i] - b
    if scale == "none":
        return np.where(valid, centred, 0.0)
    if scale == "group_std":
        sd = np.repeat([std(r[idx]) for idx in members], g)
    else:
        sd = std(centred[valid])
    return np.where(valid, centred / (sd + eps), 0.0)


def mixed_rewards():
    """G=4, 6 groups: spread, flat, one valid member, none valid, two valid, flat but for one invalid."""
    r = np.array(
        [0.3, 1.7, -0.4, 2.2]
        + [0.1] * 4
        + [5.0, np.nan, np.nan, np.nan]
        + [np.nan] * 4
        + [1.0, np.nan, -2.5, np.nan]
        + [2.7, 2.7, np.nan, 2.7],
        np.float32,
    )
    return r, ~np.isnan(r)


@pytest.mark.parametrize("baseline,scale", list(itertools.product(BASELINES, SCALES)))
def test_group_advantages_match_numpy(baseline, scale):
    r, valid = mixed_rewards()
    got = np.asarray(jit_adv(4, baseline, scale)(r, valid=valid))  # invalid rewards are NaN: ignored
    want = np_group_advantages(np.nan_to_num(r), 4, baseline, scale, valid=valid)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL)
    # All valid, random rewards, another group size.
    rng = np.random.default_rng(0)
    x = rng.normal(size=15).astype(np.float32)
    got = jit_adv(5, baseline, scale)(x, valid=np.ones(15, bool))
    np.testing.assert_allclose(np.asarray(got), np_group_advantages(x, 5, baseline, scale), **TOL)


def test_group_advantages_literal_values():
    """Two groups of G=3: [0, 1, 2] (mean 1, unbiased std 1) and [3, 3, 3]; batch mean 2."""
    r = jnp.array([0.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    e = 1 + EPS
    want = {
        ("group_mean", "group_std"): [-1 / e, 0, 1 / e, 0, 0, 0],
        ("group_mean", "none"): [-1, 0, 1, 0, 0, 0],
        # leave-one-out baselines: (1+2)/2, (0+2)/2, (0+1)/2 -> r - b = -1.5, 0, 1.5
        ("leave_one_out", "none"): [-1.5, 0, 1.5, 0, 0, 0],
        ("leave_one_out", "group_std"): [-1.5 / e, 0, 1.5 / e, 0, 0, 0],
        # r - 2 = [-2, -1, 0, 1, 1, 1]: mean 0, sum of squares 8, unbiased std sqrt(8/5)
        ("batch_mean", "none"): [-2, -1, 0, 1, 1, 1],
        ("batch_mean", "batch_std"): np.array([-2, -1, 0, 1, 1, 1]) / (math.sqrt(8 / 5) + EPS),
        # r - group mean = [-1, 0, 1, 0, 0, 0]: unbiased std sqrt(2/5)
        ("group_mean", "batch_std"): np.array([-1, 0, 1, 0, 0, 0]) / (math.sqrt(2 / 5) + EPS),
        ("none", "none"): [0, 1, 2, 3, 3, 3],
        # the flat group has std 0: r / eps
        ("none", "group_std"): [0, 1 / e, 2 / e, 3 / EPS, 3 / EPS, 3 / EPS],
    }
    for (baseline, scale), w in want.items():
        got = jit_adv(3, baseline, scale)(r)
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6, atol=1e-6, err_msg=f"{baseline}/{scale}")


@pytest.mark.parametrize("baseline,scale", list(itertools.product(BASELINES, SCALES)))
def test_flat_groups_give_exact_zeros(baseline, scale):
    """Flat groups (values whose float32 mean is inexact), one-valid and all-invalid groups: 0, never NaN."""
    for g, level, level2 in ((3, 0.1, 2.7), (7, 2.7, -3.3)):
        fn = jit_adv(g, baseline, scale)
        n = 3 * g  # one shape per g: one compilation
        r = np.array([level] * g + [level2] * g + [level, 9.0] + [np.nan] * (g - 2), np.float32)
        valid = ~np.isnan(r)
        got = np.asarray(fn(r, valid=valid))
        assert np.isfinite(got).all() and (got[~valid] == 0).all()
        if baseline in ("group_mean", "leave_one_out"):
            assert (got[: 2 * g] == 0).all(), (g, got)  # flat groups
            assert got[2 * g] == -got[2 * g + 1] != 0  # two valid members
        # A flat batch is flat under every baseline that centres it; 'none' centres nothing: zero rewards.
        everyone = np.ones(n, bool)
        if baseline != "none":
            assert (np.asarray(fn(np.full(n, level, np.float32), valid=everyone)) == 0).all()
        assert (np.asarray(fn(np.zeros(n, np.float32), valid=everyone)) == 0).all()
        # One valid member per group, and no valid member at all.
        one = np.zeros(n, bool)
        one[::g] = True
        single = np.asarray(fn(np.arange(n, dtype=np.float32), valid=one))
        assert np.isfinite(single).all() and (single[~one] == 0).all()
        if baseline in ("group_mean", "leave_one_out"):
            assert (single == 0).all()
        assert (np.asarray(fn(np.full(n, np.nan, np.float32), valid=np.zeros(n, bool))) == 0).all()


def test_group_advantages_errors():
    r = jnp.zeros(6)
    with pytest.raises(ValueError, match="group_std.*no spread"):
        group_advantages(r, 1, scale="group_std")
    with pytest.raises(ValueError, match="leave_one_out.*no other members"):
        group_advantages(r, 1, baseline="leave_one_out", scale="none")
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="'group_mean', 'leave_one_out', 'batch_mean', 'none'"):
        group_advantages(r, 2, baseline="mean")
    with pytest.raises(ValueError, match="'group_std', 'batch_std', 'none'"):
        group_advantages(r, 2, scale="std")
    with pytest.raises(ValueError, match="valid must have shape"):
        group_advantages(r, 2, valid=jnp.ones(5, bool))
    # REINFORCE++ without groups: G = 1 with batch statistics is fine.
    x = np.array([1.0, 2.0, 4.0], np.float32)
    got = jit_adv(1, "batch_mean", "batch_std")(x)
    np.testing.assert_allclose(np.asarray(got), np_group_advantages(x, 1, "batch_mean", "batch_std"), **TOL)


@pytest.fixture(scope="module")
def trl():
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    return SimpleNamespace(torch=torch, GRPOTrainer=trl.GRPOTrainer, nanstd=nanstd)


def test_group_advantages_match_trl_formulas(trl):
    """TRL's own ``nanstd`` with its GRPO lines (grpo_trainer.py 2765-2791, nan_to_num at 2810) and RLOO's
    (rloo_trainer.py 1684-1699) on rewards with NaN for unscorable completions."""
    torch, nanstd = trl.torch, trl.nanstd
    r_np, valid = mixed_rewards()
    g = 4
    r = torch.tensor(r_np, dtype=torch.float64)
    mean = torch.nanmean(r.view(-1, g), dim=1).repeat_interleave(g)
    std = nanstd(r.view(-1, g), dim=1).repeat_interleave(g)
    trl_group = torch.nan_to_num((r - mean) / (std + 1e-4), nan=0.0).numpy()
    trl_none = torch.nan_to_num(r - mean, nan=0.0).numpy()
    np.testing.assert_allclose(
        np.asarray(jit_adv(g, "group_mean", "group_std")(r_np, valid=valid)), trl_group, **TOL
    )
    np.testing.assert_allclose(
        np.asarray(jit_adv(g, "group_mean", "none")(r_np, valid=valid)), trl_none, **TOL
    )

    grouped = r.view(-1, g)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    loo = r - ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    np.testing.assert_allclose(
        np.asarray(jit_adv(g, "leave_one_out", "none")(r_np, valid=valid)),
        torch.nan_to_num(loo, nan=0.0).numpy(),
        **TOL,
    )
    # RLOO's normalize_advantages = our batch_std (its extra mean subtraction is ~0 for group baselines), on a
    # batch without one-member groups (TRL leaves those out of the std as NaN, we count them as 0).
    keep = slice(0, 8)
    normed = (loo[keep] - torch.nanmean(loo[keep])) / (nanstd(loo[keep]) + 1e-4)
    np.testing.assert_allclose(
        np.asarray(jit_adv(g, "leave_one_out", "batch_std")(r_np[keep])), normed.numpy(), **TOL
    )
    # TRL's scale_rewards="batch" divides by the std of the raw rewards, ours by the std of r - b.
    ours = np.asarray(jit_adv(g, "group_mean", "batch_std")(r_np[keep]))
    trl_batch = ((r[keep] - mean[keep]) / (nanstd(r[keep]) + 1e-4)).numpy()
    assert not np.allclose(ours, trl_batch, rtol=1e-3)
    centred = (r[keep] - mean[keep]).numpy()
    np.testing.assert_allclose(ours, centred / (np.std(centred, ddof=1) + 1e-4), **TOL)


# --------------------------------------------------------------------------------------------------------
# gae, whiten, kl_shaped_rewards, adaptive_kl_coef


def py_gae(rewards, values, mask, gamma, lam):
    """The spec's recursion, one scalar at a time in float64."""
    n, t = rewards.shape
    adv = np.zeros((n, t))
    for i in range(n):
        for k in reversed(range(t)):
            if not mask[i, k]:
                continue
            nxt = k + 1 < t and mask[i, k + 1]
            next_v = values[i, k + 1] if nxt else 0.0
            next_a = adv[i, k + 1] if nxt else 0.0
            adv[i, k] = rewards[i, k] + gamma * next_v - values[i, k] + gamma * lam * next_a
    return adv, np.where(mask, adv + values, 0.0)


def trl_ppo_gae(rewards, values, gamma, lam):
    """Port of TRL's PPO loop (trl/experimental/ppo/ppo_trainer.py, "6. compute advantages and returns")."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = np.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def gae_inputs(seed=0, n=6, t=7):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(n, t)).astype(np.float32)
    values = rng.normal(size=(n, t)).astype(np.float32)
    mask = right_padded([7, 4, 1, 0, 7, 5], t)
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.3), (1.0, 0.9)])
def test_gae_matches_python_loop(gamma, lam):
    rewards, values, mask = gae_inputs()
    mask = mask.copy()
    mask[0, 3] = False  # a hole: terminal, nothing bootstraps across it
    fn = jax.jit(lambda r, v, m, g, lm: gae(r, v, m, gamma=g, lam=lm))  # gamma/lam traced
    garbage = np.where(mask, values, np.nan).astype(np.float32)  # padding values are ignored
    adv, ret = (np.asarray(a) for a in fn(rewards, garbage, mask, gamma, lam))
    want_adv, want_ret = py_gae(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_with_unit_gamma_lambda_is_reward_to_go_minus_value():
    rewards, values, mask = gae_inputs(1)
    adv, ret = jax.jit(functools.partial(gae, gamma=1.0, lam=1.0))(rewards, values, mask)
    r = np.where(mask, rewards, 0.0).astype(np.float64)
    to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(np.asarray(ret), np.where(mask, to_go, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(adv), np.where(mask, to_go - values, 0), rtol=1e-5, atol=1e-5)


def test_gae_matches_trl_ppo_loop_on_right_padded_rows():
    """TRL runs unmasked on rewards/values zeroed after the response: the same numbers on right padding."""
    rewards, values, mask = gae_inputs(2)
    r0, v0 = np.where(mask, rewards, 0.0), np.where(mask, values, 0.0)
    want_adv, want_ret = trl_ppo_gae(r0.astype(np.float64), v0.astype(np.float64), 0.97, 0.9)
    adv, ret = jax.jit(functools.partial(gae, gamma=0.97, lam=0.9))(rewards, values, mask)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)


def trl_masked_whiten(values, mask, shift_mean=True):
    """Port of TRL's masked_whiten / masked_var (unbiased) from trl/experimental/ppo/ppo_trainer.py."""
    mean = (values * mask).sum() / mask.sum()
    var = ((values - mean) ** 2 * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) / np.sqrt(var + 1e-8)
    return whitened + mean if not shift_mean else whitened


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    rng = np.random.default_rng(3)
    x = (3 + 2 * rng.normal(size=(4, 6))).astype(np.float32)
    mask = right_padded([6, 2, 0, 5], 6)
    fn = jax.jit(functools.partial(whiten, shift_mean=shift_mean))
    got = np.asarray(fn(np.where(mask, x, np.nan).astype(np.float32), mask))
    want = np.where(mask, trl_masked_whiten(x.astype(np.float64), mask, shift_mean), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if shift_mean:
        assert abs(got[mask].mean()) < 1e-5 and abs(got[mask].std(ddof=1) - 1) < 1e-5
    # Fewer than 2 entries: no NaN (TRL raises / divides by zero).
    one = np.zeros((4, 6), bool)
    one[1, 1] = True
    assert np.asarray(fn(x, one))[1, 1] == (0.0 if shift_mean else x[1, 1])
    assert (np.asarray(fn(x, np.zeros((4, 6), bool))) == 0).all()


def test_kl_shaped_rewards():
    logps = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, -3.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
    scores = jnp.array([10.0, 20.0, 30.0])
    fn = jax.jit(lambda s, lp, rf, m, c: kl_shaped_rewards(s, lp, rf, m, kl_coef=c))
    got = np.asarray(fn(scores, logps, ref, mask, 0.1))  # kl_coef traced
    want = [
        [-0.05, 0.1, 10.0, 0.0],  # -0.1 * (logp - ref); score on the last masked token
        [-0.1, 0.0, 20.0 - 0.2, 0.0],  # a hole in the mask: the last masked token is t = 2
        [0.0, 0.0, 0.0, 0.0],  # no tokens: nowhere to put the score
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_adaptive_kl_coef_matches_ziegler_controller():
    class AdaptiveKLController:  # TRL's (0.x trl/trainer/utils.py) port of Ziegler et al.'s controller
        def __init__(self, init_kl_coef, target, horizon):
            self.value, self.target, self.horizon = init_kl_coef, target, horizon

        def update(self, current, n_steps):
            proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
            self.value *= 1 + proportional_error * n_steps / self.horizon

    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    coef = jnp.float32(0.2)
    step = jax.jit(functools.partial(adaptive_kl_coef, target=6.0, horizon=10000))
    for kl in (12.0, 6.6, 6.0, 5.7, 0.0, 100.0):
        ctl.update(kl, 256)
        coef = step(coef, kl, 256)
        np.testing.assert_allclose(float(coef), ctl.value, rtol=1e-6)
    np.testing.assert_allclose(float(step(0.1, 12.0, 256)), 0.1 * (1 + 0.2 * 256 / 10000), rtol=1e-6)
    np.testing.assert_allclose(float(step(0.1, 6.3, 100)), 0.1 * (1 + 0.05 * 100 / 10000), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------
# kl_penalty, entropy_from_logits


def test_kl_estimators_literal_values():
    logps, ref = jnp.array([-1.0, -2.0, -0.3]), jnp.array([-2.0, -1.0, -0.3])  # d = ref - logp = -1, 1, 0
    fn = jax.jit(kl_penalty, static_argnums=2)
    np.testing.assert_allclose(np.asarray(fn(logps, ref, "k1")), [1.0, -1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(fn(logps, ref, "k2")), [0.5, 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(fn(logps, ref, "k3")), [math.exp(-1), math.e - 2, 0.0], rtol=1e-6)
    # k3 ~ d^2 / 2 + d^3 / 6 at small d, in float32, where exp(d) - 1 - d loses its digits to cancellation.
    for d in (1e-6, 1e-4, -3e-3, 0.05, -0.099, 0.3, -0.499, 0.501, -0.6, 2.0):
        d32 = float(np.float32(d))
        got = float(jax.jit(kl_penalty)(jnp.float32(0.0), jnp.float32(d)))
        assert got == pytest.approx(math.expm1(d32) - d32, rel=1e-6), d
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        kl_penalty(logps, ref, "k4")


def test_entropy_from_logits():
    rng = np.random.default_rng(4)
    logits = (3 * rng.normal(size=(2, 3, 11))).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(np.asarray(jax.jit(entropy_from_logits)(logits)), want, rtol=1e-5)
    assert float(entropy_from_logits(jnp.zeros(7))) == pytest.approx(math.log(7), rel=1e-6)
    masked = jnp.array([1.0, 2.0, -jnp.inf, -jnp.inf])
    value, grad = jax.value_and_grad(entropy_from_logits)(masked)
    q = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    assert float(value) == pytest.approx(-(q * np.log(q)).sum(), rel=1e-6)
    assert np.isfinite(np.asarray(grad)).all()


# --------------------------------------------------------------------------------------------------------
# policy losses


def policy_inputs(seed=0, n=5, t=6, spread=0.3):
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-3.0, -0.1, size=(n, t)).astype(np.float32)
    old = (logps + spread * rng.normal(size=(n, t))).astype(np.float32)
    adv = rng.normal(size=(n,)).astype(np.float32)
    mask = right_padded([6, 3, 0, 1, 5][:n], t)
    return logps, old, adv, mask


def normaliser(mask, loss_agg, max_len):
    """[N, 1]-broadcastable divisor turning each token's term into its share of the aggregated loss."""
    tokens = mask.sum(1, keepdims=True)
    if loss_agg == "seq_mean_token_mean":
        return np.maximum(tokens, 1) * (tokens > 0).sum()
    if loss_agg == "token_mean":
        return mask.sum()
    return max_len * mask.shape[0]


@pytest.mark.parametrize("loss", ["ppo_clip", "cispo"])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_on_policy_gradient_is_reinforce_with_baseline(loss_agg, per_token_adv, loss):
    """mu = 1 (old = stop_gradient(logps)): d loss / d logps = -A * mask / normaliser."""
    logps, _, adv, mask = policy_inputs()
    if per_token_adv:
        adv = np.random.default_rng(9).normal(size=logps.shape).astype(np.float32)
    max_len = 8

    def f(lp, a):
        kw = dict(loss_agg=loss_agg, max_completion_length=max_len, loss=loss)
        return policy_loss(lp, sg(lp), a, mask, clip_low=0.2, clip_high=0.28, **kw)[0]

    grad = np.asarray(jax.jit(jax.grad(f))(logps, adv))
    a2 = adv if per_token_adv else adv[:, None]
    want = np.where(mask, -a2 / normaliser(mask, loss_agg, max_len), 0.0)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    # The loss value at r = 1: the aggregated -A (ppo_clip).
    if loss == "ppo_clip":
        value = float(jax.jit(f)(logps, adv))
        assert value == pytest.approx(
            float(np.where(mask, -a2 / normaliser(mask, loss_agg, max_len), 0).sum()), rel=1e-5
        )


def test_gspo_sequence_ratio_value_and_gradient():
    """GSPO: r_i = exp(mean_t (logp - old)); loss = mean_i -min(r_i A_i, clip(r_i) A_i) (GRPO agg)."""
    logps, old, _, mask = policy_inputs(1)
    lengths = mask.sum(1)
    # Per-row shifts make row 0's ratio ~1.5 (A > 0: clipped), row 1's ~0.9, row 4's ~1.1.
    old = old.copy()
    old[0] = logps[0] - 0.4
    old[1] = logps[1] + 0.1 + 0.05 * np.arange(6)
    old[4] = logps[4] - 0.1
    adv = np.array([1.0, -2.0, 0.5, 3.0, 0.7], np.float32)
    log_r = np.array([((logps[i] - old[i])[mask[i]]).mean() if lengths[i] else 0.0 for i in range(5)])
    r = np.exp(log_r)
    rows = lengths > 0
    per_row = -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv)
    want_loss = per_row[rows].sum() / rows.sum()

    def f(lp):
        return policy_loss(lp, old, adv, mask, importance_level="sequence")

    (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logps)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    unclipped = r * adv <= np.clip(r, 0.8, 1.2) * adv
    # d r_i / d lp_t = r_i / n_i for each of row i's n_i tokens; a clipped row's loss is constant.
    d_row = np.where(unclipped, -adv * r, 0.0) / np.maximum(lengths, 1) / rows.sum()
    np.testing.assert_allclose(np.asarray(grad), np.where(mask, d_row[:, None], 0.0), rtol=1e-5, atol=1e-7)
    assert not unclipped[0] and unclipped[1] and unclipped[4]
    # Each row's tokens share its ratio: the clip count is per token.
    per_token, stats = policy_token_losses(logps, old, adv, mask, importance_level="sequence")
    assert float(stats["clip_high"]) == lengths[0]
    np.testing.assert_allclose(float(stats["ratio_sum"]), (r * lengths).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_max"]), r[rows].max(), rtol=1e-6)


def test_cispo_clips_only_the_weight():
    """CISPO: loss = -sg(clip(r)) A logp: the gradient is -clip(r) A / normaliser, also where r is clipped."""
    logps, _, _, mask = policy_inputs(2)
    ratio = np.tile(np.array([0.5, 0.9, 1.0, 1.1, 1.3, 2.0], np.float32), (5, 1))
    old = (logps - np.log(ratio)).astype(np.float32)
    adv = np.array([1.0, -1.0, 2.0, -0.5, 0.3], np.float32)
    kw = dict(clip_low=0.2, clip_high=0.28, loss="cispo", loss_agg="token_mean")
    (loss, _), grad = jax.jit(
        jax.value_and_grad(lambda lp: policy_loss(lp, old, adv, mask, **kw), has_aux=True)
    )(logps)
    w = np.clip(ratio, 0.8, 1.28)
    want_grad = np.where(mask, -w * adv[:, None] / mask.sum(), 0.0)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    assert float(loss) == pytest.approx(
        (np.where(mask, -w * adv[:, None] * logps, 0)).sum() / mask.sum(), rel=1e-5
    )
    assert (w != ratio)[mask].any()  # clipping is active: ppo_clip would give these tokens no gradient
    ppo_grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, **{**kw, "loss": "ppo_clip"})[0])(logps)
    assert (np.asarray(ppo_grad)[mask & (w != ratio) & (adv[:, None] * (ratio - 1) > 0)] == 0).all()


def test_dual_clip_caps_negative_advantage_losses():
    ratio = jnp.array([[5.0, 5.0, 2.0, 0.5, 5.0]])
    logps = jnp.log(ratio) - 1.0
    old = jnp.full((1, 5), -1.0)
    adv = jnp.array([[-1.0, 2.0, -1.0, -1.0, -0.5]])
    mask = jnp.ones((1, 5), bool)
    fn = jax.jit(functools.partial(policy_token_losses, dual_clip=3.0))
    per_token, _ = fn(logps, old, adv, mask)
    # A=-1, r=5: PPO loss 5 capped at 3; A=2, r=5: -1.2*2 (no cap for A>0); A=-1, r=2: 2 < 3;
    # A=-1, r=0.5: -min(-0.5, -0.8) = 0.8; A=-0.5, r=5: 2.5 capped at 1.5.
    np.testing.assert_allclose(np.asarray(per_token), [[3.0, -2.4, 2.0, 0.8, 1.5]], rtol=1e-6)
    plain, _ = policy_token_losses(logps, old, adv, mask)
    np.testing.assert_allclose(np.asarray(plain), [[5.0, -2.4, 2.0, 0.8, 2.5]], rtol=1e-6)
    grad = jax.grad(lambda lp: fn(lp, old, adv, mask)[0].sum())(logps)
    np.testing.assert_allclose(np.asarray(grad)[0, [0, 1, 4]], 0.0)  # capped and clipped: constant
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_token_losses(logps, old, adv, mask, dual_clip=1.0)


def test_clip_higher_losses_and_fractions():
    ratio = jnp.array([[0.7, 0.85, 1.1, 1.25, 1.35, 0.7], [1.35, 0.7, 1.0, 1.0, 1.0, 1.0]])
    logps = jnp.log(ratio) - 2.0
    old = jnp.full(ratio.shape, -2.0)
    adv = jnp.array([[-1.0, -1.0, 1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
    fn = jax.jit(functools.partial(policy_loss, clip_low=0.2, clip_high=0.28, loss_agg="token_mean"))
    _, m = fn(logps, old, adv, mask)
    # low: r < 0.8 with A < 0 -> (0, 0) only; high: r > 1.28 with A > 0 -> (0, 4) only; 9 tokens.
    assert float(m["clip_frac_low"]) == pytest.approx(1 / 9)
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 9)
    per_token, stats = jax.jit(functools.partial(policy_token_losses, clip_low=0.2, clip_high=0.28))(
        logps, old, adv, mask
    )
    want = [[0.8, 0.85, -1.1, -1.25, -1.28, -0.7], [1.35, -0.7, -1.0, 0, 0, 0]]
    np.testing.assert_allclose(np.asarray(per_token), want, rtol=1e-6)
    assert float(stats["clip_low"]) == 1 and float(stats["clip_high"]) == 1 and float(stats["tokens"]) == 9
    r = np.asarray(ratio)[np.asarray(mask)]
    assert float(stats["ratio_sum"]) == pytest.approx(r.sum(), rel=1e-6)
    assert float(stats["max/ratio"]) == pytest.approx(1.35) and float(stats["min/ratio"]) == pytest.approx(
        0.7
    )
    assert float(m["ratio_mean"]) == pytest.approx(r.mean(), rel=1e-6)
    # Symmetric clipping (0.2) clips the 1.25 token too.
    sym, _ = policy_token_losses(logps, old, adv, mask)
    assert float(sym[0, 3]) == pytest.approx(-1.2)


def test_is_weights_scale_the_policy_term_only():
    logps, old, adv, mask = policy_inputs(3)
    ref = (logps - 0.2).astype(np.float32)
    w = np.random.default_rng(5).uniform(0.2, 2.0, size=logps.shape).astype(np.float32)
    fn = jax.jit(functools.partial(policy_token_losses, beta=0.1))
    plain, _ = fn(logps, old, adv, mask, ref_logps=ref)
    weighted, _ = fn(logps, old, adv, mask, ref_logps=ref, is_weights=w)
    kl = 0.1 * np.where(mask, np.asarray(kl_penalty(logps, ref)), 0)
    np.testing.assert_allclose(
        np.asarray(weighted) - kl, (np.asarray(plain) - kl) * w * mask, rtol=1e-5, atol=1e-6
    )
    dw = jax.grad(lambda x: fn(logps, old, adv, mask, ref_logps=ref, is_weights=x)[0].sum())(w)
    assert (np.asarray(dw) == 0).all()  # constants


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_beta_adds_the_kl_per_token(estimator):
    logps, old, adv, mask = policy_inputs(4)
    ref = (logps + 0.5 * np.random.default_rng(6).normal(size=logps.shape)).astype(np.float32)
    fn = jax.jit(functools.partial(policy_token_losses, kl_estimator=estimator))
    base, stats0 = fn(logps, old, adv, mask, ref_logps=ref)  # beta 0: kl logged, not added
    with_kl, stats = fn(logps, old, adv, mask, ref_logps=ref, beta=0.04)
    kl = np.where(mask, np.asarray(kl_penalty(logps, ref, estimator)), 0.0)
    np.testing.assert_allclose(np.asarray(with_kl) - np.asarray(base), 0.04 * kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(stats["kl_sum"]), kl.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(stats0["kl_sum"]), kl.sum(), rtol=1e-5)
    _, m = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04, kl_estimator=estimator)
    np.testing.assert_allclose(float(m["kl"]), kl.sum() / mask.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="pass ref_logps"):
        policy_token_losses(logps, old, adv, mask, beta=0.04)


def test_padding_garbage_stays_out_of_values_and_gradients():
    logps, old, adv, mask = policy_inputs(5)
    bad = lambda x: np.where(mask, x, np.inf).astype(np.float32)
    ref = logps - 0.1
    for loss in ("ppo_clip", "cispo"):
        f = lambda lp, loss=loss: policy_loss(
            lp, bad(old), np.where(mask, adv[:, None], np.nan), mask, ref_logps=bad(ref), beta=0.1, loss=loss
        )[0]
        value, grad = jax.value_and_grad(f)(bad(logps))
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
        assert (np.asarray(grad)[~mask] == 0).all()


def test_empty_batch_and_option_errors():
    z = jnp.zeros((2, 3))
    none = jnp.zeros((2, 3), bool)
    loss, m = jax.jit(policy_loss)(z, z, jnp.ones(2), none)
    assert float(loss) == 0.0 and float(m["ratio_min"]) == 1.0 and float(m["ratio_max"]) == 1.0
    _, stats = policy_token_losses(z, z, jnp.ones(2), none)
    assert float(stats["max/ratio"]) == -np.inf and float(stats["min/ratio"]) == np.inf
    with pytest.raises(ValueError, match="'token', 'sequence'"):
        policy_token_losses(z, z, jnp.ones(2), none, importance_level="seq")
    with pytest.raises(ValueError, match="'ppo_clip', 'cispo'"):
        policy_token_losses(z, z, jnp.ones(2), none, loss="grpo")
    with pytest.raises(ValueError, match="'seq_mean_token_mean', 'token_mean', 'seq_mean_token_sum_norm'"):
        aggregate(z, none, "mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(z, none, "seq_mean_token_sum_norm")


def test_entropy_metric_is_the_masked_mean():
    logps, old, adv, mask = policy_inputs(6)
    ent = np.random.default_rng(7).uniform(0, 3, size=logps.shape).astype(np.float32)
    _, m = jax.jit(policy_loss)(logps, old, adv, mask, entropy=np.where(mask, ent, np.nan))
    assert float(m["entropy"]) == pytest.approx(ent[mask].mean(), rel=1e-6)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_aggregate_micro_batch_sums_equal_the_full_batch(loss_agg):
    rng = np.random.default_rng(8)
    per_token = rng.normal(size=(7, 5)).astype(np.float32)
    mask = right_padded([5, 0, 2, 5, 1, 0, 3], 5)
    fn = jax.jit(functools.partial(aggregate, loss_agg=loss_agg, max_completion_length=6))
    num, den = fn(np.where(mask, per_token, np.nan), mask)  # padding ignored
    x = np.where(mask, per_token, 0.0).astype(np.float64)
    rows = mask.sum(1)
    want = {
        "seq_mean_token_mean": ((x.sum(1) / np.maximum(rows, 1)).sum(), (rows > 0).sum()),
        "token_mean": (x.sum(), mask.sum()),
        "seq_mean_token_sum_norm": (x.sum() / 6, 7),
    }[loss_agg]
    np.testing.assert_allclose([float(num), float(den)], want, rtol=1e-5)
    for cuts in ([3], [1, 2, 6], [5]):
        parts = [fn(p, m) for p, m in zip(np.split(per_token, cuts), np.split(mask, cuts), strict=True)]
        np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(num), rtol=1e-5)
        assert sum(float(p[1]) for p in parts) == float(den)


def test_policy_stats_combine_over_micro_batches():
    """Sums add and the ``max/``/``min/`` extremes combine by max/min: the full batch's statistics."""
    logps, old, adv, mask = policy_inputs(7, n=5)
    ref = logps - 0.3
    fn = jax.jit(functools.partial(policy_token_losses, clip_low=0.1, clip_high=0.1))
    _, full = fn(logps, old, adv, mask, ref_logps=ref)
    parts = [fn(logps[s], old[s], adv[s], mask[s], ref_logps=ref[s])[1] for s in (slice(0, 2), slice(2, 5))]
    for key, value in full.items():
        op = max if key.startswith("max/") else min if key.startswith("min/") else lambda a, b: a + b
        np.testing.assert_allclose(float(op(*(p[key] for p in parts))), float(value), rtol=1e-5, err_msg=key)


def test_value_loss_clipping():
    v = jnp.array([[1.5, 0.5, 1.5, 1.1]])
    old = jnp.ones((1, 4))
    ret = jnp.array([[0.0, 2.0, 2.0, 5.0]])
    mask = jnp.array([[1, 1, 1, 0]], bool)
    fn = jax.jit(functools.partial(value_loss, clip=0.2))
    per_token, stats = fn(v, old, ret, mask)
    # v=1.5, R=0: (1.5)^2 vs (1.2)^2 -> unclipped; v=0.5, R=2: 2.25 vs (0.8-2)^2=1.44 -> unclipped;
    # v=1.5, R=2: 0.25 vs (1.2-2)^2=0.64 -> clipped; masked token: 0.
    np.testing.assert_allclose(np.asarray(per_token), [[1.125, 1.125, 0.32, 0.0]], rtol=1e-6)
    assert float(stats["clip_count"]) == 1 and float(stats["tokens"]) == 3
    grad = jax.grad(lambda x: fn(x, old, ret, mask)[0].sum())(v)
    np.testing.assert_allclose(np.asarray(grad), [[1.5, -1.5, 0.0, 0.0]], rtol=1e-6)  # clipped: constant


# --------------------------------------------------------------------------------------------------------
# TRL 1.16's GRPOTrainer._compute_loss, through minimal stand-ins.


def trl_grpo(
    trl,
    loss_type,
    level,
    logps,
    old,
    adv,
    mask,
    *,
    eps_low=0.2,
    eps_high=0.2,
    beta=0.0,
    ref=None,
    is_ratio=None,
    max_len=None,
    entropy=None,
):
    """TRL's loss, gradient w.r.t. the per-token log-probs, and logged metrics (float64 torch)."""
    torch = trl.torch
    f64 = functools.partial(torch.tensor, dtype=torch.float64)
    lp = f64(logps, requires_grad=True)
    ent = torch.zeros_like(lp) if entropy is None else f64(entropy)
    t = object.__new__(trl.GRPOTrainer)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    t.__dict__.update(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
    )
    n, width = lp.shape
    m = torch.tensor(mask, dtype=torch.long)
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": m,
        "advantages": f64(adv),
        "old_per_token_logps": f64(old),
        "num_items_in_batch": m.sum(),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = f64(ref)
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = f64(is_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = t._compute_loss(None, inputs)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy(), {k: v[-1] for k, v in t._metrics["train"].items()}


TRL_AGG = {
    "grpo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dapo": "token_mean",
    "cispo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}
TRL_CASES = [
    ("grpo", "token", {}),
    ("grpo", "sequence", {}),
    ("bnpo", "token", {}),
    ("dapo", "token", {"eps_high": 0.28}),
    ("dr_grpo", "token", {}),
    ("cispo", "token", {"eps_high": 1.05}),
    ("grpo", "token", {"beta": 0.04}),
    ("grpo", "sequence", {"beta": 0.04}),
    ("dapo", "token", {"is_ratio": True, "beta": 0.04}),
]


@pytest.mark.parametrize(
    "loss_type,level,extra", TRL_CASES, ids=[f"{a}-{b}-{'-'.join(c)}" for a, b, c in TRL_CASES]
)
def test_policy_loss_matches_trl(trl, loss_type, level, extra):
    rng = np.random.default_rng(11)
    n, t, max_len = 6, 5, 7
    logps = rng.uniform(-3.0, -0.1, size=(n, t)).astype(np.float32)
    shift = rng.normal(scale=0.3, size=(n, 1)) if level == "sequence" else 0.0  # clip some rows
    old = (logps + 0.3 * rng.normal(size=(n, t)) + shift).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    mask = right_padded([5, 3, 1, 4, 5, 2], t)
    ref = (logps + 0.3 * rng.normal(size=(n, t))).astype(np.float32)
    entropy = rng.uniform(0, 2, size=(n, t)).astype(np.float32)
    is_ratio = rng.uniform(0.5, 2.0, size=(n, t)).astype(np.float32) if extra.get("is_ratio") else None
    beta, eps_high = extra.get("beta", 0.0), extra.get("eps_high", 0.2)
    trl_loss, trl_grad, trl_m = trl_grpo(
        trl,
        loss_type,
        level,
        logps,
        old,
        adv,
        mask,
        eps_high=eps_high,
        beta=beta,
        ref=ref if beta else None,
        is_ratio=is_ratio,
        max_len=max_len,
        entropy=entropy,
    )
    # TRL's CISPO clamps at epsilon_high itself and never from below: clip_high = E - 1, clip_low = 1.
    clip_low, clip_high = (1.0, eps_high - 1) if loss_type == "cispo" else (0.2, eps_high)
    kw = dict(
        clip_low=clip_low,
        clip_high=clip_high,
        loss_agg=TRL_AGG[loss_type],
        importance_level=level,
        beta=beta,
        max_completion_length=max_len,
        loss="cispo" if loss_type == "cispo" else "ppo_clip",
    )
    f = lambda lp: policy_loss(
        lp, old, adv, mask, ref_logps=ref if beta else None, is_weights=is_ratio, entropy=entropy, **kw
    )
    (loss, m), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logps)
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(np.asarray(grad), trl_grad, rtol=1e-4, atol=1e-6)
    assert float(m["entropy"]) == pytest.approx(trl_m["entropy"], rel=1e-5)
    if beta:
        assert float(m["kl"]) == pytest.approx(trl_m["kl"], rel=1e-5)
    if loss_type == "cispo":
        assert float(m["clip_frac_high"]) == pytest.approx(trl_m["cispo_clip_ratio"], rel=1e-6)
        assert trl_m["cispo_clip_ratio"] > 0
    elif level == "token":  # TRL counts sequences at sequence level, we count their tokens
        assert float(m["clip_frac_low"]) == pytest.approx(trl_m["clip_ratio/low_mean"], rel=1e-6)
        assert float(m["clip_frac_high"]) == pytest.approx(trl_m["clip_ratio/high_mean"], rel=1e-6)
        assert trl_m["clip_ratio/low_mean"] + trl_m["clip_ratio/high_mean"] > 0


def test_trl_grpo_counts_empty_rows_we_do_not(trl):
    """TRL's grpo mean is over all rows (an empty row a 0 loss); ours over rows with tokens."""
    logps, old, adv, mask = policy_inputs(12)  # row 2 is empty
    trl_loss, _, _ = trl_grpo(trl, "grpo", "token", logps, old, adv, mask)
    loss, _ = policy_loss(logps, old, adv, mask)
    rows = mask.any(1)
    assert float(loss) * rows.sum() / len(rows) == pytest.approx(trl_loss, rel=1e-5)
    assert float(loss) != pytest.approx(trl_loss, rel=1e-3)
