"""Rollout: generation from a model with a KV cache, compiled as one program per prompt bucket."""

from .sampler import FINISH_REASONS, Rollout, Sampler, left_pad, prompt_bucket
from .sampling import SamplingParams, filtered_logits, sample

__all__ = [
    "FINISH_REASONS",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "filtered_logits",
    "left_pad",
    "prompt_bucket",
    "sample",
]
