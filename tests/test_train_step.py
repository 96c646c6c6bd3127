"""The step factory: accumulation equals one large batch, the loss is the global per-token mean, the step
is sharded like the 1-device step (8 simulated devices in a subprocess), and the optimizer state shards."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.config import base_config
from jaxrl_llm.data.pipeline import to_device
from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.objectives import sft_objective, token_logps
from jaxrl_llm.parallel import make_mesh, tree_shardings
from jaxrl_llm.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from jaxrl_llm.train.state import TrainState
from jaxrl_llm.train.step import NO_FROZEN, build_update, compile_update, micro_batches
from tests.simulated_devices import run_on_cpu_devices

ROOT = Path(__file__).resolve().parents[1]
ARCH = get_preset("qwen3-tiny", vocab_size=128, num_heads=4, num_kv_heads=2)
BATCH, SEQ = 8, 24


def make_config(accum: int = 1, name: str = "adamw"):
    cfg = base_config()
    cfg.optimizer.name = name
    cfg.optimizer.lr = 1e-2
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.weight_decay = 0.1
    cfg.train.steps = 10
    cfg.train.batch_size = BATCH
    cfg.train.grad_accum_steps = accum
    return cfg


def make_batch(seed: int) -> dict[str, np.ndarray]:
    """Packed rows with uneven target counts: two documents in some rows, padding in others."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(1, ARCH.vocab_size, (BATCH, SEQ)).astype(np.int32)
    loss_mask = rs.rand(BATCH, SEQ) < np.linspace(0.1, 0.9, BATCH)[:, None]  # rows differ a lot
    segment_ids = np.ones((BATCH, SEQ), np.int32)
    segment_ids[::2, SEQ // 2 :] = 2
    segment_ids[1, SEQ - 5 :] = 0
    positions = np.zeros((BATCH, SEQ), np.int32)
    for b in range(BATCH):
        for s in (1, 2):
            idx = np.flatnonzero(segment_ids[b] == s)
            positions[b, idx] = np.arange(len(idx))
    loss_mask &= segment_ids > 0
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
        "num_truncated": np.zeros(BATCH, np.int32),
    }


def run_steps(cfg, mesh, batches, arch=ARCH):
    """Steps through ``batches``; returns flat params (path -> array) and the metrics of every step."""
    from flax import nnx

    model = create_model(arch, seed=0, mesh=mesh)
    opt = OptimizerConfig.from_config(cfg)
    tx = make_optimizer(opt, nnx.state(model, nnx.Param))
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    step = build_update(
        graphdef, sft_objective(), tx, make_schedule(opt), accum_steps=cfg.train.grad_accum_steps
    )
    rng = jax.random.key(1)
    metrics = []
    compiled = None
    for batch in batches:
        device_batch = to_device(batch, mesh)
        compiled = compiled or compile_update(step, state, device_batch, rng, mesh)
        state, m = compiled(state, device_batch, rng, NO_FROZEN)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    flat = {
        "/".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
        for p, v in nnx.to_flat_state(state.params)
    }
    return flat, metrics


