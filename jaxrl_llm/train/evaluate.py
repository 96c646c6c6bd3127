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

from .step import build_eval_step


class LossEvaluator:
    """Sums the objective's statistics over eval batches and summarizes them once (a global mean)."""

    def __init__(self, graphdef, objective, mesh):
        self.objective, self.mesh = objective, mesh
        self._step = jax.jit(build_eval_step(graphdef, objective))  # one compile per batch shape

    def __call__(self, params, batches: Iterable[dict[str, np.ndarray]], rng: jax.Array) -> dict[str, float]:
        total, norm, count = None, 0.0, 0
        with jax.set_mesh(self.mesh):
            for batch in batches:
                sums, n = self._step(params, to_device(batch, self.mesh), rng)
                total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
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


def stop_ids(renderer: Any) -> tuple[int, ...]:
    """Ids that end a generated answer: the tokenizer's EOS ids and the template's end-of-turn token.

    A base model's EOS often differs from its chat template's turn terminator (Qwen2.5 base: EOS
    ``<|endoftext|>``, turns end with ``<|im_end|>``; Llama 3: ``<|end_of_text|>`` vs ``<|eot_id|>``); the
    terminator is read off a rendered one-turn exchange: the special token right after the answer.
    """
    from jaxrl_llm.errors import UserError

    tok = renderer.tokenizer
    ids = list(tok.eos_ids)
    user, answer = {"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}
    try:
        prompt = renderer.render_prompt([user])
        rest = renderer.render_ids([user, answer])[len(prompt) :]
    except UserError:
        return tuple(ids)
    content = renderer.encode("2")
    n = len(content)
    if len(rest) > n and rest[:n].tolist() == content.tolist():
        end = int(rest[n])
        if tok.decode([end], skip_special_tokens=True) == "" and end not in ids:
            ids.append(end)
    return tuple(ids)


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

    from jaxrl_llm.rollout import Sampler, SamplingParams, left_pad

    pairs = prompts_and_answers(records)
    if not pairs:
        return {}, []
    tok = renderer.tokenizer
    pad = tok.pad_id if tok.pad_id is not None else 0
    prompts = [renderer.render_prompt(r["messages"], r.get("tools")).tolist() for r, _ in pairs]
    width = max(map(len, prompts))  # one shape for every chunk: one compile
    sampler = Sampler(model, eos_ids=stop_ids(renderer), pad_id=pad, mesh=mesh)
    hits, shown = 0, []
    for start in range(0, len(pairs), batch_size):
        chunk, rows = pairs[start : start + batch_size], prompts[start : start + batch_size]
        n = len(rows)
        ids, mask = left_pad(rows + [rows[-1]] * (batch_size - n), pad, width)
        rollout = sampler.sample(
            ids, mask, key=jax.random.key(0), max_new_tokens=max_new_tokens, sampling=SamplingParams.greedy()
        )
        tokens, lengths = np.asarray(rollout.tokens)[:n], np.asarray(rollout.lengths)[:n]
        for (record, answer), out, length in zip(chunk, tokens, lengths, strict=True):
            text = tok.decode(out[:length].tolist(), skip_special_tokens=True).strip()
            hit = text == answer.strip()
            hits += hit
            if len(shown) < examples:
                question = record["messages"][-1].get("content", "")
                shown.append({"prompt": str(question), "reference": answer, "generated": text})
    return {"exact_match": hits / len(pairs), "samples": len(pairs)}, shown
