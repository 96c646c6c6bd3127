"""Evaluation during training: the objective's loss on held-out batches, and greedy exact match.

Exact match renders each held-out conversation without its last assistant turn (with the generation
prompt, exactly as serving would), generates greedily, cuts at the first EOS id and compares the decoded
text, stripped of surrounding whitespace, with the reference answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from jaxrl_llm.data.pipeline import to_device
from jaxrl_llm.objectives.base import combine_sums

from .state import Frozen
from .step import NO_FROZEN, build_eval_step


class LossEvaluator:
    """Sums the objective's statistics over eval batches and summarizes them once (a global mean).

    ``evaluator(params, batches, rng)``; ``frozen`` (a live reference) and ``prepare`` (a precomputed
    reference looked up) as in training, so held-out metrics mean what the training ones do.
    """

    def __init__(self, graphdef, objective, mesh, frozen: Frozen = NO_FROZEN, prepare=None):
        self.objective, self.mesh, self.frozen, self.prepare = objective, mesh, frozen, prepare
        self._step = jax.jit(build_eval_step(graphdef, objective))  # one compile per batch shape

    def __call__(self, params, batches: Iterable[dict[str, np.ndarray]], rng: jax.Array) -> dict[str, float]:
        total, norm, count = None, 0.0, 0
        with jax.set_mesh(self.mesh):
            for batch in batches:
                batch = to_device(batch, self.mesh)
                if self.prepare is not None:
                    batch = self.prepare(batch)
                sums, n = self._step(params, batch, rng, self.frozen)
                total = sums if total is None else combine_sums(total, sums)
                norm, count = norm + n, count + 1
        if total is None:
            return {}
        metrics = self.objective.summarize(total, norm)
        return {k: float(v) for k, v in jax.device_get(metrics).items()} | {"batches": count}


def prompts_and_answers(records: Sequence[dict]) -> list[tuple[dict, str]]:
    """``(record without its final assistant turn, that turn's text)`` for conversations ending with one."""
    out = []
    for r in records:
        messages = r.get("messages")
        if not messages or messages[-1].get("role") != "assistant":
            continue
        answer = messages[-1].get("content")
        if not isinstance(answer, str) or len(messages) < 2:
            continue
        out.append(({**r, "messages": messages[:-1]}, answer))
    return out


def exact_match(
    model: Any,
    renderer: Any,
    records: Sequence[dict],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    mesh: Any = None,
    examples: int = 3,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """``({"exact_match", "samples"}, a few {prompt, reference, generated} examples)``."""
    import jax

    from jaxrl_llm.rollout import ChatSampler, SamplingParams

    pairs = prompts_and_answers(records)
    if not pairs:
        return {}, []
    chat = ChatSampler(model, renderer, batch_size=batch_size, mesh=mesh)
    completions = chat.generate(
        [record for record, _ in pairs],
        key=jax.random.key(0),
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams.greedy(),
    )
    hits, shown = 0, []
    for (record, answer), (completion,) in zip(pairs, completions, strict=True):
        text = completion.text.strip()
        hits += text == answer.strip()
        if len(shown) < examples:
            question = record["messages"][-1].get("content", "")
            shown.append({"prompt": str(question), "reference": answer, "generated": text})
    return {"exact_match": hits / len(pairs), "samples": len(pairs)}, shown
