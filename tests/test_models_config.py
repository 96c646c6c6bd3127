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


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("gemma2", dict(head_dim=16)),  # published Gemma 2 config.json files carry no layer_types
        ("gemma3_text", dict(head_dim=16)),
        ("mistral", dict(attention_bias=True)),  # Mistral has no biases whatever the field says
        ("qwen2", dict()),
    ],
)
def test_missing_fields_mean_what_they_mean_to_transformers(model_type, extra):
    transformers = pytest.importorskip("transformers")
    minimal = {k: v for k, v in BASE.items() if k != "head_dim"} | extra | {"model_type": model_type}
    hf = transformers.AutoConfig.for_model(**minimal)
    ours = from_hf_config(minimal)
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    if model_type == "qwen2" and not hf.use_sliding_window:
        types = ["full_attention"] * hf.num_hidden_layers
    if model_type == "mistral":  # MistralModel applies sliding_window, when set, to every layer
        types = ["sliding_attention" if window else "full_attention"] * hf.num_hidden_layers
    want = tuple(window if t == "sliding_attention" else None for t in types)
    assert ours.layer_windows() == want
    assert ours.attn_logit_softcap == getattr(hf, "attn_logit_softcapping", None)
    assert ours.final_logit_softcap == getattr(hf, "final_logit_softcapping", None)
    if model_type.startswith("gemma"):
        assert ours.query_pre_attn_scalar == hf.query_pre_attn_scalar
    assert not ours.attention_out_bias if model_type == "mistral" else True


@pytest.mark.parametrize(
    "text, message",
    [
        ("[]", "expected a JSON object, got list"),
        ('{"model_type": "llama", "vocab_size": null}', "missing required"),
        ("\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_config_json_is_a_clear_error(tmp_path, text, message):
    from jaxrl_llm.models import CheckpointError, load_hf

    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises((CheckpointError, ModelConfigError), match=message):
        load_hf(tmp_path)


def test_wrong_typed_config_field_is_a_clear_error():
    bad = {**BASE, "model_type": "llama", "vocab_size": None}
    with pytest.raises(ModelConfigError, match="wrong type or value"):
        from_hf_config(bad)
