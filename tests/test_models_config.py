"""HF config.json dialects (transformers 4 and 5 field layouts) read into the same ModelConfig."""

from __future__ import annotations

import pytest

from jaxrl_llm.models import ModelConfigError, RopeScaling, from_hf_config, get_preset, to_hf_config

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)


def test_llama3_rope_in_both_layouts():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    old = from_hf_config({**BASE, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": scaling})
    new = from_hf_config({**BASE, "model_type": "llama", "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert (
        old == new and old.rope_theta == 5e5 and old.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    )


def test_older_qwen2_window_layout_from_max_window_layers():
    cfg = from_hf_config(
        {
            **BASE,
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 4,
        }
    )
    assert cfg.sliding_windows == (None,) * 4 + (8, 8)
    assert from_hf_config({**BASE, "model_type": "qwen2", "sliding_window": 8}).sliding_windows is None


def test_older_gemma3_layout():
    cfg = from_hf_config(
        {
            **BASE,
            "model_type": "gemma3_text",
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window": 4,
            "query_pre_attn_scalar": 16,
        }
    )
    assert cfg.sliding_windows == (4, 4, 4, 4, 4, None)
    assert cfg.layer_rope()[0] == (1e4, None) and cfg.layer_rope()[5] == (1e6, RopeScaling("linear", 8.0))
    assert cfg.qk_norm and cfg.norm_offset == 1.0 and cfg.tie_word_embeddings


def test_export_refuses_what_hf_cannot_express():
    with pytest.raises(ModelConfigError, match="cannot express per-layer sliding windows"):
        to_hf_config(get_preset("llama-tiny", sliding_windows=(4, None)))
    with pytest.raises(ModelConfigError, match="Qwen2 has q/k/v biases and no output bias"):
        to_hf_config(get_preset("qwen2-tiny", attention_out_bias=True))
    with pytest.raises(ModelConfigError, match="rope scaling type 'yarn' is not supported"):
        from_hf_config({**BASE, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
