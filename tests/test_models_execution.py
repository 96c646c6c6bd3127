"""Execution options change how the model runs, never what it computes: scan, remat, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import create_model, get_preset

TOKENS = jnp.asarray(np.random.RandomState(0).randint(1, 256, (2, 10)), jnp.int32)


def _loss_and_grad(cfg):
    graphdef, state = nnx.split(create_model(cfg, seed=0))

    def loss(state):
        logits = nnx.merge(graphdef, state)(TOKENS)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    return loss, state


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [dict(remat="full"), dict(remat="dots"), dict(scan_layers=True), dict(scan_layers=True, remat="full")],
)
def test_gradients_equal_the_plain_model(options):
    base = get_preset("gemma2-tiny")
    plain_loss, state = _loss_and_grad(base)
    loss, _ = _loss_and_grad(base.replace(**options))
    want, got = jax.grad(plain_loss)(state), jax.grad(loss)(state)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("remat, present", [("none", False), ("full", True), ("dots", True)])
def test_remat_is_in_the_gradient_program(remat, present):
    loss, state = _loss_and_grad(get_preset("llama-tiny", remat=remat))
    assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(state))) == present


def test_padding_ids_never_matter_and_bad_real_ids_are_loud():
    model = create_model(get_preset("llama-tiny"), seed=0)
    mask = jnp.asarray([[0, 0, 1, 1, 1]])
    real = jnp.asarray([[0, 0, 5, 6, 7]])
    want = np.asarray(model(real, attention_mask=mask))[0, 2:]
    for pad in (999, -100, 255):  # out of range, negative (would wrap), in range: all the same
        tokens = real.at[0, :2].set(pad)
        np.testing.assert_array_equal(np.asarray(model(tokens, attention_mask=mask))[0, 2:], want)
    # A real token outside the vocabulary poisons its row with NaN instead of reading another row.
    assert np.isnan(np.asarray(model(jnp.asarray([[5, 300, 7]])))).all()
    assert np.isnan(np.asarray(model(jnp.asarray([[5, -3, 7]])))).all()
    assert not np.isnan(np.asarray(model(jnp.asarray([[5, 255, 7]])))).any()


def test_decoding_past_the_cache_end_is_refused_outside_jit():
    model = create_model(get_preset("llama-tiny"), seed=0)
    out = model.forward(jnp.ones((1, 6), jnp.int32), cache=model.init_cache(1, 8))
    with pytest.raises(ValueError, match="holds 6 of 8 slots: 4 more tokens do not fit"):
        model.forward(jnp.ones((1, 4), jnp.int32), cache=out.cache)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_documents_do_not_see_each_other(family):
    # Gemma 2's window (8) is wider than the documents, so only the segment mask keeps them apart.
    model = create_model(get_preset(f"{family}-tiny"), seed=0)
    doc_a, doc_b = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    row = jnp.asarray([doc_a + doc_b + [0, 0, 0]])
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3])
    packed = np.asarray(model(row, segment_ids=segments))[0]
    np.testing.assert_allclose(packed[:5], np.asarray(model(jnp.asarray([doc_a])))[0], atol=1e-5)
    np.testing.assert_allclose(packed[5:9], np.asarray(model(jnp.asarray([doc_b])))[0], atol=1e-5)


def test_segment_positions_restart_per_document():
    from jaxrl_llm.models.transformer import segment_positions

    got = segment_positions(jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(got), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])
