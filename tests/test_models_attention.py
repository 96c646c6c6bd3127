"""Attention kernels: the dispatch decision, and each kernel's call path against the einsum reference.

cuDNN and TPU kernels cannot run here. The dispatch is a pure function of a call's facts, checked directly;
the cuDNN path is ``jax.nn.dot_product_attention`` whose ``implementation=`` the tests switch from "cudnn"
to "xla" (the same call otherwise), and the splash kernel runs in Pallas interpret mode.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.config.schema import FIELDS
from jaxrl_llm.models import ModelConfigError, abstract_model, create_model, get_preset
from jaxrl_llm.models import attention_kernels as kernels
from jaxrl_llm.models.attention import make_mask
from jaxrl_llm.models.attention_kernels import CallFacts, choose_kernel
from jaxrl_llm.models.config import ATTENTION_KERNELS
from jaxrl_llm.models.transformer import segment_positions
from tests.simulated_devices import ROOT, run_on_cpu_devices


def pair(cfg, attention: str = "auto"):
    """(reference model on the einsum path, the same parameters with ``attention``), made once."""
    reference = create_model(cfg.replace(attention="xla"), seed=0)
    graphdef = nnx.graphdef(abstract_model(cfg.replace(attention=attention)))
    return reference, nnx.merge(graphdef, nnx.state(reference))


def jitted(model, method: str = "__call__"):
    """``model.<method>`` compiled once per shape (op-by-op eager forwards are slow to dispatch)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args, **kw: getattr(nnx.merge(graphdef, state), method)(*args, **kw))
    return lambda *args, **kw: fn(state, *args, **kw)


GPU_BF16 = CallFacts("gpu", "bfloat16", 64, 256, 256, gpu_capability=9.0)
TPU = CallFacts("tpu", "float32", 128, 256, 256)


@pytest.mark.parametrize(
    "requested, facts, kernel, why",
    [
        ("auto", CallFacts("cpu", "float32", 64, 256, 256), "xla", ""),
        ("auto", GPU_BF16, "cudnn", ""),
        ("auto", CallFacts("gpu", "float32", 64, 256, 256), "xla", ""),  # auto falls back silently
        ("xla", GPU_BF16, "xla", ""),
        ("cudnn", CallFacts("gpu", "float32", 64, 256, 256), "xla", "bfloat16 or float16"),
        ("cudnn", CallFacts("cpu", "bfloat16", 64, 256, 256), "xla", "needs an NVIDIA GPU"),
        ("cudnn", CallFacts("gpu", "bfloat16", 64, 256, 256, softcap=True), "xla", "soft-capping"),
        ("cudnn", CallFacts("gpu", "float16", 256, 256, 256, gpu_capability=9.0), "cudnn", ""),
        ("cudnn", CallFacts("gpu", "float16", 256, 256, 256, gpu_capability=8.0), "xla", "at most 128"),
        ("cudnn", CallFacts("gpu", "bfloat16", 60, 256, 256), "xla", "multiple of 8"),
        ("cudnn", CallFacts("gpu", "bfloat16", 64, 255, 255), "xla", "even lengths"),
        ("cudnn", CallFacts("gpu", "bfloat16", 64, 64, 512, cached=True), "cudnn", ""),  # cached prefill
        ("cudnn", CallFacts("gpu", "bfloat16", 64, 1, 512, cached=True), "xla", ""),  # decode: filled slots
        ("auto", TPU, "splash", ""),
        ("auto", CallFacts("tpu", "float32", 128, 200, 200), "xla", ""),
        ("splash", CallFacts("tpu", "bfloat16", 128, 256, 256, softcap=True), "splash", ""),
        ("splash", CallFacts("tpu", "float32", 64, 256, 256), "xla", "multiple of 128"),
        ("splash", CallFacts("tpu", "float32", 128, 100, 100), "xla", "multiple of 128"),
        ("splash", CallFacts("tpu", "float32", 128, 256, 512, cached=True), "xla", "without a KV cache"),
        ("splash", CallFacts("tpu", "float32", 128, 256, 256, segments=False), "xla", "shared prompt"),
        ("splash", GPU_BF16, "xla", "needs a TPU"),
    ],
)
def test_choose_kernel(requested, facts, kernel, why):
    got, reason = choose_kernel(requested, facts)
    assert got == kernel
    assert (why in reason) if why else reason == ""


