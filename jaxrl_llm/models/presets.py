"""Named architectures: tiny ones for tests and the quickstart, real ones for shape checks and benchmarks.

Real presets copy the published HF ``config.json`` values; ``PUBLISHED_PARAMS`` holds the parameter counts
the model cards and safetensors indexes report, which the tests compare against built (abstract) models.
"""

from __future__ import annotations

from .config import ModelConfig, ModelConfigError, RopeScaling

_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_GEMMA2 = dict(
    family="gemma2",
    norm_offset=1.0,
    post_norms=True,
    embed_scale=True,
    activation="gelu_tanh",
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    tie_word_embeddings=True,
)


_GEMMA3 = dict(
    _GEMMA2,
    family="gemma3",
    qk_norm=True,
    attn_logit_softcap=None,
    final_logit_softcap=None,
    rope_theta=1e6,
    local_rope_theta=10000.0,
)


def _alternating(window: int, num_layers: int) -> tuple[int | None, ...]:
    """Gemma 2: even layers use a sliding window, odd layers attend globally."""
    return tuple(window if i % 2 == 0 else None for i in range(num_layers))


def _five_to_one(window: int, num_layers: int) -> tuple[int | None, ...]:
    """Gemma 3: five sliding-window layers, then one global layer."""
    return tuple(None if (i + 1) % 6 == 0 else window for i in range(num_layers))


def _tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_seq_len=512,
    )
    return ModelConfig(**{**base, **kw})


PRESETS: dict[str, ModelConfig] = {
    # Tiny models: seconds to build and run on a CPU.
    "llama-tiny": _tiny(family="llama"),
    "mistral-tiny": _tiny(family="mistral", sliding_windows=(8, 8)),
    "qwen2-tiny": _tiny(family="qwen2", attention_bias=True, tie_word_embeddings=True),
    "qwen3-tiny": _tiny(family="qwen3", qk_norm=True),
    "gemma2-tiny": _tiny(**{**_GEMMA2, "sliding_windows": _alternating(8, 2), "query_pre_attn_scalar": 16.0}),
    "gemma3-tiny": _tiny(
        **{
            **_GEMMA3,
            "sliding_windows": (8, None),
            "query_pre_attn_scalar": 16.0,
            "rope_scaling": RopeScaling("linear", 8.0),
        }
    ),
    # ~30M parameters (33.5M): the benchmark model of the training, rollout and preference issues.
    "llama-30m": ModelConfig(
        family="llama",
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        max_seq_len=2048,
        rms_norm_eps=1e-5,
    ),
    # Published architectures (no weights are downloaded; load real weights with model.path).
    "llama2-7b": ModelConfig(
        family="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        max_seq_len=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama3.1-8b": ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3.1-70b": ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3.2-1b": ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "mistral-7b-v0.3": ModelConfig(
        family="mistral",
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        max_seq_len=32768,
        rope_theta=1e6,
        attention_bias=True,
        tie_word_embeddings=True,
        eos_token_id=151643,
    ),
    "qwen2.5-7b": ModelConfig(
        family="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        max_seq_len=131072,
        rope_theta=1e6,
        attention_bias=True,
        eos_token_id=151643,
    ),
    "qwen3-0.6b": ModelConfig(
        family="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=40960,
        rope_theta=1e6,
        qk_norm=True,
        tie_word_embeddings=True,
        eos_token_id=151645,
    ),
    "qwen3-8b": ModelConfig(
        family="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=40960,
        rope_theta=1e6,
        qk_norm=True,
        eos_token_id=151645,
    ),
    "gemma2-2b": ModelConfig(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        max_seq_len=8192,
        query_pre_attn_scalar=256.0,
        sliding_windows=_alternating(4096, 26),
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        **_GEMMA2,
    ),
    "gemma2-9b": ModelConfig(
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        max_seq_len=8192,
        query_pre_attn_scalar=256.0,
        sliding_windows=_alternating(4096, 42),
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        **_GEMMA2,
    ),
    "gemma3-1b": ModelConfig(
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        max_seq_len=32768,
        query_pre_attn_scalar=256.0,
        sliding_windows=_five_to_one(512, 26),
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        **_GEMMA3,
    ),
}

# Parameter counts as published (model cards / safetensors index `total_size` / 2 bytes for bf16).
PUBLISHED_PARAMS = {
    "llama2-7b": 6_738_415_616,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.2-1b": 1_235_814_400,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma3-1b": 999_885_952,
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """Returns the named architecture, with dataclass fields replaced by ``overrides``."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelConfigError(f"unknown model preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
