"""Architecture description shared by every model family.

One frozen dataclass describes Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3: the families differ
only in switches (qkv bias, q/k norm, norm offset, post-norms, soft-capping, per-layer sliding windows and
RoPE bases), so the forward pass is one code path with no per-family branches. HF ``config.json`` files
convert both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrl_llm.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
GEMMA = ("gemma2", "gemma3")
# The integer sizes of an architecture; config.model.<name> overrides a preset's value.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_seq_len",
)

# HF `model_type` -> our family, and the family -> the HF architecture class written on export.
_HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",  # the text-only Gemma 3 (1B, or the language model of a larger one)
}
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_DTYPES = ("float32", "bfloat16")
# model.attention: see attention_kernels (config.schema mirrors it; a test keeps them equal).
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")
# transformers' class defaults for the fields we read that a config.json may leave out (published Gemma 2
# files, for one, carry no layer_types): a missing key must mean what it means to HF.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096},
    "gemma2": {
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0,
    },
}


class ModelConfigError(UserError):
    """An architecture description that cannot be built (unsupported family, bad field)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (``rope_type: llama3``) or plain linear scaling."""

    rope_type: str = "llama3"  # "llama3" | "linear"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a decoder; field names follow HF where one exists."""

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Gemma 3: sliding-window layers use their own RoPE base, unscaled; None = every layer uses rope_theta.
    local_rope_theta: float | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the q, k and v projections (always on for Qwen2)
    attention_out_bias: bool = False  # bias on the output projection (HF `attention_bias` outside Qwen2)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (offset + w).
    post_norms: bool = False  # Gemma 2: norms after attention and MLP outputs too.
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size).
    activation: str = "silu"  # "silu" | "gelu_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Per-layer sliding windows: None = global attention; a tuple with one entry per layer (None for a
    # global layer), e.g. Gemma 2 alternates (4096, None, 4096, None, ...).
    sliding_windows: tuple[int | None, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Numerics and execution.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; logits and log-softmax are always float32
    remat: str = "none"  # "none" | "full" | "dots"
    scan_layers: bool = False
    # Attention kernel: "auto" (cuDNN on GPU, splash on TPU, where the call allows), "xla" (the einsum
    # path), "cudnn" or "splash" (the einsum path where they cannot run, logged); see attention_kernels.
    attention: str = "auto"

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        for name in SIZE_FIELDS:
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.activation not in ("silu", "gelu_tanh"):
            problems.append(f"activation={self.activation!r}; supported: silu, gelu_tanh")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r}; supported: {', '.join(_DTYPES)}")
        if self.remat not in ("none", "full", "dots"):
            problems.append(f"remat={self.remat!r}; supported: none, full, dots")
        if self.attention not in ATTENTION_KERNELS:
            problems.append(f"attention={self.attention!r}; supported: {', '.join(ATTENTION_KERNELS)}")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            problems.append(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        if problems:
            raise ModelConfigError("invalid model config: " + "; ".join(problems))

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_windows(self) -> tuple[int | None, ...]:
        return self.sliding_windows or (None,) * self.num_layers

    def layer_rope(self) -> tuple[tuple[float, RopeScaling | None], ...]:
        """(base, scaling) of each layer's RoPE: global layers scale, Gemma 3's local layers do not."""
        local = (self.local_rope_theta, None) if self.local_rope_theta is not None else None
        glob = (self.rope_theta, self.rope_scaling)
        return tuple(glob if w is None or local is None else local for w in self.layer_windows())

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def num_params(self, *, head: str = "lm") -> int:
        """Parameter count from the shapes alone (the tests cross-check it against built models)."""
        e, h, kv, d, m = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
        )
        attn = e * d * (2 * h + 2 * kv) + (d * (h + 2 * kv) if self.attention_bias else 0)
        attn += e if self.attention_out_bias else 0
        attn += 2 * d if self.qk_norm else 0
        norms = e * (4 if self.post_norms else 2)
        per_layer = attn + 3 * e * m + norms
        total = self.vocab_size * e + self.num_layers * per_layer + e
        if head == "lm" and not self.tie_word_embeddings:
            total += e * self.vocab_size
        elif head in ("score", "value"):
            total += e
        return total


