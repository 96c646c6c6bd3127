"""Rollout: generation from a model with a KV cache: the pure ``generate`` (one compiled program, callable
inside another's), the host ``Sampler`` over it, and ``ChatSampler`` (messages in, text out)."""

from .generate import FINISH_REASONS, DecodeState, Rollout, generate, stop_table
from .sampler import Sampler, compiled_generate, left_pad, prompt_bucket
from .sampling import SamplingParams, filtered_logits, sample
from .text import ChatSampler, Completion, completion_text, conversation, end_of_turn_ids

__all__ = [
    "ChatSampler",
    "Completion",
    "DecodeState",
    "FINISH_REASONS",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "compiled_generate",
    "completion_text",
    "conversation",
    "end_of_turn_ids",
    "filtered_logits",
    "generate",
    "left_pad",
    "prompt_bucket",
    "sample",
    "stop_table",
]
