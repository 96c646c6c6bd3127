"""Preference / reward-model losses: hand-computed values, TRL 1.16's own code, extremes, jit.

The references here are written independently of ``jaxrl_llm.objectives.preference``: plain float64 numpy
formulas from the papers / TRL source, a few literal hand-computed values, and TRL's trainers called on
torch tensors through minimal stand-ins for the model and the accelerator (no trainer is built).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.objectives.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

LN2 = math.log(2.0)
# Loss types that read label_smoothing, with the values they are tested at.
SMOOTHING = {
    "sigmoid": (0.0, 0.1),
    "robust": (0.0, 0.1),
    "exo_pair": (1e-3, 0.1),
    "aot": (0.0, 0.1),
    "aot_unpaired": (0.0, 0.1),
}
DPO_CASES = [(t, ls) for t in DPO_LOSS_TYPES for ls in SMOOTHING.get(t, (0.0,))]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}


# --------------------------------------------------------------------------------------------------------
# Independent float64 numpy references.


def np_logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sig(x):
    return np.exp(np_logsig(x))


def ref_dpo(loss_type, c, r, rc, rr, *, beta, ls=0.0, tau=0.05):
    c, r, rc, rr = (np.asarray(v, np.float64) for v in (c, r, rc, rr))
    cl, rl = c - rc, r - rr
    logits = (c - r) - (rc - rr)
    x = beta * logits

    def cdpo(z):
        return -(1 - ls) * np_logsig(z) - ls * np_logsig(-z)

    if loss_type == "sigmoid":
        out = cdpo(x)
    elif loss_type == "robust":
        out = ((1 - ls) * -np_logsig(x) - ls * -np_logsig(-x)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        out = np.maximum(0.0, 1 - x)
    elif loss_type == "ipo":
        out = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        out = np_sig(x) * (np_logsig(x) - math.log(1 - ls)) + np_sig(-x) * (np_logsig(-x) - math.log(ls))
    elif loss_type == "nca_pair":
        out = -np_logsig(beta * cl) - 0.5 * np_logsig(-beta * cl) - 0.5 * np_logsig(-beta * rl)
    elif loss_type == "bco_pair":
        out = -np_logsig(beta * cl) - np_logsig(-beta * rl)
    elif loss_type == "sppo_hard":
        out = (cl - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    elif loss_type == "aot":
        out = cdpo(beta * (np.sort(c - r) - np.sort(rc - rr)))
    elif loss_type == "aot_unpaired":
        out = cdpo(beta * (np.sort(cl) - np.sort(rl)))
    elif loss_type == "apo_zero":
        out = (1 - np_sig(beta * cl)) + np_sig(beta * rl)
    elif loss_type == "apo_down":
        out = np_sig(beta * cl) + (1 - np_sig(beta * (cl - rl)))
    elif loss_type == "discopop":
        m = np_sig(x / tau)
        with np.errstate(over="ignore"):
            exp_part = np.where(m == 0.0, 0.0, np.exp(-x) * m)
        out = -np_logsig(x) * (1 - m) + exp_part
    else:
        raise AssertionError(loss_type)
    return out, beta * cl, beta * rl


def dpo_inputs():
    """(chosen, rejected, ref_chosen, ref_rejected), float64 [10]: logits 0, +-50, +-500 and ordinary ones."""
    cl = np.array([0.0, 3.0, 25.0, -25.0, 250.0, -250.0, 0.7, -1.3, 50.0, 0.0])
    rl = np.array([0.0, 3.0, -25.0, 25.0, -250.0, 250.0, -0.4, 2.1, 0.0, -500.0])
    rc = np.array([-12.0, -40.5, -7.25, -30.0, -300.0, -20.0, -3.5, -60.0, -100.0, -600.0])
    rr = np.array([-12.0, -18.0, -33.0, -5.5, -15.0, -400.0, -9.0, -2.75, -80.0, -1.0])
    return cl + rc, rl + rr, rc, rr


# --------------------------------------------------------------------------------------------------------
# DPO: hand values.


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type,ls", DPO_CASES)
def test_dpo_matches_numpy_formula(loss_type, ls, beta, dtype):
    inputs = [v.astype(dtype) for v in dpo_inputs()]
    want, want_c, want_r = ref_dpo(loss_type, *inputs, beta=beta, ls=ls)
    with jax.enable_x64(dtype == np.float64):
        fn = jax.jit(functools.partial(dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=ls))
        losses, chosen_rewards, rejected_rewards = (np.asarray(a) for a in fn(*inputs))
        eager = np.asarray(dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=ls)[0])
    assert losses.dtype == dtype and losses.shape == (10,)
    np.testing.assert_allclose(losses, want, **TOL[dtype])
    np.testing.assert_allclose(eager, losses, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chosen_rewards, want_c, **TOL[dtype])
    np.testing.assert_allclose(rejected_rewards, want_r, **TOL[dtype])


def test_dpo_literal_values_at_equal_logps():
    """All log-ratios 0 (policy == reference), beta = 0.1: values computed by hand."""
    z = jnp.zeros(2)
    eps = 1e-3
    expected = {
        ("sigmoid", 0.0): LN2,
        ("sigmoid", 0.1): LN2,  # 0.9 ln2 + 0.1 ln2
        ("robust", 0.1): LN2,  # (0.9 ln2 - 0.1 ln2) / 0.8
        ("hinge", 0.0): 1.0,
        ("ipo", 0.0): 25.0,  # (0 - 1/0.2)^2
        ("exo_pair", eps): -LN2 - 0.5 * math.log(eps * (1 - eps)),
        ("nca_pair", 0.0): 2 * LN2,
        ("bco_pair", 0.0): 2 * LN2,
        ("sppo_hard", 0.0): 50.0,  # 5^2 + 5^2
        ("aot", 0.0): LN2,
        ("aot_unpaired", 0.0): LN2,
        ("apo_zero", 0.0): 1.0,
        ("apo_down", 0.0): 1.0,
        ("discopop", 0.0): (LN2 + 1) / 2,  # ln2 * (1 - 1/2) + exp(0) * 1/2
    }
    assert {t for t, _ in expected} == set(DPO_LOSS_TYPES)
    for (loss_type, ls), want in expected.items():
        losses, cr, rr = dpo_loss(
            z - 3.0, z - 7.0, z - 3.0, z - 7.0, beta=0.1, loss_type=loss_type, label_smoothing=ls
        )
        np.testing.assert_allclose(np.asarray(losses), [want, want], rtol=1e-6, err_msg=loss_type)
        assert np.all(np.asarray(cr) == 0) and np.all(np.asarray(rr) == 0)


def test_dpo_literal_values_at_large_margins():
    one = jnp.ones(1)
    # sigmoid, beta 0.1, logits +-500 (x = +-50): loss ~ 0 / ~ 50; cDPO ls=0.1 at x=50: ~ 0.1 * 50.
    sig = lambda logit, **kw: float(dpo_loss(one * logit, one * 0, one * 0, one * 0, beta=0.1, **kw)[0][0])
    assert sig(500.0) == pytest.approx(math.exp(-50), rel=1e-5)
    assert sig(-500.0) == pytest.approx(50.0, rel=1e-6)
    assert sig(500.0, label_smoothing=0.1) == pytest.approx(5.0, rel=1e-6)
    assert sig(-500.0, label_smoothing=0.1) == pytest.approx(45.0, rel=1e-6)
    assert sig(500.0, loss_type="hinge") == 0.0
    assert sig(5.0, loss_type="hinge") == pytest.approx(0.5)
    assert sig(-500.0, loss_type="ipo") == pytest.approx(505.0**2)
    # discopop, logits -500 -> x = -50: -logsig(-50) ~ 50 (modulation ~ 0), no overflow of exp(50) * 0.
    assert sig(-500.0, loss_type="discopop") == pytest.approx(50.0, rel=1e-6)
    assert sig(500.0, loss_type="discopop") == pytest.approx(math.exp(-50), rel=1e-4)


def test_aot_sorts_within_the_batch():
    beta = 0.5
    # logratios = chosen - rejected = [3, -1, 2] -> sorted [-1, 2, 3]
    # ref_logratios = [0, 5, -2] -> sorted [-2, 0, 5]; delta = [1, 2, -2]
    c, r = jnp.array([3.0, -1.0, 2.0]), jnp.zeros(3)
    rc, rr = jnp.array([0.0, 5.0, -2.0]), jnp.zeros(3)
    losses, cr, _ = dpo_loss(c, r, rc, rr, beta=beta, loss_type="aot")
    np.testing.assert_allclose(np.asarray(losses), -np_logsig(beta * np.array([1.0, 2.0, -2.0])), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cr), beta * np.array([3.0, -6.0, 4.0]), rtol=1e-6)  # per pair
    paired = dpo_loss(c, r, rc, rr, beta=beta, loss_type="sigmoid")[0]
    assert not np.allclose(np.asarray(paired), np.asarray(losses))
    # Permuting the batch permutes nothing in the (sorted) losses.
    perm = jnp.array([2, 0, 1])
    np.testing.assert_allclose(
        np.asarray(dpo_loss(c[perm], r[perm], rc[perm], rr[perm], beta=beta, loss_type="aot")[0]),
        np.asarray(losses),
        rtol=1e-6,
    )
    # Label smoothing: the cDPO form on the sorted deltas.
    sm = dpo_loss(c, r, rc, rr, beta=beta, loss_type="aot", label_smoothing=0.1)[0]
    d = beta * np.array([1.0, 2.0, -2.0])
    np.testing.assert_allclose(np.asarray(sm), -0.9 * np_logsig(d) - 0.1 * np_logsig(-d), rtol=1e-6)


def test_aot_unpaired_sorts_chosen_and_rejected_separately():
    beta = 0.5
    # chosen logratios [1, -2, 4] -> [-2, 1, 4]; rejected [0, 3, -1] -> [-1, 0, 3]; delta [-1, 1, 1]
    c, rc = jnp.array([1.0, -2.0, 4.0]) - 10.0, jnp.full(3, -10.0)
    r, rr = jnp.array([0.0, 3.0, -1.0]) - 4.0, jnp.full(3, -4.0)
    losses = dpo_loss(c, r, rc, rr, beta=beta, loss_type="aot_unpaired")[0]
    np.testing.assert_allclose(np.asarray(losses), -np_logsig(beta * np.array([-1.0, 1.0, 1.0])), rtol=1e-6)
    # Unpaired: shuffling the chosen side alone changes nothing.
    perm = jnp.array([1, 2, 0])
    shuffled = dpo_loss(c[perm], r, rc[perm], rr, beta=beta, loss_type="aot_unpaired")[0]
    np.testing.assert_allclose(np.asarray(shuffled), np.asarray(losses), rtol=1e-6)
    # ... whereas paired aot sees different pairs.
    assert not np.allclose(
        np.asarray(dpo_loss(c[perm], r, rc[perm], rr, beta=beta, loss_type="aot")[0]),
        np.asarray(dpo_loss(c, r, rc, rr, beta=beta, loss_type="aot")[0]),
    )


def test_dpo_rejects_bad_arguments():
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="valid loss types: sigmoid, robust, hinge"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="nope")
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="exo_pair")  # label_smoothing 0: log(0)
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="discopop", discopop_tau=0.0)


def test_dpo_promotes_bf16_and_accepts_traced_beta():
    c, r, rc, rr = (jnp.asarray(v, jnp.bfloat16) for v in dpo_inputs())
    losses, cr, _ = dpo_loss(c, r, rc, rr, beta=0.1)
    assert losses.dtype == jnp.float32 and cr.dtype == jnp.float32
    f = jax.jit(lambda beta, *xs: dpo_loss(*xs, beta=beta, loss_type="ipo")[0])
    np.testing.assert_allclose(
        np.asarray(f(jnp.float32(0.1), c, r, rc, rr)),
        np.asarray(dpo_loss(c, r, rc, rr, beta=0.1, loss_type="ipo")[0]),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------------------------------------
# Gradients at extremes.


def _assert_finite_grads(fn, *args):
    value = fn(*args)
    grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
    assert np.isfinite(float(value)), value
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))), grads


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type,ls", DPO_CASES)
def test_dpo_gradients_finite_at_extremes(loss_type, ls, beta):
    # logits +-1e4 and log-ratios of +-1e4 one side at a time; log-probs down to -2e4.
    c = jnp.array([-1.0, -1e4 - 1.0, -1e4, -5.0, -1e-9, -2e4])
    r = jnp.array([-1e4 - 1.0, -1.0, -1e4, -5.0, -1e4, -1e-9])
    rc = jnp.array([-1.0, -1.0, -1.0, -1e4, -1e4, -1e-9])
    rr = jnp.array([-1.0, -1.0, -1e4, -1.0, -1e-9, -1e4])
    fn = lambda *xs: dpo_loss(*xs, beta=beta, loss_type=loss_type, label_smoothing=ls)[0].sum()
    _assert_finite_grads(fn, c, r, rc, rr)


def test_other_losses_gradients_finite_at_extremes():
    big = jnp.array([-1e-9, -1e4, -1.0, -1e4, -0.5, 0.0])
    small = jnp.array([-1e4, -1e-9, -1e4, -1.0, -1e-30, -1e-9])
    for beta in (0.1, 1.0):
        _assert_finite_grads(lambda c, r, beta=beta: orpo_loss(c, r, beta=beta)[0].sum(), big, small)
        _assert_finite_grads(lambda c, r, beta=beta: orpo_loss(c, r, beta=beta)[1].sum(), big, small)
        _assert_finite_grads(lambda c, r, beta=beta: orpo_loss(c, r, beta=beta)[0].sum(), small, big)
    for ls in (0.0, 0.1):
        _assert_finite_grads(
            lambda c, r, ls=ls: simpo_loss(c, r, beta=10.0, gamma=1.0, label_smoothing=ls).sum(), big, small
        )
        _assert_finite_grads(
            lambda c, r, ls=ls: simpo_loss(c, r, beta=10.0, gamma=1.0, label_smoothing=ls).sum(), small, big
        )
    margin = jnp.array([0.0, 1e4, -1e4, 1.0, 0.5, 2.0])
    _assert_finite_grads(
        lambda c, r: bradley_terry_loss(c, r, margin=margin, center_coef=0.01).sum(), big, small
    )
    _assert_finite_grads(lambda c, r: bradley_terry_loss(c * -1, r, margin=margin).sum(), big, small)
    for kl_shift in (0.0, 1e4):
        kto = lambda *xs: kto_loss(*xs, beta=1.0, desirable_weight=1.3, undesirable_weight=0.7)[0].sum()
        _assert_finite_grads(kto, big, small, small + kl_shift, small, big, small)


def test_orpo_log_odds_gradient_on_both_branches():
    # d/dp log_odds(p) = d/dp [p - log(1 - e^p)] = 1 / (1 - e^p); the branch switch is at p = -ln 2.
    p = np.array([-1e4, -5.0, -0.8, -LN2 - 1e-3, -LN2 + 1e-3, -0.3, -1e-3, -1e-6])
    grad = jax.grad(lambda x: orpo_loss(x, jnp.full_like(x, -1.0), beta=0.1)[1].sum())(jnp.asarray(p))
    np.testing.assert_allclose(np.asarray(grad), 1 / -np.expm1(p), rtol=1e-5)


def test_orpo_stays_finite_at_probability_one():
    for p in (0.0, -1e-30, -1e-9):
        losses, lor = orpo_loss(jnp.array([p]), jnp.array([-2.0]), beta=0.1)
        assert np.isfinite(np.asarray(losses)).all() and np.isfinite(np.asarray(lor)).all()
        assert float(lor[0]) > 15.0  # odds(P ~ 1) are huge
        losses, lor = orpo_loss(jnp.array([-2.0]), jnp.array([p]), beta=0.1)
        assert np.isfinite(np.asarray(losses)).all() and float(lor[0]) < -15.0


# --------------------------------------------------------------------------------------------------------
# KTO, ORPO, SimPO, Bradley-Terry: hand values.


def ref_kto(pc, pr, pkl, rc, rr, rkl, beta, wd=1.0, wu=1.0):
    z = max(0.0, float(np.mean(np.asarray(pkl, np.float64) - rkl))) if len(pkl) else 0.0
    cl, rl = np.asarray(pc, np.float64) - rc, np.asarray(pr, np.float64) - rr
    losses = np.concatenate([wd * (1 - np_sig(beta * (cl - z))), wu * (1 - np_sig(beta * (z - rl)))])
    return losses, beta * cl, beta * rl, z


KTO_ARGS = dict(
    pc=np.array([-10.0, -3.0, -50.0]),
    pr=np.array([-20.0, -4.5]),
    pkl=np.array([-30.0, -12.0, -8.0, -25.0]),
    rc=np.array([-12.0, -2.0, -49.0]),
    rr=np.array([-19.0, -7.0]),
    rkl=np.array([-31.0, -15.0, -9.5, -24.0]),
)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])
def test_kto_matches_formula(weights):
    a = KTO_ARGS
    wd, wu = weights
    args = [a[k] for k in ("pc", "pr", "pkl", "rc", "rr", "rkl")]
    want = ref_kto(*args, beta=0.1, wd=wd, wu=wu)
    assert want[3] == pytest.approx(1.125)  # mean([1, 3, 1.5, -1])
    fn = jax.jit(functools.partial(kto_loss, beta=0.1, desirable_weight=wd, undesirable_weight=wu))
    got = fn(*args)
    assert got[0].shape == (5,)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-7)


def test_kto_weights_scale_each_side():
    a = KTO_ARGS
    args = [a[k] for k in ("pc", "pr", "pkl", "rc", "rr", "rkl")]
    base = np.asarray(kto_loss(*args, beta=0.1)[0])
    weighted = np.asarray(kto_loss(*args, beta=0.1, desirable_weight=3.0, undesirable_weight=0.25)[0])
    np.testing.assert_allclose(weighted, base * np.array([3.0, 3.0, 3.0, 0.25, 0.25]), rtol=1e-6)


def test_kto_reference_point_is_a_clamped_constant():
    a = KTO_ARGS
    pc, pr, pkl, rc, rr, rkl = (jnp.asarray(a[k]) for k in ("pc", "pr", "pkl", "rc", "rr", "rkl"))
    grad_kl = jax.grad(lambda p, q: kto_loss(pc, pr, p, rc, rr, q, beta=0.1)[0].sum(), argnums=(0, 1))(
        pkl, rkl
    )
    assert all(np.all(np.asarray(g) == 0.0) for g in grad_kl)
    # Policy far below the reference on the KL completions: mean < 0 -> z = 0.
    losses, _, _, kl = kto_loss(pc, pr, pkl - 100.0, rc, rr, rkl, beta=0.1)
    assert float(kl) == 0.0
    np.testing.assert_allclose(
        np.asarray(losses), ref_kto(pc, pr, pkl - 100.0, rc, rr, rkl, 0.1)[0], rtol=1e-6
    )
    # Hand value: log-ratios 0 and z = 0 -> every loss is 1 - sigmoid(0) = 0.5.
    zeros = jnp.zeros(2)
    losses, cr, rr_, kl = kto_loss(zeros, zeros, zeros, zeros, zeros, zeros + 1.0, beta=0.1)
    assert float(kl) == 0.0 and np.allclose(np.asarray(losses), 0.5)
    # z = 2 (policy 2 above ref on the KL side), beta 1, log-ratios 0: chosen 1 - s(-2), rejected 1 - s(2).
    losses, _, _, kl = kto_loss(zeros, zeros, zeros + 2.0, zeros, zeros, zeros, beta=1.0)
    assert float(kl) == pytest.approx(2.0)
    np.testing.assert_allclose(np.asarray(losses), [np_sig(2.0)] * 2 + [np_sig(-2.0)] * 2, rtol=1e-6)


def test_kto_empty_sides():
    a = KTO_ARGS
    empty = np.zeros((0,))
    only_rejected = kto_loss(empty, a["pr"], a["pkl"], empty, a["rr"], a["rkl"], beta=0.1)
    want = ref_kto(empty, a["pr"], a["pkl"], empty, a["rr"], a["rkl"], 0.1)
    assert only_rejected[0].shape == (2,) and only_rejected[1].shape == (0,)
    np.testing.assert_allclose(np.asarray(only_rejected[0]), want[0], rtol=1e-6)
    only_chosen = jax.jit(functools.partial(kto_loss, beta=0.1))(
        a["pc"], empty, a["pkl"], a["rc"], empty, a["rkl"]
    )
    assert only_chosen[0].shape == (3,) and only_chosen[2].shape == (0,)
    np.testing.assert_allclose(
        np.asarray(only_chosen[0]),
        ref_kto(a["pc"], empty, a["pkl"], a["rc"], empty, a["rkl"], 0.1)[0],
        rtol=1e-6,
    )
    nothing = kto_loss(empty, empty, a["pkl"], empty, empty, a["rkl"], beta=0.1)
    assert nothing[0].shape == (0,)
    # No KL completions: z = 0 (TRL's calculate_KL=False).
    no_kl = kto_loss(a["pc"], a["pr"], empty, a["rc"], a["rr"], empty, beta=0.1)
    assert float(no_kl[3]) == 0.0
    np.testing.assert_allclose(
        np.asarray(no_kl[0]), ref_kto(a["pc"], a["pr"], empty, a["rc"], a["rr"], empty, 0.1)[0], rtol=1e-6
    )


def ref_log_odds(p):
    p = np.asarray(p, np.float64)
    prob = np.exp(p)
    return np.log(prob / (1 - prob))  # fine in float64 for the moderate p used here


def test_orpo_matches_formula():
    c = np.array([-0.01, -0.5, -1.0, -2.0, -0.2, -30.0])
    r = np.array([-0.02, -1.5, -0.3, -2.0, -5.0, -0.9])
    for beta in (0.1, 0.25):
        losses, lor = jax.jit(functools.partial(orpo_loss, beta=beta))(c, r)
        want_lor = ref_log_odds(c) - ref_log_odds(r)
        np.testing.assert_allclose(np.asarray(lor), want_lor, rtol=1e-5, atol=1e-5)
        want = -beta * np.log(1 / (1 + np.exp(-want_lor)))
        np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5, atol=1e-6)
    # Hand value: equal log-probs -> ratio 0 -> loss beta * ln 2.
    assert float(orpo_loss(jnp.array([-0.7]), jnp.array([-0.7]), beta=0.1)[0][0]) == pytest.approx(0.1 * LN2)
    # Very negative p: log-odds ~ p, so the ratio is c - r.
    lor = orpo_loss(jnp.array([-1e4]), jnp.array([-2e4]), beta=0.1)[1]
    assert float(lor[0]) == pytest.approx(1e4)


def test_simpo_matches_formula():
    c = np.array([-0.5, -1.0, -2.0, -0.1, -3.0])
    r = np.array([-0.5, -2.0, -1.0, -4.0, -3.1])
    for beta, gamma, ls in ((2.0, 1.0, 0.0), (10.0, 3.0, 0.0), (2.5, 1.4, 0.1)):
        z = beta * (c - r) - gamma
        want = -(1 - ls) * np_logsig(z) - ls * np_logsig(-z)
        got = jax.jit(functools.partial(simpo_loss, beta=beta, gamma=gamma, label_smoothing=ls))(c, r)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # Hand value: equal log-probs, gamma = 0 -> ln 2; gamma = beta * (c - r) -> ln 2.
    assert float(simpo_loss(jnp.array([-1.0]), jnp.array([-1.0]), beta=2.0, gamma=0.0)[0]) == pytest.approx(
        LN2
    )
    assert float(simpo_loss(jnp.array([-1.0]), jnp.array([-1.5]), beta=2.0, gamma=1.0)[0]) == pytest.approx(
        LN2
    )


def test_bradley_terry_matches_formula():
    c = np.array([1.0, -2.0, 0.5, 30.0, -30.0])
    r = np.array([0.0, 1.0, 0.5, -20.0, 20.0])
    m = np.array([0.5, 0.0, 1.0, 2.0, -1.0])
    for margin in (None, m):
        for coef in (0.0, 0.01):
            d = c - r - (0.0 if margin is None else margin)
            want = -np_logsig(d) + coef * (c + r) ** 2
            fn = jax.jit(functools.partial(bradley_terry_loss, center_coef=coef))
            np.testing.assert_allclose(np.asarray(fn(c, r, margin=margin)), want, rtol=1e-6)
    # Hand values: equal scores -> ln 2; centering adds coef * (c + r)^2.
    assert float(bradley_terry_loss(jnp.ones(1), jnp.ones(1))[0]) == pytest.approx(LN2)
    assert float(bradley_terry_loss(jnp.ones(1), jnp.ones(1), center_coef=0.01)[0]) == pytest.approx(
        LN2 + 0.04
    )
    assert float(bradley_terry_loss(jnp.ones(1), jnp.zeros(1), margin=jnp.ones(1))[0]) == pytest.approx(LN2)


# --------------------------------------------------------------------------------------------------------
# TRL 1.16's own code, called on torch tensors through minimal stand-ins.


@pytest.fixture(scope="module")
def trl():
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    with warnings.catch_warnings():  # TRLExperimentalWarning: ORPO and CPO live in trl.experimental
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer

    return SimpleNamespace(
        torch=torch,
        DPOTrainer=trl.DPOTrainer,
        KTOTrainer=trl.KTOTrainer,
        RewardTrainer=trl.RewardTrainer,
        ORPOTrainer=ORPOTrainer,
        CPOTrainer=CPOTrainer,
    )


class FakeLM:
    """Stands in for the fused-LM-head model: returns fixed per-token log-probs (by input width)."""

    training = True

    def __init__(self, torch, log_probs_by_width):
        self.torch = torch
        self.by_width = log_probs_by_width

    def __call__(self, *, input_ids, **kwargs):
        lp = self.by_width[input_ids.shape[1]]
        zeros = self.torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trainer(cls, torch, **attrs):
    t = object.__new__(cls)
    t.accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens = 0
    t._tp_size = 1
    t.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def trl_dpo(trl, loss_type, beta, ls, tau, c, r, rc, rr, lengths=None):
    """TRL's DPO loss (its batch mean) and logged mean rewards; ``lengths``: completion token counts."""
    torch = trl.torch
    b = len(c)
    lens = np.ones(2 * b, int) if lengths is None else np.concatenate(lengths)
    width = int(lens.max())
    per_token = torch.zeros(2 * b, width, dtype=torch.float64)
    completion_mask = torch.zeros(2 * b, width + 1, dtype=torch.long)
    for i, (total, n) in enumerate(zip(np.concatenate([c, r]), lens, strict=True)):
        per_token[i, :n] = float(total) / n
        completion_mask[i, 1 : n + 1] = 1
    model = FakeLM(torch, {width + 1: per_token})
    t = _trainer(
        trl.DPOTrainer,
        torch,
        model=model,
        ld_alpha=None,
        precompute_ref_logps=True,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        f_divergence_type="reverse_kl",
        label_smoothing=ls,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
    )
    input_ids = torch.zeros(2 * b, width + 1, dtype=torch.long)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(rc, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(rr, dtype=torch.float64),
    }
    loss = float(t._compute_loss(model, inputs, return_outputs=False))
    metrics = t._metrics["train"]
    return loss, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


