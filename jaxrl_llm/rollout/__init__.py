"""Rollout: generation from a model with a KV cache, compiled as one program."""

from .greedy import greedy_generate, left_pad

__all__ = ["greedy_generate", "left_pad"]
