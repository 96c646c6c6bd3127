"""Flax NNX decoder-only transformers (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3) with HF import/export."""

from .build import build_model, model_config
from .cache import KVCache
from .config import FAMILIES, ModelConfig, ModelConfigError, RopeScaling, from_hf_config, to_hf_config
from .create import abstract_model, count_params, create_model
from .hf_io import CheckpointError, TokenIds, load_hf, read_hf_config, save_hf
from .presets import PRESETS, PUBLISHED_PARAMS, get_preset, preset_names
from .transformer import HEADS, CausalLM, Decoder, ModelOutput, ScoreModel, sequence_scores
