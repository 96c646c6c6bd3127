"""Rollout: generation from a model with a KV cache, compiled as one program per prompt bucket."""

from .sampler import FINISH_REASONS, Rollout, Sampler, left_pad, prompt_bucket
from .sampling import SamplingParams, filtered_logits, sample
from .text import ChatSampler, Completion, end_of_turn_ids

__all__ = [
    "ChatSampler",
    "Completion",
    "FINISH_REASONS",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "end_of_turn_ids",
    "filtered_logits",
    "left_pad",
    "prompt_bucket",
    "sample",
]