def reference_loss(params_model, batch) -> float:
    """The SFT loss written out independently: per-token NLL averaged over all targets of the batch."""
    logits = np.asarray(
        params_model(
            jnp.asarray(batch["tokens"]),
            positions=jnp.asarray(batch["positions"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
        )
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    total, count = 0.0, 0
    for b in range(BATCH):
        for t in range(SEQ - 1):
            seg = batch["segment_ids"][b]
            if batch["loss_mask"][b, t + 1] and seg[t + 1] == seg[t] and seg[t] > 0:
                total -= logp[b, t, batch["tokens"][b, t + 1]]
                count += 1
    return total / count


@pytest.mark.slow
def test_loss_is_the_global_mean_over_target_tokens():
    cfg = make_config()
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = make_batch(0)
    model = create_model(ARCH, seed=0)
    want = reference_loss(model, batch)
    _, metrics = run_steps(cfg, mesh, [batch])
    assert metrics[0]["loss"] == pytest.approx(want, rel=1e-5)
    expected_targets = sum(
        batch["loss_mask"][b, t + 1]
        and batch["segment_ids"][b, t + 1] == batch["segment_ids"][b, t]
        and batch["segment_ids"][b, t] > 0
        for b in range(BATCH)
        for t in range(SEQ - 1)
    )
    assert metrics[0]["target_tokens"] == expected_targets
    assert metrics[0]["tokens"] == (batch["segment_ids"] > 0).sum()
    assert metrics[0]["learning_rate"] == pytest.approx(1e-2)
    assert metrics[0]["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("accum", [2, 4, 8])
def test_accumulation_equals_one_large_batch(accum):
    mesh = make_mesh(devices=jax.devices()[:1])
    batches = [make_batch(s) for s in range(2)]
    # SGD's update is linear in the gradient, so equal parameters mean equal gradients. (Adam's first
    # step is lr * sign(g) where |g| ~ eps, which turns rounding into visible differences.)
    want_params, want_metrics = run_steps(make_config(1, "sgd"), mesh, batches)
    got_params, got_metrics = run_steps(make_config(accum, "sgd"), mesh, batches)
    for name in want_params:
        np.testing.assert_allclose(got_params[name], want_params[name], atol=1e-7, rtol=1e-5, err_msg=name)
    for want, got in zip(want_metrics, got_metrics, strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_micro_batches_are_strided_row_splits():
    x = jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)
    split = micro_batches({"x": x}, 4)["x"]
    assert split.shape == (4, 2, 3)
    assert split[:, :, 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params_and_a_close_loss():
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = make_batch(0)
    _, want = run_steps(make_config(), mesh, [batch])
    params, got = run_steps(make_config(), mesh, [batch], arch=ARCH.replace(dtype="bfloat16"))
    assert all(v.dtype == np.float32 for v in params.values())
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=2e-2)


def test_token_logps_is_float32_log_softmax():
    logits = jnp.asarray([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], jnp.bfloat16)
    got = token_logps(logits, jnp.asarray([[2, 0]]))
    assert got.dtype == jnp.float32
    want = np.log(np.exp([3.0]) / np.exp([1.0, 2.0, 3.0]).sum())[0]
    np.testing.assert_allclose(np.asarray(got), [[want, np.log(1 / 3)]], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_steps_and_its_state_gets_a_sharding(name):
    from flax import nnx

    cfg = make_config(name=name)
    mesh = make_mesh(devices=jax.devices()[:1])
    params, metrics = run_steps(cfg, mesh, [make_batch(0), make_batch(1)])
    assert all(np.isfinite(v).all() for v in params.values())
    assert metrics[1]["loss"] < metrics[0]["loss"] + 1.0
    model = create_model(ARCH, seed=0)
    tx = make_optimizer(OptimizerConfig.from_config(cfg), nnx.state(model, nnx.Param))
    _, state = TrainState.create(model, tx, jax.random.key(0))
    shardings = jax.tree.leaves(tree_shardings(state, mesh))
    assert len(shardings) == len(jax.tree.leaves(state))


def test_compiled_step_reports_memory_and_donates_state():
    cfg = make_config()
    mesh = make_mesh(devices=jax.devices()[:1])
    model = create_model(ARCH, seed=0)
    from flax import nnx

    opt = OptimizerConfig.from_config(cfg)
    tx = make_optimizer(opt, nnx.state(model, nnx.Param))
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    step = build_update(graphdef, sft_objective(), tx, make_schedule(opt))
    batch = to_device(make_batch(0), mesh)
    compiled = compile_update(step, state, batch, jax.random.key(1), mesh)
    assert compiled.memory.get("temp_size_in_bytes", 0) > 0
    assert "compiled in" in compiled.describe()
    leaf = jax.tree.leaves(state.params)[0]
    compiled(state, batch, jax.random.key(1), NO_FROZEN)
    assert leaf.is_deleted()  # donated: the step reuses the state's buffers


@pytest.mark.slow
def test_sharded_step_equals_one_device_on_8_devices():
    run_on_cpu_devices(["-m", "tests.train_8dev"], 8, "8-device train step checks passed")
