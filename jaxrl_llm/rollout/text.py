"""Messages in, text out: render with the chat template, sample with the compiled sampler, decode.

``ChatSampler(model, renderer).generate(conversations, key=..., max_new_tokens=..., n=..., sampling=...,
stop=[...])`` returns, per conversation, ``n`` :class:`Completion` s. The prompt is exactly what training
renders for the same conversation without its last assistant turn, plus the template's generation prompt
(``Renderer.render_prompt``), so a model is served the way it was trained.

Generation ends at the tokenizer's EOS ids and the template's end-of-turn token (``end_of_turn_ids``), at a
stop string, or after ``max_new_tokens``. Stop strings are matched on tokens: each is encoded on its own, so
a stop string the model happens to spell with other tokens is not caught (HF's ``stop_strings`` has the same
limit for token-boundary cases it cannot see); the text then excludes the stop string, as OpenAI's API does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ..errors import UserError
from .sampler import FINISH_REASONS, Sampler, left_pad
from .sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated answer.

    Attributes:
      text: the decoded answer: special tokens skipped, a matched stop string removed.
      token_ids: every generated id (a final EOS / end-of-turn / stop sequence included).
      finish_reason: ``"length"``, ``"eos"`` or ``"stop"``.
      logprobs: per token, under the distribution it was sampled from.
      model_logprobs: per token, under the plain model distribution (temperature 1, full vocabulary).
      prompt_tokens: length of the rendered prompt.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float]
    model_logprobs: list[float]
    prompt_tokens: int


def end_of_turn_ids(renderer: Any) -> tuple[int, ...]:
    """Ids that end a generated answer: the tokenizer's EOS ids and the template's end-of-turn token.

    A base model's EOS often differs from its chat template's turn terminator (Qwen2.5 base: EOS
    ``<|endoftext|>``, turns end with ``<|im_end|>``; Llama 3: ``<|end_of_text|>`` vs ``<|eot_id|>``); the
    terminator is read off a rendered one-turn exchange: the special token right after the answer.
    """
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


def completion_text(tokenizer: Any, ids: list[int], reason: str, stops: Sequence[Sequence[int]]) -> str:
    """A completion's text: its ids decoded with special tokens skipped, without the stop sequence it ended
    with (``reason == "stop"``), as OpenAI's API leaves a matched stop string out."""
    if reason == "stop":
        for seq in stops:
            seq = list(seq)
            if ids[len(ids) - len(seq) :] == seq:
                ids = ids[: len(ids) - len(seq)]
                break
    return tokenizer.decode(ids, skip_special_tokens=True)


def conversation(item: Any, index: int) -> tuple[Sequence[Mapping[str, Any]], Any]:
    """``(messages, tools)`` from a message list or a record with ``messages``/``prompt`` (and ``tools``)."""
    if isinstance(item, Mapping):
        messages = item.get("messages", item.get("prompt"))  # a conversation, or an RL prompt record
        if isinstance(messages, str) or not isinstance(messages, Sequence):
            raise UserError(
                f"conversation {index}: a record needs a 'messages' or 'prompt' list, got keys {sorted(item)}"
            )
        return messages, item.get("tools")
    if isinstance(item, Sequence) and not isinstance(item, str):
        return item, None
    raise UserError(
        f"conversation {index}: expected a list of messages or a record with 'messages', got {type(item).__name__}"
    )


class ChatSampler:
    """Generates answers to chat conversations with ``model`` (see the module docstring).

    Args:
      model: a ``CausalLM``.
      renderer: the ``Renderer`` (tokenizer + chat template) the model was trained with.
      batch_size: conversations per compiled call; the last chunk is padded to it, so every chunk of a
        prompt-length bucket reuses one program.
      mesh: generate sharded over it (see ``Sampler``).
    """

    def __init__(self, model: Any, renderer: Any, *, batch_size: int = 32, mesh: Any = None):
        tok = renderer.tokenizer
        self.renderer, self.batch_size = renderer, batch_size
        self.pad_id = tok.pad_id if tok.pad_id is not None else 0
        self.sampler = Sampler(model, eos_ids=end_of_turn_ids(renderer), pad_id=self.pad_id, mesh=mesh)

    def update(self, model: Any) -> None:
        """Generate with new parameters (after training steps)."""
        self.sampler.update(model)

    def generate(
        self,
        conversations: Sequence[Any],
        *,
        key: jax.Array,
        max_new_tokens: int,
        n: int = 1,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[Completion]]:
        """``n`` completions for each conversation (a message list, or a record with ``messages``/``tools``)."""
        if isinstance(stop, str):
            stop = [stop]
        stop_tokens = [self.renderer.encode(s).tolist() for s in stop]
        for text, ids in zip(stop, stop_tokens, strict=True):
            if not ids:
                raise UserError(f"stop string {text!r} encodes to no tokens")
        prompts = [
            self.renderer.render_prompt(*conversation(c, i)).tolist() for i, c in enumerate(conversations)
        ]
        if not prompts:
            return []
        width = max(map(len, prompts))  # one width for every chunk: one compiled program
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = prompts[start : start + self.batch_size]
            filled = rows + [rows[-1]] * (self.batch_size - len(rows))
            ids, mask = left_pad(filled, self.pad_id, width)
            rollout = self.sampler.sample(
                ids,
                mask,
                key=jax.random.fold_in(key, start),
                max_new_tokens=max_new_tokens,
                n=n,
                sampling=sampling,
                stop_sequences=stop_tokens,
            )
            got = jax.device_get(rollout)
            for i, prompt in enumerate(rows):
                out.append([self._completion(got, i * n + j, len(prompt), stop_tokens) for j in range(n)])
        return out

    def _completion(self, rollout: Any, row: int, prompt_tokens: int, stops: list[list[int]]) -> Completion:
        length = int(rollout.lengths[row])
        ids = np.asarray(rollout.tokens[row][:length]).tolist()
        reason = FINISH_REASONS[int(rollout.finish_reason[row])]
        return Completion(
            text=completion_text(self.renderer.tokenizer, ids, reason, stops),
            token_ids=ids,
            finish_reason=reason,
            logprobs=np.asarray(rollout.logprobs[row][:length]).tolist(),
            model_logprobs=np.asarray(rollout.model_logprobs[row][:length]).tolist(),
            prompt_tokens=prompt_tokens,
        )