@pytest.mark.parametrize("loss_type,ls", DPO_CASES)
def test_dpo_matches_trl(trl, loss_type, ls):
    beta, tau = 0.1, 0.05
    c, r, rc, rr = dpo_inputs()
    if loss_type == "sigmoid" and ls:
        # Deviation: TRL 1.16's sigmoid ignores label_smoothing (cDPO is checked against the formula above
        # and against TRL's CPO sigmoid below). Pin it down: TRL(ls) == ours(ls=0) != ours(ls).
        with jax.enable_x64(True):
            plain = np.asarray(dpo_loss(c, r, rc, rr, beta=beta)[0])
            smoothed = np.asarray(dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=ls)[0])
        np.testing.assert_allclose(
            plain.mean(), trl_dpo(trl, "sigmoid", beta, ls, tau, c, r, rc, rr)[0], rtol=1e-9
        )
        assert abs(smoothed.mean() - plain.mean()) > 1e-2
        return
    with jax.enable_x64(True):
        if loss_type == "ipo":
            # TRL divides the summed log-ratios by the token counts; we are given the averages.
            lc, lr = np.array([1, 3, 7, 2, 5, 1, 4, 9, 2, 6]), np.array([2, 1, 3, 8, 5, 2, 1, 1, 4, 3])
            ours = dpo_loss(c / lc, r / lr, rc / lc, rr / lr, beta=beta, loss_type="ipo")
        else:
            lc = lr = None
            ours = dpo_loss(
                c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls, discopop_tau=tau
            )
        losses, chosen_rewards, rejected_rewards = (np.asarray(a) for a in ours)
    if loss_type in ("aot", "aot_unpaired"):  # batch losses: only the mean is TRL's
        trl_loss, _, _ = trl_dpo(trl, loss_type, beta, ls, tau, c, r, rc, rr)
        np.testing.assert_allclose(losses.mean(), trl_loss, rtol=1e-9, atol=1e-9)
        return
    tol = 1e-7 if loss_type == "exo_pair" else 1e-9  # TRL takes log(eps) of a float32 torch.tensor(eps)
    for i in range(len(c)):
        sl = slice(i, i + 1)
        lengths = None if lc is None else (lc[sl], lr[sl])
        trl_loss, trl_cr, trl_rr = trl_dpo(
            trl, loss_type, beta, ls, tau, c[sl], r[sl], rc[sl], rr[sl], lengths
        )
        np.testing.assert_allclose(
            losses[i], trl_loss, rtol=tol, atol=tol, err_msg=f"{loss_type} example {i}"
        )
        if loss_type != "ipo":  # TRL's logged IPO rewards use the summed log-probs
            np.testing.assert_allclose([chosen_rewards[i], rejected_rewards[i]], [trl_cr, trl_rr], rtol=1e-9)


