"""Real-size architectures built abstractly: published parameter counts, nothing allocated."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from jaxrl_llm.models import PUBLISHED_PARAMS, ModelConfigError, abstract_model, get_preset, to_hf_config


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_equals_the_published_one(name):
    model = abstract_model(get_preset(name))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # shapes only: no memory allocated
    assert sum(x.size for x in leaves) == PUBLISHED_PARAMS[name]
    assert get_preset(name).num_params() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", ["llama3.1-8b", "qwen3-8b", "gemma2-2b", "gemma3-1b"])
def test_published_counts_agree_with_transformers_on_the_meta_device(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = to_hf_config(get_preset(name))
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_score_and_value_heads_add_one_vector():
    cfg = get_preset("qwen3-0.6b")
    for head, extra in (("score", cfg.hidden_size), ("lm+value", cfg.hidden_size + 1)):
        leaves = jax.tree.leaves(nnx.state(abstract_model(cfg, head=head), nnx.Param))
        lm_head = 0 if head == "lm+value" or cfg.tie_word_embeddings else cfg.hidden_size * cfg.vocab_size
        assert sum(x.size for x in leaves) == cfg.num_params() - lm_head + extra


def test_invalid_architectures_are_named():
    with pytest.raises(ModelConfigError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        get_preset("llama-tiny", num_heads=6, num_kv_heads=4)
    with pytest.raises(ModelConfigError, match="family='gpt2' is not supported"):
        get_preset("llama-tiny", family="gpt2")
    with pytest.raises(
        ModelConfigError, match="unknown model preset 'llama-tiyn'. Did you mean 'llama-tiny'"
    ):
        get_preset("llama-tiyn")
