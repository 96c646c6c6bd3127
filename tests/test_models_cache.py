"""Cached decoding (prefill, then one token at a time) equals the full uncached forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models import create_model, get_preset
from tests.hf_reference import FAMILIES

TOL = 1e-5


def _padded(seed: int, batch: int = 4, length: int = 14):
    """Prompts (first 6 tokens) left- and right-padded, and a row that skips one decode step."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, 97, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :3] = 0  # left-padded prompt
    mask[2, :5] = 0  # a 1-token prompt
    mask[3, 4:6] = 0  # right-padded prompt
    mask[0, 9] = 0  # a padded decode step (e.g. a finished row in a batch still decoding)
    return np.where(mask == 1, tokens, 0), mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_then_decode_equals_full_forward(family, scan_layers):
    # Windows of 4 (the tiny presets use 8), so decoding crosses window edges.
    windows = {"mistral": (4, 4, 4), "gemma2": (4, None, 4), "gemma3": (4, 4, None)}.get(family)
    cfg = get_preset(
        f"{family}-tiny", vocab_size=97, num_layers=3, sliding_windows=windows, scan_layers=scan_layers
    )
    model = create_model(cfg, seed=1)
    tokens, mask = _padded(seed=2)
    full = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))

    prompt = 6
    step = jax.jit(lambda toks, m, cache: model.forward(toks, attention_mask=m, cache=cache))
    out = step(jnp.asarray(tokens[:, :prompt]), jnp.asarray(mask[:, :prompt]), model.init_cache(4, 20))
    logits = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(prompt, tokens.shape[1]):
        out = step(jnp.asarray(tokens[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), cache)
        cache = out.cache
        logits.append(np.asarray(out.logits))
    cached = np.concatenate(logits, axis=1)
    valid = mask.astype(bool)
    assert np.abs(cached - full)[valid].max() <= TOL
    assert int(cache.index) == tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.lengths), mask.sum(1))


def test_cache_shapes_and_dtype():
    cfg = get_preset("qwen3-tiny", dtype="bfloat16")
    cache = create_model(cfg).init_cache(2, 32)
    # One array per layer, heads-major: keys [B, K, D, S] (slots last), values [B, K, S, D].
    assert len(cache.k) == len(cache.v) == cfg.num_layers
    assert all(k.shape == (2, cfg.num_kv_heads, cfg.head_dim, 32) for k in cache.k)
    assert all(v.shape == (2, cfg.num_kv_heads, 32, cfg.head_dim) for v in cache.v)
    assert cache.k[0].dtype == jnp.bfloat16 and cache.max_len == 32


def test_input_longer_than_the_cache_is_refused():
    model = create_model(get_preset("llama-tiny"))
    with pytest.raises(ValueError, match="10 tokens do not fit a KV cache of 8 slots"):
        model.forward(jnp.ones((1, 10), jnp.int32), cache=model.init_cache(1, 8))