# ---------------------------------------------------------------------------------------------- HF I/O


def _parse_rope(params: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    theta = float(params.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        return theta, RopeScaling(
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    raise ModelConfigError(
        f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None, float | None]:
    """(global base, global scaling, local base or None) from either HF config generation.

    transformers 5 writes ``rope_parameters`` (theta inside; per layer type for Gemma 3); older checkpoints
    write ``rope_theta`` + ``rope_scaling`` (+ ``rope_local_base_freq`` for Gemma 3).
    """
    params = hf.get("rope_parameters") or {}
    default_theta = float(hf.get("rope_theta", 10000.0))
    if "full_attention" in params or "sliding_attention" in params:
        theta, scaling = _parse_rope(params.get("full_attention") or {}, default_theta)
        local = params.get("sliding_attention")
        if local is None:
            return theta, scaling, None
        local_theta, local_scaling = _parse_rope(local, default_theta)
        if local_scaling is not None:
            raise ModelConfigError("config.json: RoPE scaling on sliding-window layers is not supported")
        return theta, scaling, local_theta
    theta, scaling = _parse_rope({**(hf.get("rope_scaling") or {}), **params}, default_theta)
    local = hf.get("rope_local_base_freq")
    return theta, scaling, None if local is None else float(local)


def _windows_from_hf(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...] | None:
    window = hf.get("sliding_window")
    qwen = hf.get("model_type") in ("qwen2", "qwen3")
    if not window or (qwen and not hf.get("use_sliding_window", False)):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None and qwen:  # older Qwen configs: the layers from max_window_layers on slide
        first = int(hf.get("max_window_layers", num_layers))
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if layer_types is None and hf.get("model_type") == "gemma2":  # Gemma 2: even layers slide
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if layer_types is None and hf.get("model_type") == "gemma3_text":  # older Gemma 3: every 6th is global
        every = int(hf.get("sliding_window_pattern", 6))
        layer_types = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)
        ]
    if layer_types is None:
        return (int(window),) * num_layers
    if len(layer_types) != num_layers:
        raise ModelConfigError(
            f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers"
        )
    windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return windows if any(w is not None for w in windows) else None


def from_hf_config(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Converts an HF ``config.json`` dict into a :class:`ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        raise ModelConfigError(
            "config.json: a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); only the text "
            "model (model_type 'gemma3_text', e.g. gemma-3-1b) is supported"
        )
    if model_type not in _HF_MODEL_TYPES:
        raise ModelConfigError(
            f"config.json: model_type={model_type!r} (architectures={hf.get('architectures')}) is not supported; "
            f"supported model types: {', '.join(_HF_MODEL_TYPES)}"
        )
    family = _HF_MODEL_TYPES[model_type]
    hf = {**_HF_DEFAULTS.get(model_type, {}), **hf}
    try:
        e, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        num_layers = int(hf["num_hidden_layers"])
        theta, scaling, local_theta = _rope_from_hf(hf)
        kw: dict[str, Any] = dict(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=e,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=h,
            num_kv_heads=int(hf.get("num_key_value_heads") or h),
            head_dim=int(hf.get("head_dim") or e // h),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=scaling,
            local_rope_theta=local_theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", family in GEMMA)),
            # Qwen2 always has q/k/v biases and never an o_proj bias; Mistral never has biases; elsewhere
            # HF's `attention_bias` puts a bias on all four projections.
            attention_bias=family == "qwen2"
            or (family != "mistral" and bool(hf.get("attention_bias", False))),
            attention_out_bias=family not in ("qwen2", "mistral") and bool(hf.get("attention_bias", False)),
            sliding_windows=_windows_from_hf(hf, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            # Lists become tuples: the config is a static (hashable) argument of compiled functions.
            eos_token_id=tuple(eos) if isinstance(eos := hf.get("eos_token_id"), list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as err:
        raise ModelConfigError(
            f"config.json: missing required field {err.args[0]!r} for model_type={model_type!r}"
        ) from None
    except (TypeError, ValueError) as err:  # e.g. "vocab_size": null, or a string where a number belongs
        raise ModelConfigError(f"config.json: a field has the wrong type or value ({err})") from None
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    kw["activation"] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
    if kw["activation"] is None:
        raise ModelConfigError(f"config.json: activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
    if hf.get("mlp_bias"):
        raise ModelConfigError("config.json: mlp_bias=true is not supported")
    if family in ("qwen3", "gemma3"):
        kw["qk_norm"] = True
    if family in GEMMA:
        kw.update(
            norm_offset=1.0,
            post_norms=True,
            embed_scale=True,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", kw["head_dim"])),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
    kw.update(overrides)
    return ModelConfig(**kw)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict that HF transformers loads as the same architecture."""
    hf: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[cfg.family]],
        "model_type": "gemma3_text" if cfg.family == "gemma3" else cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,  # Qwen2's config ignores it (its q/k/v biases are fixed)
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.param_dtype,
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**dataclasses.asdict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling.rope_type == "linear":
            rope = {"rope_type": "linear", "factor": cfg.rope_scaling.factor, "rope_theta": cfg.rope_theta}
    hf["rope_parameters"] = rope
    if cfg.family == "gemma3":
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
        hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
        hf["rope_local_base_freq"] = local["rope_theta"]
    elif cfg.local_rope_theta is not None:
        raise ModelConfigError(f"family {cfg.family!r} cannot express local_rope_theta in an HF config")
    hf["rope_theta"] = cfg.rope_theta  # read by transformers 4.x as well
    hf["rope_scaling"] = None if cfg.rope_scaling is None else rope
    if cfg.activation == "silu":
        hf["hidden_act"] = "silu"
    else:
        hf["hidden_act"] = hf["hidden_activation"] = "gelu_pytorch_tanh"
    hf.update(_windows_to_hf(cfg))
    if cfg.family in GEMMA:
        hf.update(
            # transformers' strict config dataclass wants an int here (every published Gemma 2 uses one).
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
        )
    elif (
        cfg.norm_offset,
        cfg.post_norms,
        cfg.embed_scale,
        cfg.attn_logit_softcap,
        cfg.final_logit_softcap,
    ) != (
        0.0,
        False,
        False,
        None,
        None,
    ):
        raise ModelConfigError(f"family {cfg.family!r} cannot express Gemma-style switches in an HF config")
    allowed, rule = _BIAS_LAYOUTS.get(cfg.family, _BIAS_LAYOUTS[None])
    if (cfg.attention_bias, cfg.attention_out_bias) not in allowed:
        raise ModelConfigError(
            f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias} cannot be "
            f"expressed in an HF {cfg.family} config ({rule})"
        )
    if cfg.qk_norm != (cfg.family in ("qwen3", "gemma3")):
        raise ModelConfigError(f"qk_norm={cfg.qk_norm} does not match family {cfg.family!r} in an HF config")
    return hf


# (q/k/v bias, o bias) pairs each family's HF config can express.
_BIAS_LAYOUTS = {
    "qwen2": ([(True, False)], "Qwen2 has q/k/v biases and no output bias"),
    "mistral": ([(False, False)], "Mistral has no attention biases"),
    None: ([(False, False), (True, True)], "biases are on all four projections or none"),
}


def _windows_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """HF's window fields: ``layer_types`` where the family has them, one window for all layers for Mistral."""
    windows = cfg.sliding_windows
    per_layer = cfg.family in ("gemma2", "gemma3", "qwen2", "qwen3")
    if windows is None:
        if cfg.family in GEMMA:  # Gemma always has the field; all-global layers make it inert
            return {"sliding_window": cfg.max_seq_len, "layer_types": ["full_attention"] * cfg.num_layers}
        return {"sliding_window": None} | ({"use_sliding_window": False} if per_layer else {})
    sizes = {w for w in windows if w is not None}
    if len(sizes) != 1:
        raise ModelConfigError(f"HF configs hold one sliding window size; this model has {sorted(sizes)}")
    out: dict[str, Any] = {"sliding_window": sizes.pop()}
    if per_layer:
        out["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in windows]
        if cfg.family not in GEMMA:
            out["use_sliding_window"] = True
    elif cfg.family != "mistral" or None in windows:
        raise ModelConfigError(
            f"family {cfg.family!r} cannot express per-layer sliding windows in an HF config"
        )
    return out


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
