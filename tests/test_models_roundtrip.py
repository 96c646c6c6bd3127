"""save_hf writes what HF transformers loads, with the same logits; load_hf(save_hf(m)) is exact."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, ScoreModel, create_model, get_preset, load_hf, save_hf, sequence_scores
from tests.hf_reference import FAMILIES, hf_logits, padded_batch, transformers

TOL = 1e-4


def _tiny(family: str):
    return get_preset(f"{family}-tiny", vocab_size=97)


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _perturbed(cfg, seed: int, head: str = "lm"):
    """A model whose every parameter is random: fresh init leaves norms at 1 (or 0) and biases at 0, where
    an export mistake (a wrong norm name, a lost bias) would not show."""
    model = create_model(cfg, seed=seed, head=head)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_loads_in_transformers_with_the_same_logits(family, tmp_path):
    model = _perturbed(_tiny(family), seed=3)
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf_model).__name__.lower().startswith(family)
    tokens, mask = padded_batch(seed=5)
    want = hf_logits(hf_model, tokens, mask)
    got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - want)[mask.astype(bool)].max() <= TOL
    for a, b in zip(_params(model), _params(load_hf(tmp_path)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sharded_safetensors_round_trip(tmp_path):
    model = create_model(_tiny("qwen2"), seed=4)
    save_hf(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    for a, b in zip(_params(model), _params(load_hf(tmp_path)), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    got = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(got - hf_logits(hf_model, tokens, np.ones_like(tokens))).max() <= TOL


def test_bfloat16_export_and_load(tmp_path):
    model = create_model(_tiny("llama"), seed=5)
    save_hf(model, tmp_path, dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_hf(tmp_path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(loaded, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert next(hf_model.parameters()).dtype.__str__() == "torch.bfloat16"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_score_model_round_trip_through_transformers(family, tmp_path):
    model = _perturbed(_tiny(family).replace(pad_token_id=0), seed=6, head="score")
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert hf_model.config.num_labels == 1
    tokens, mask = padded_batch(seed=8)  # HF finds each row's last real token through pad_token_id 0
    want = hf_logits(hf_model, tokens, mask)[:, 0]
    got = np.asarray(
        sequence_scores(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)), jnp.asarray(mask))
    )
    np.testing.assert_allclose(got, want, atol=TOL)
    loaded = load_hf(tmp_path)
    assert isinstance(loaded, ScoreModel)
    for a, b in zip(_params(model), _params(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_value_head_round_trip_and_fresh_heads(tmp_path):
    model = create_model(_tiny("llama"), seed=7, head="lm+value")
    save_hf(model, tmp_path)
    loaded = load_hf(tmp_path, head="lm+value")
    np.testing.assert_array_equal(
        np.asarray(model.value_head.weight[...]), np.asarray(loaded.value_head.weight[...])
    )
    tokens = jnp.arange(1, 7, dtype=jnp.int32)[None]
    out = loaded.forward(tokens)
    assert out.scores.shape == (1, 6) and out.logits.shape == (1, 6, 97)
    # A reward head on a causal-LM checkpoint starts from random init, like HF's classification heads.
    plain = tmp_path / "plain"
    save_hf(create_model(_tiny("llama"), seed=8), plain)
    rm = load_hf(plain, head="score")
    assert isinstance(rm, ScoreModel) and float(jnp.abs(rm.score.weight[...]).sum()) > 0


def test_real_size_config_round_trips_through_transformers():
    from jaxrl_llm.models import from_hf_config, to_hf_config

    for name in ("llama3.1-8b", "qwen3-8b", "gemma2-9b", "gemma3-1b", "qwen2.5-0.5b", "mistral-7b-v0.3"):
        cfg = get_preset(name)
        hf = to_hf_config(cfg)
        config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
        assert from_hf_config(config.to_dict()) == cfg, name


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_compute_dtype_is_separate_from_parameter_dtype(family):
    cfg = _tiny(family)
    fp32 = create_model(cfg, seed=9)
    mixed = create_model(cfg.replace(dtype="bfloat16"), seed=9)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(mixed, nnx.Param))} == {jnp.dtype(jnp.float32)}
    tokens, mask = padded_batch(seed=6)
    a = np.asarray(fp32(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    b = mixed(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert b.dtype == jnp.float32  # logits (and so log-softmax) stay float32 under bf16 compute
    valid = mask.astype(bool)
    assert 0 < np.abs(a - np.asarray(b))[valid].max() < 0.05
    bf16 = create_model(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"), seed=9)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert isinstance(bf16, CausalLM)