def test_dpo_discopop_beats_trl_overflow(trl):
    """TRL computes exp(-x) * sigmoid(x / tau): nan in float32 once exp(-x) overflows; ours stays finite."""
    torch = trl.torch
    x = torch.tensor([-100.0], dtype=torch.float32)
    trl_like = torch.exp(-x) * torch.sigmoid(x / 0.05)
    assert torch.isnan(trl_like).all()
    one = jnp.ones(1)
    ours = dpo_loss(one * -1000.0, one * 0, one * 0, one * 0, beta=0.1, loss_type="discopop")[0]
    np.testing.assert_allclose(np.asarray(ours), [100.0], rtol=1e-6)


def trl_kto(trl, beta, wd, wu, pc, pr, pkl, rc, rr, rkl):
    """TRL's KTO loss (nanmean over the concatenated losses) and its kl, for chosen/rejected/KL arrays."""
    torch = trl.torch
    n, k = len(pc) + len(pr), len(pkl)
    main = torch.tensor(np.concatenate([pc, pr]), dtype=torch.float64)[
        :, None
    ]  # width 2 -> 1 log-prob column
    kl_lp = torch.zeros(k, 2, dtype=torch.float64)  # width 3 -> 2 columns
    kl_lp[:, 0] = torch.tensor(pkl, dtype=torch.float64)
    model = FakeLM(torch, {2: main, 3: kl_lp})
    t = _trainer(
        trl.KTOTrainer,
        torch,
        model=model,
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    ids, kl_ids = torch.zeros(n, 2, dtype=torch.long), torch.zeros(k, 3, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": torch.ones_like(ids),
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": torch.ones_like(kl_ids),
        "label": torch.tensor([True] * len(pc) + [False] * len(pr)),
        "ref_logps": torch.tensor(np.concatenate([rc, rr]), dtype=torch.float64),
        "ref_KL_logps": torch.tensor(rkl, dtype=torch.float64),
    }
    loss = float(t._compute_loss(model, batch, return_outputs=False))
    return loss, t._metrics["train"]["kl"][-1]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
@pytest.mark.parametrize("kl_shift", [0.0, -100.0])
def test_kto_matches_trl(trl, weights, kl_shift):
    a = dict(KTO_ARGS)
    a["pkl"] = a["pkl"] + kl_shift
    wd, wu = weights
    beta = 0.1
    with jax.enable_x64(True):
        losses, _, _, kl = (
            np.asarray(v)
            for v in kto_loss(
                a["pc"],
                a["pr"],
                a["pkl"],
                a["rc"],
                a["rr"],
                a["rkl"],
                beta=beta,
                desirable_weight=wd,
                undesirable_weight=wu,
            )
        )
    empty = np.zeros(0)
    trl_mean, trl_kl = trl_kto(trl, beta, wd, wu, a["pc"], a["pr"], a["pkl"], a["rc"], a["rr"], a["rkl"])
    np.testing.assert_allclose(losses.mean(), trl_mean, rtol=1e-9)
    np.testing.assert_allclose(kl, trl_kl, rtol=1e-9, atol=1e-12)
    for i in range(len(a["pc"])):  # one chosen example per TRL batch: TRL's mean is that example's loss
        sl = slice(i, i + 1)
        got = trl_kto(trl, beta, wd, wu, a["pc"][sl], empty, a["pkl"], a["rc"][sl], empty, a["rkl"])[0]
        np.testing.assert_allclose(losses[i], got, rtol=1e-9)
    for j in range(len(a["pr"])):
        sl = slice(j, j + 1)
        got = trl_kto(trl, beta, wd, wu, empty, a["pr"][sl], a["pkl"], empty, a["rr"][sl], a["rkl"])[0]
        np.testing.assert_allclose(losses[len(a["pc"]) + j], got, rtol=1e-9)


def test_orpo_matches_trl(trl):
    torch = trl.torch
    c = np.array([-1e-9, -0.01, -0.5, -0.69, -0.7, -2.0, -30.0, -1e4, -0.3], np.float32)
    r = np.array([-1e4, -0.02, -1.5, -0.7, -0.69, -2.0, -0.9, -1e-9, -12.0], np.float32)
    for beta in (0.1, 0.5):
        t = _trainer(trl.ORPOTrainer, torch, beta=beta)
        trl_losses, _, _, _, _ = t.odds_ratio_loss(torch.tensor(c), torch.tensor(r))
        losses, lor = orpo_loss(c, r, beta=beta)
        # TRL returns beta * log_sigmoid(ratio) and subtracts its mean from the NLL.
        np.testing.assert_allclose(np.asarray(losses), -trl_losses.numpy(), rtol=1e-6, atol=1e-6)
        for i in range(len(c)):  # TRL returns only the batch mean of the log-odds ratio
            one = t.odds_ratio_loss(torch.tensor(c[i : i + 1]), torch.tensor(r[i : i + 1]))[4]
            np.testing.assert_allclose(float(lor[i]), float(one), rtol=1e-6, atol=1e-6)


def test_simpo_matches_trl_cpo(trl):
    torch = trl.torch
    c = np.array([-0.5, -1.0, -2.0, -0.1, -3.0, -40.0, -0.01])
    r = np.array([-0.5, -2.0, -1.0, -4.0, -3.1, -0.02, -50.0])
    for beta, gamma, ls in ((2.0, 1.0, 0.0), (10.0, 3.0, 0.0), (2.5, 1.4, 0.1)):
        t = _trainer(
            trl.CPOTrainer,
            torch,
            alpha=0.0,
            loss_type="simpo",
            beta=beta,
            simpo_gamma=gamma,
            label_smoothing=ls,
        )
        trl_losses = t.cpo_loss(torch.tensor(c), torch.tensor(r))[0].numpy()
        with jax.enable_x64(True):
            ours = np.asarray(simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=ls))
        np.testing.assert_allclose(ours, trl_losses, rtol=1e-9, atol=1e-12)
    # cDPO (our sigmoid with label smoothing) is CPO's sigmoid loss with a reference subtracted.
    t = _trainer(trl.CPOTrainer, torch, alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=0.1)
    cpo = t.cpo_loss(torch.tensor(c), torch.tensor(r))[0].numpy()
    with jax.enable_x64(True):
        ours = np.asarray(dpo_loss(c, r, 0 * c, 0 * r, beta=0.1, loss_type="sigmoid", label_smoothing=0.1)[0])
    np.testing.assert_allclose(ours, cpo, rtol=1e-9, atol=1e-12)


