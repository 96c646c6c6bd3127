"""Logits parity with HF transformers (PyTorch, CPU, fp32) for every family, on padded batches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models import CausalLM, ScoreModel, load_hf, sequence_scores
from tests.hf_reference import FAMILIES, VOCAB, hf_logits, make_hf_model, padded_batch, torch

TOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_on_padded_batch(family, tmp_path):
    hf_model, path = make_hf_model(family, tmp_path)
    model = load_hf(path)
    assert isinstance(model, CausalLM) and model.cfg.family == family
    tokens, mask = padded_batch()
    want = hf_logits(hf_model, tokens, mask)
    got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert got.shape == (4, 12, VOCAB) and got.dtype == np.float32
    valid = mask.astype(bool)
    assert np.abs(got - want)[valid].max() <= TOL


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", dict(attention_bias=True)),  # outside Qwen2 this biases o_proj too
        ("qwen3", dict(attention_bias=True)),
        ("mistral", dict(sliding_window=None)),
        # Qwen2 with sliding windows on the layers from max_window_layers on.
        ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ],
)
def test_config_variants_match_hf(family, overrides, tmp_path):
    hf_model, path = make_hf_model(family, tmp_path, **overrides)
    model = load_hf(path)
    if family == "qwen2":
        assert model.cfg.sliding_windows == (None, 4, 4)
    tokens, mask = padded_batch(seed=7)
    want = hf_logits(hf_model, tokens, mask)
    got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - want)[mask.astype(bool)].max() <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize(
    "execution", [dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")]
)
def test_scan_and_remat_give_the_same_logits(family, execution, tmp_path):
    hf_model, path = make_hf_model(family, tmp_path)
    tokens, mask = padded_batch(seed=1)
    want = hf_logits(hf_model, tokens, mask)
    got = np.asarray(load_hf(path, **execution)(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - want)[mask.astype(bool)].max() <= TOL


def test_explicit_positions_equal_derived_ones(tmp_path):
    _, path = make_hf_model("llama", tmp_path)
    model = load_hf(path)
    tokens, mask = padded_batch(seed=2)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    a = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    b = model(jnp.asarray(tokens), positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_rows_logits_do_not_depend_on_other_rows_padding(tmp_path):
    _, path = make_hf_model("gemma2", tmp_path)
    model = load_hf(path)
    tokens, mask = padded_batch(seed=3)
    batched = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    row = 1  # left-padded: alone and unpadded, it must give the same logits
    alone = np.asarray(model(jnp.asarray(tokens[row : row + 1, mask[row] == 1])))
    np.testing.assert_allclose(batched[row, mask[row] == 1], alone[0], atol=TOL)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_score_model_matches_hf_sequence_classification(family, tmp_path):
    hf_model, path = make_hf_model(family, tmp_path, head="score")
    model = load_hf(path)
    assert isinstance(model, ScoreModel)
    tokens, mask = padded_batch(seed=4)
    with torch.no_grad():  # HF finds each row's last real token through pad_token_id (0 here)
        want = (
            hf_model(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)),
            )
            .logits[:, 0]
            .numpy()
        )
    scores = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    got = np.asarray(sequence_scores(scores, jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=TOL)
