"""Optimizer builder, schedules, weight-decay and freeze masks, and the TrainState pytree."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_llm.config import ConfigError, base_config, validate
from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.train.optimizer import OptimizerConfig, decay_mask, make_optimizer, make_schedule, param_path
from jaxrl_llm.train.state import TrainState


def _cfg(**optimizer):
    cfg = base_config()
    cfg.train.steps = optimizer.pop("steps", 110)
    for key, value in optimizer.items():
        cfg.optimizer[key] = value
    validate(cfg)
    return OptimizerConfig.from_config(cfg)


def _paths(tree) -> dict[str, object]:
    return {param_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def tiny_params():
    return nnx.state(create_model(get_preset("qwen2-tiny")), nnx.Param)


# lr 1, 10 warmup steps, 100 decay steps (train.steps 110): step 60 is the middle of the decay.
@pytest.mark.parametrize(
    "shape, expected",
    [
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5 * (1 + math.cos(math.pi / 2)), 110: 0.0}),
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0}),
    ],
)
def test_schedule_values(shape, expected):
    schedule = make_schedule(_cfg(lr=1.0, warmup_steps=10, schedule=shape))
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), (shape, step)


def test_schedule_without_warmup_starts_at_peak():
    schedule = make_schedule(_cfg(lr=2.0, warmup_steps=0, schedule="linear", steps=100))
    assert float(schedule(0)) == pytest.approx(2.0)
    assert float(schedule(50)) == pytest.approx(1.0)


def test_decay_mask_skips_norms_and_biases(tiny_params):
    mask = _paths(decay_mask(tiny_params))
    assert mask["blocks/attn/q_bias"] is False and mask["blocks/attn/k_bias"] is False
    assert mask["blocks/attn_norm/weight"] is False and mask["final_norm/weight"] is False
    assert mask["blocks/attn/q"] is True and mask["blocks/mlp/down"] is True
    assert mask["embed/embedding"] is True
    assert decay_mask({"v": jnp.ones(3), "s": jnp.ones(()), "m": jnp.ones((2, 2))}) == {
        "v": False,
        "s": False,
        "m": True,
    }


def test_adamw_matches_hand_written_update():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.95, 1e-8, 0.1
    cfg = _cfg(
        name="adamw", lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, schedule="constant", warmup_steps=0
    )
    cfg = dataclasses.replace(cfg, clip_norm=None)
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.3, -0.7])}
    tx = make_optimizer(cfg, params)
    opt_state = tx.init(params)
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    grads_by_step = [
        {"w": np.array([[0.2, -0.1], [0.4, 0.05]]), "b": np.array([-0.3, 0.6])},
        {"w": np.array([[-0.5, 0.3], [0.1, 0.2]]), "b": np.array([0.1, 0.2])},
    ]
    for t, grads in enumerate(grads_by_step, start=1):
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, grads), opt_state, params)
        params = optax.apply_updates(params, updates)
        # AdamW (Loshchilov & Hutter): p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), decay on matrices.
        for k in ref:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            decay = wd * ref[k] if k == "w" else 0.0
            ref[k] = ref[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
    for k in ref:
        np.testing.assert_allclose(np.asarray(params[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_global_norm_clipping():
    cfg = _cfg(name="sgd", lr=1.0, b1=0.0, weight_decay=0.0, schedule="constant", warmup_steps=0)
    cfg = dataclasses.replace(cfg, clip_norm=2.0)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    grads = {"a": jnp.array([6.0, 0.0]), "b": jnp.array(8.0)}  # global norm 10
    tx = make_optimizer(cfg, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(updates["a"], [-1.2, 0.0], rtol=1e-5)
    np.testing.assert_allclose(updates["b"], -1.6, rtol=1e-5)


def test_frozen_parameters_do_not_move(tiny_params):
    cfg = _cfg(name="adamw", lr=1e-2, weight_decay=0.1, warmup_steps=0, freeze="embed|attn_norm")
    tx = make_optimizer(cfg, tiny_params)
    grads = jax.tree.map(jnp.ones_like, tiny_params)
    updates, _ = tx.update(grads, tx.init(tiny_params), tiny_params)
    new = _paths(optax.apply_updates(tiny_params, updates))
    old = _paths(tiny_params)
    for path in ("embed/embedding", "blocks/attn_norm/weight"):
        np.testing.assert_array_equal(new[path], old[path])
    for path in ("blocks/attn/q", "blocks/mlp_norm/weight", "final_norm/weight"):
        assert not np.array_equal(new[path], old[path]), path


def test_bad_freeze_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer.freeze"):
        make_optimizer(_cfg(freeze="("), {"w": jnp.ones((2, 2))})


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_reduces_a_quadratic(name):
    cfg = _cfg(name=name, lr=0.1, weight_decay=0.01, warmup_steps=5, schedule="cosine", steps=50)
    target = {"w": jnp.linspace(-1.0, 1.0, 16).reshape(4, 4), "b": jnp.array([0.5, -0.5, 1.0, 0.0])}
    params = jax.tree.map(jnp.zeros_like, target)

    def loss(p):
        return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

    tx = make_optimizer(cfg, params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    opt_state, start = tx.init(params), float(loss(params))
    for _ in range(50):
        params, opt_state = step(params, opt_state)
    assert float(loss(params)) < 0.2 * start, name


def test_train_state_is_a_jittable_pytree():
    model = create_model(get_preset("qwen2-tiny"))
    cfg = _cfg(lr=1e-2, warmup_steps=0)
    tx = make_optimizer(cfg, nnx.state(model, nnx.Param))
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))

    @jax.jit
    def train_step(state: TrainState) -> TrainState:
        rng, sub = jax.random.split(state.rng)
        tokens = jax.random.randint(sub, (2, 8), 0, 256)

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens)
            return -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

        grads = jax.grad(loss)(state.params)
        return state.apply_gradients(grads, tx).replace(rng=rng)

    new = train_step(state)
    assert int(new.step) == 1 and new.step.dtype == jnp.int32
    before, after = jax.tree.leaves(state.params), jax.tree.leaves(new.params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert not np.array_equal(jax.random.key_data(new.rng), jax.random.key_data(state.rng))


def test_float32_state_keeps_bfloat16_parameters_moments_in_float32():
    """optimizer.state_dtype=float32: Adam's moments are float32 for bfloat16 parameters, and the update is
    the float32 AdamW update of the float32 values, cast to bfloat16 (the param-dtype state rounds its
    moments to bfloat16 instead)."""
    cfg = _cfg(name="adamw", lr=0.1, schedule="constant", warmup_steps=0)
    cfg = dataclasses.replace(cfg, clip_norm=None)
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], jnp.bfloat16)}
    grads = {"w": jnp.array([[0.2, -0.1], [0.4, 0.05]], jnp.float32)}
    wide = make_optimizer(dataclasses.replace(cfg, state_dtype="float32"), params)
    state = wide.init(params)
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 2]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    updates, _ = wide.update(grads, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    f32 = {"w": params["w"].astype(jnp.float32)}
    reference = make_optimizer(cfg, f32)
    want, _ = reference.update(grads, reference.init(f32), f32)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(want["w"].astype(jnp.bfloat16)))
    narrow = make_optimizer(cfg, params)
    assert all(
        x.dtype == jnp.bfloat16 for x in jax.tree.leaves(narrow.init(params)) if getattr(x, "ndim", 0) == 2
    )
