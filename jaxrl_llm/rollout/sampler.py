"""The host sampler: ``Sampler(model, eos_ids=..., pad_id=...).sample(prompt_ids, prompt_mask, n=..., key=...,
max_new_tokens=..., sampling=SamplingParams(...)) -> Rollout``.

A thin wrapper over the pure ``generate.generate`` (the whole generation as one compiled program: in-graph
KV cache, prefill, ``while_loop`` decode): it checks the arguments, left-pads the prompts further up to
their length bucket so that every call with prompts of the same bucket reuses one compiled program, places
them on the mesh (rows over the data axes) and calls the jitted ``generate``. One program is compiled per
(batch, prompt bucket, ``max_new_tokens``, ``cache_len``, ``n``, EOS ids, stop sequences); sampling parameters
are traced. ``cache_len`` (default: the bucket + ``max_new_tokens``, what the generation writes) sizes the KV
cache for a longer request than this one: the same tokens, on the cache a server or a long rollout would use.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..parallel import named_sharding, put
from .generate import FINISH_REASONS, Rollout, generate, stop_table
from .sampling import SamplingParams

__all__ = [
    "FINISH_REASONS",
    "Rollout",
    "Sampler",
    "compiled_generate",
    "left_pad",
    "padded_width",
    "prompt_bucket",
]

# One compiled program per static configuration (graph, budget, n, EOS ids, stops, pad id, cache length) and
# shapes.
compiled_generate = jax.jit(
    generate,
    static_argnums=(0,),
    static_argnames=("n", "max_new_tokens", "eos_ids", "stops", "pad_id", "cache_len"),
)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32[B, W], mask int32[B, W])`` with each prompt right-aligned (left padding)."""
    width = width or max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > width:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the width {width}")
        if len(p):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
    return ids, mask


def prompt_bucket(length: int, smallest: int = 16) -> int:
    """The padded prompt length a prompt of ``length`` tokens compiles for: the next power of two."""
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return bucket


def padded_width(length: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The width ``Sampler.sample`` left-pads prompts of ``length`` tokens to: their bucket, capped so that
    the last bucket + ``max_new_tokens`` ends at the context. The generation writes this + ``max_new_tokens``
    cache slots (the default ``cache_len``)."""
    return min(prompt_bucket(length), max_seq_len - max_new_tokens)


@dataclasses.dataclass
class Sampler:
    """Generates from ``model`` (a ``CausalLM``); see the module docstring.

    Args:
      model: the policy; its parameters are read at every call (``update`` after training steps).
      eos_ids: ids that end a row (the tokenizer's ``eos_ids`` plus the template's end-of-turn).
      pad_id: written after a row ends and used to pad prompts.
      mesh: shard the cache (and so the decode) over it: batch over the data axes, heads over ``tensor``.
    """

    model: nnx.Module
    eos_ids: Sequence[int] = ()
    pad_id: int = 0
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        self.graphdef, self.state = nnx.split(self.model)

    def update(self, model: nnx.Module) -> None:
        self.graphdef, self.state = nnx.split(model)

    def sample(
        self,
        prompt_ids: np.ndarray,
        prompt_mask: np.ndarray,
        *,
        key: jax.Array,
        max_new_tokens: int,
        n: int = 1,
        sampling: SamplingParams | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
        cache_len: int | None = None,
    ) -> Rollout:
        """``n`` completions per prompt; ``cache_len``: the KV cache's slot count (see the module docstring),
        from the padded prompts + ``max_new_tokens`` up to the model's ``max_seq_len``."""
        sampling = sampling or SamplingParams()
        sampling.validate()
        prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
        if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(
                f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape}: expected [B, P] each"
            )
        if max_new_tokens < 1 or n < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} and n={n} must be >= 1")
        batch, length = prompt_ids.shape
        limit = self.model.cfg.max_seq_len
        if length + max_new_tokens > limit:
            raise ValueError(
                f"prompts of {length} tokens + max_new_tokens {max_new_tokens} exceed the model's max_seq_len {limit}"
            )
        bucket = padded_width(length, max_new_tokens, limit)  # the last bucket ends at the context
        if cache_len is not None:
            writes = bucket + max_new_tokens
            if cache_len < writes:
                raise ValueError(
                    f"cache_len {cache_len} is smaller than the {writes} slots the generation writes: prompts of "
                    f"{length} tokens"
                    + (f" (left-padded to their bucket of {bucket})" if bucket > length else "")
                    + f" + max_new_tokens {max_new_tokens}"
                )
            if cache_len > limit:
                raise ValueError(f"cache_len {cache_len} exceeds the model's max_seq_len {limit}")
            if cache_len == writes:
                cache_len = None  # the default's program, not a second one of the same shapes
        if bucket > length:  # more left padding: the same bucket, the same program
            pad = bucket - length
            prompt_ids = np.concatenate([np.full((batch, pad), self.pad_id, np.int32), prompt_ids], 1)
            prompt_mask = np.concatenate([np.zeros((batch, pad), np.int32), prompt_mask], 1)
        if self.mesh is None:
            prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
        else:  # prompts arrive split over the data axes, like the cache
            rows = named_sharding(("batch", None), prompt_ids.shape, self.mesh)
            prompt_ids, prompt_mask = put((prompt_ids, prompt_mask), (rows, rows))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return compiled_generate(
                self.graphdef,
                self.state,
                prompt_ids,
                prompt_mask,
                key,
                sampling.as_arrays(),
                n=n,
                max_new_tokens=max_new_tokens,
                eos_ids=tuple(int(e) for e in self.eos_ids),
                stops=stop_table(stop_sequences),
                pad_id=int(self.pad_id),
                cache_len=None if cache_len is None else int(cache_len),
            )
