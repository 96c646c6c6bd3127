"""Rollout: generation from a model with a KV cache, compiled as one program per prompt bucket."""

from .greedy import greedy_generate, left_pad
from .sampler import FINISH_REASONS, Rollout, Sampler, prompt_bucket
from .sampling import SamplingParams, filtered_logits, sample

__all__ = [
    "FINISH_REASONS",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "filtered_logits",
    "greedy_generate",
    "left_pad",
    "prompt_bucket",
    "sample",
]