def test_bradley_terry_matches_trl(trl):
    torch = trl.torch
    c = np.array([1.0, -2.0, 0.5, 30.0, -30.0])
    r = np.array([0.0, 1.0, 0.5, -20.0, 20.0])
    m = np.array([0.5, 0.0, 1.0, 2.0, -1.0])

    class FakeRM:
        training = True

        def __init__(self, scores):
            self.scores = scores

        def __call__(self, **kwargs):
            return SimpleNamespace(logits=self.scores[:, None])

    for margin in (None, m):
        for coef in (None, 0.01):
            with jax.enable_x64(True):
                ours = np.asarray(bradley_terry_loss(c, r, margin=margin, center_coef=coef or 0.0))
            for i in range(len(c)):
                model = FakeRM(torch.tensor([c[i], r[i]], dtype=torch.float64))
                t = _trainer(
                    trl.RewardTrainer,
                    torch,
                    model=model,
                    args=SimpleNamespace(center_rewards_coefficient=coef),
                )
                inputs = {
                    "input_ids": torch.zeros(2, 3, dtype=torch.long),
                    "attention_mask": torch.ones(2, 3),
                }
                if margin is not None:
                    inputs["margin"] = torch.tensor(margin[i : i + 1], dtype=torch.float64)
                trl_loss = float(t.compute_loss(model, inputs))
                np.testing.assert_allclose(ours[i], trl_loss, rtol=1e-9, atol=1e-12)