def test_kernel_names_are_one_list_and_checked():
    assert ATTENTION_KERNELS == kernels.KERNELS
    (field,) = [f for f in FIELDS if f.key == "model.attention"]
    assert field.choices == ATTENTION_KERNELS and field.default == "auto"
    with pytest.raises(ModelConfigError, match="attention='flash'; supported: auto, xla, cudnn, splash"):
        get_preset("llama-tiny", attention="flash")
    with pytest.raises(ValueError, match="supported: auto"):
        choose_kernel("flash", TPU)


def test_an_explicit_request_that_cannot_run_falls_back_and_logs_once(caplog):
    want, model = map(jitted, pair(get_preset("llama-tiny"), "cudnn"))
    tokens = jnp.ones((1, 6), jnp.int32)
    kernels._logged.clear()
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        got = model(tokens)
        model(tokens[:, :4])  # traced again: no second warning
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want(tokens)))
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "attention='cudnn': cuDNN needs an NVIDIA GPU (platform: cpu); this call uses the einsum path"
    ]


# ------------------------------------------------------------------------------------ kernel-level checks

B, T, H, K, D = 3, 12, 4, 2, 16  # grouped-query: 2 query heads per KV head


def _qkv(seed: int, t: int = T, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, t, H, D), dtype)
    k, v = (jax.random.normal(key, (B, t, K, D), dtype) for key in keys[1:])
    return q, k, v


def _mask(case: str, t: int = T):
    """(allowed bool[B, T, T] for the layer, valid bool[B, T], segments int32[B, T] or None)."""
    valid = np.ones((B, t), bool)
    segment_ids = shared = positions = None
    window = 0
    if case in ("padded", "window"):
        valid[1, :3] = False  # left padding
        valid[2, t - 4 :] = False  # right padding
        window = 4 if case == "window" else 0
    if case == "packed":
        segment_ids = np.ones((B, t), np.int32)
        segment_ids[:, t // 3 :] = 2
        segment_ids[1, t // 2 :] = 3
        segment_ids[2, t - 2 :] = 0  # padding after the last document
        valid &= segment_ids > 0
    if case == "shared":  # prompt | chosen | rejected, both answers seeing the prompt
        third = t // 3
        segment_ids = np.repeat(np.asarray([1, 2, 3], np.int32), third)[None].repeat(B, 0)
        shared = (np.arange(t) < third)[None].repeat(B, 0)
        positions = np.concatenate([np.arange(2 * third), np.arange(third, 2 * third)])[None].repeat(B, 0)
    if positions is None:
        positions = (
            segment_positions(jnp.asarray(segment_ids))
            if segment_ids is not None
            else np.maximum(np.cumsum(valid, 1) - 1, 0)
        )
    positions = jnp.asarray(positions, jnp.int32)
    valid = jnp.asarray(valid)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    mask = make_mask(
        positions, valid, positions, valid, jnp.arange(t), seg, None if shared is None else shared
    )
    segments = jnp.where(valid, 1 if seg is None else seg, 0)
    return mask.for_window(jnp.int32(window)), valid, segments, window


def _reference(q, k, v, allowed, scale=D**-0.5, cap=None):
    """The einsum path on [B, T, H, D] inputs, heads-major inside as the model runs it."""
    b, t = q.shape[:2]
    qh = q.reshape(b, t, K, H // K, D).transpose(0, 2, 3, 1, 4)
    out = kernels.attend_reference(
        qh, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), allowed, scale=scale, cap=cap
    )
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, H, D)


@pytest.mark.parametrize("case", ["causal", "padded", "window", "packed", "shared"])
def test_dot_product_attention_call_equals_the_einsum_path(case):
    q, k, v = _qkv(0)
    allowed, *_ = _mask(case)
    want = _reference(q, k, v, allowed)
    got = kernels.attend_dpa(q, k, v, allowed, scale=D**-0.5, causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("block", [4, 5, 64])  # several blocks, a block that does not divide S, one block
def test_cached_attention_reads_blocks_up_to_the_filled_slot(block):
    """A cache of S=14 slots, queries at slots 5..7 (the rest unwritten): equals full attention."""
    q, k, v = _qkv(1, t=14)
    q = q[:, 5:8]
    allowed = jnp.arange(14)[None, None] <= jnp.arange(5, 8)[None, :, None]  # causal over slots
    allowed = allowed & jnp.asarray(np.random.RandomState(0).rand(B, 1, 14) > 0.3) | (
        jnp.arange(14)[None, None] == jnp.arange(5, 8)[None, :, None]
    )
    allowed = jnp.broadcast_to(allowed, (B, 3, 14))
    qh = q.reshape(B, 3, K, H // K, D).transpose(0, 2, 3, 1, 4)
    keys, values = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    kw = dict(scale=D**-0.5, cap=5.0)
    want = kernels.attend_reference(qh, keys, values, allowed, **kw)
    got = kernels.attend_cached(qh, keys, values, allowed, jnp.int32(8), block=block, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # What lies past ``filled`` changes nothing; with 4-slot blocks slots 8.. are not even read (NaN there).
    junk = jnp.nan if block == 4 else 1e4
    junk = keys.at[..., 8:].set(junk), values.at[:, :, 8:].set(junk)
    got = kernels.attend_cached(qh, *junk, allowed, jnp.int32(8), block=block, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("case, cap", [("padded", None), ("window", None), ("packed", 20.0)])
def test_splash_kernel_equals_the_einsum_path(monkeypatch, case, cap):
    monkeypatch.setattr(kernels, "SPLASH_INTERPRET", True)
    q, k, v = _qkv(2, t=128)
    allowed, valid, segments, window = _mask(case, t=128)
    want = _reference(q, k, v, allowed, cap=cap)
    got = kernels.attend_splash(q, k, v, segments, scale=D**-0.5, cap=cap, window=window)
    # Padding queries differ (the kernel lets them see earlier padding); their outputs are never used.
    np.testing.assert_allclose(
        np.asarray(got)[np.asarray(valid)], np.asarray(want)[np.asarray(valid)], atol=1e-5
    )


# ------------------------------------------------------------------------------------- through the model


@pytest.fixture
def fake_gpu(monkeypatch):
    """The model believes it runs on a Hopper GPU; cuDNN's call runs with implementation="xla". Returns the
    list of implementations the model called jax.nn.dot_product_attention with."""
    calls = []
    real = kernels.attend_dpa

    def spy(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "platform_facts", lambda: ("gpu", 9.0))
    monkeypatch.setitem(kernels.DPA_IMPLEMENTATION, "cudnn", "xla")
    monkeypatch.setattr(kernels, "attend_dpa", spy)
    return calls


def _tokens(seed: int, batch: int = 3, length: int = 20):
    tokens = np.random.RandomState(seed).randint(1, 97, (batch, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0  # left padding
    mask[-1, length - 6 :] = 0  # right padding
    return jnp.asarray(tokens), jnp.asarray(mask)


BF16_TOL = 0.03  # bfloat16 keeps ~3 significant digits; the logits here are O(1)


@pytest.mark.parametrize("family, scan", [("llama", False), ("gemma3", True)])
def test_model_on_the_cudnn_path_equals_the_einsum_path_in_bfloat16(fake_gpu, family, scan):
    windows = (4, None) if family == "gemma3" else None
    base = dict(vocab_size=97, num_layers=2, dtype="bfloat16", sliding_windows=windows, scan_layers=scan)
    reference, model = map(jitted, pair(get_preset(f"{family}-tiny", **base)))
    tokens, mask = _tokens(0)
    want = np.asarray(reference(tokens, attention_mask=mask))
    got = np.asarray(model(tokens, attention_mask=mask))
    assert fake_gpu and set(fake_gpu) == {"xla"}
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=BF16_TOL)
    # Packed documents with a shared prompt (a preference pair): a mask, not segment ids, so cuDNN takes it.
    segments = jnp.asarray(np.repeat([1, 2, 3, 0], 5)[None].repeat(3, 0), jnp.int32)
    shared = jnp.asarray(np.arange(20) < 5)[None].repeat(3, 0)
    positions = jnp.asarray(np.r_[0:10, 5:10, 0:5])[None].repeat(3, 0)
    kw = dict(segment_ids=segments, shared=shared, positions=positions)
    valid = np.asarray(segments > 0)
    np.testing.assert_allclose(
        np.asarray(model(tokens, **kw))[valid], np.asarray(reference(tokens, **kw))[valid], atol=BF16_TOL
    )


def test_cached_prefill_on_the_cudnn_path_then_decode(fake_gpu):
    """A 20-token prefill into a 32-slot cache goes through cuDNN's call; the decode steps do not."""
    base = dict(vocab_size=97, num_layers=2, dtype="bfloat16")
    reference, model = pair(get_preset("qwen3-tiny", **base))
    tokens, mask = _tokens(1, length=24)
    full = np.asarray(jitted(reference)(tokens, attention_mask=mask))
    forward = jitted(model, "forward")
    out = forward(tokens[:, :20], attention_mask=mask[:, :20], cache=model.init_cache(3, 32))
    assert len(fake_gpu) == 2  # one prefill call per layer
    logits = [np.asarray(out.logits)]
    for t in range(20, 24):
        out = forward(tokens[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=out.cache)
        logits.append(np.asarray(out.logits))
    assert len(fake_gpu) == 2
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(np.concatenate(logits, 1)[valid], full[valid], atol=BF16_TOL)


def test_decode_on_a_per_row_cache_reads_blocks_and_equals_the_full_forward(monkeypatch):
    """Rows at their own cache index (the engine's slots), 3-slot blocks, decode over the leading rows."""
    monkeypatch.setattr(kernels, "DECODE_BLOCK", 3)
    model = create_model(
        get_preset("gemma2-tiny", vocab_size=97, num_layers=2, sliding_windows=(4, None)), seed=0
    )
    rs = np.random.RandomState(3)
    lengths = np.asarray([2, 7, 4])
    prompts = np.where(np.arange(8)[None] < lengths[:, None], rs.randint(1, 97, (3, 8)), 0).astype(np.int32)
    new = rs.randint(1, 97, (3, 5)).astype(np.int32)
    cache = model.init_cache(4, 40, per_row=True)  # a 4th, free slot
    real = jnp.asarray(np.arange(8)[None] < lengths[:, None])
    forward = jitted(model, "forward")
    out = forward(jnp.asarray(prompts), attention_mask=real, cache=cache)
    cache = out.cache.replace(index=cache.index.at[:3].set(jnp.asarray(lengths, jnp.int32)))
    got = []
    for i in range(new.shape[1]):
        token = jnp.asarray(new[:, i : i + 1])  # the 3 leading rows of a 4-row cache
        out = forward(token, attention_mask=jnp.ones_like(token), cache=cache)
        cache = out.cache
        got.append(np.asarray(out.logits[:, 0]))
    # Each row's prompt and new tokens, right-padded into one batch, without a cache.
    seqs = np.zeros((3, 12), np.int32)
    for r in range(3):
        seqs[r, : lengths[r] + 5] = np.concatenate([prompts[r, : lengths[r]], new[r]])
    full = np.asarray(jitted(model)(jnp.asarray(seqs), attention_mask=jnp.asarray(seqs > 0)))
    for r in range(3):
        np.testing.assert_allclose(np.stack(got, 1)[r], full[r, lengths[r] : lengths[r] + 5], atol=1e-5)


@pytest.mark.slow
def test_model_on_the_splash_path_equals_the_einsum_path(monkeypatch):
    """A fake TPU, the kernel in interpret mode: two distinct windows (a switch in the scanned layers),
    soft-capping, left padding and packed documents."""
    monkeypatch.setattr(kernels, "platform_facts", lambda: ("tpu", 0.0))
    monkeypatch.setattr(kernels, "SPLASH_INTERPRET", True)
    base = dict(vocab_size=97, num_layers=2, sliding_windows=(8, None), head_dim=128, scan_layers=True)
    reference, model = map(jitted, pair(get_preset("gemma2-tiny", **base)))
    tokens, mask = _tokens(4, batch=2, length=128)
    valid = np.asarray(mask, bool)
    want, got = reference(tokens, attention_mask=mask), model(tokens, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4)
    segments = jnp.asarray(np.repeat([1, 2, 3, 0], 32)[None].repeat(2, 0), jnp.int32)
    valid = np.asarray(segments > 0)
    want, got = reference(tokens, segment_ids=segments), model(tokens, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4)


@pytest.mark.slow
def test_vocab_sharded_embedding_and_splash_on_8_devices():
    run_on_cpu_devices([str(ROOT / "tests" / "attention_8dev.py")], 8, "8-device attention checks passed")
