"""OpenAI's response shapes: ``chat.completion`` (and its ``chat.completion.chunk`` stream), ``text_completion``,
log-probabilities in the chat and the legacy completions forms, and ``usage``.

An :class:`Answer` gathers one choice's pieces (``service.Piece``), streamed or not, so that a streamed
answer's chunks add up to exactly the message a non-streamed request gets: with tools declared, its text goes
through a ``ToolCallGate`` (text before the first ``<tool_call>`` streams as it comes; the calls, and any
text around them, arrive with the last chunk, whose finish_reason is then ``"tool_calls"``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .service import Piece
from .toolcalls import ToolCallGate

TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: Any) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class Answer:
    """One choice's answer so far."""

    def __init__(self, index: int, tools: bool = False):
        self.index, self.gate = index, ToolCallGate() if tools else None
        self.text = ""
        self.tokens: list[TokenLogprob] = []
        self.count = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.tool_calls: list[dict[str, Any]] = []

    def add(self, piece: Piece) -> str:
        """Takes ``piece``; returns the text to show for it."""
        self.count += piece.count
        self.tokens += piece.tokens
        shown = self.gate.push(piece.text) if self.gate else piece.text
        if piece.finish_reason is not None:
            self.finish_reason, self.error = piece.finish_reason, piece.error
            if self.gate:
                more, self.tool_calls = self.gate.finish()
                shown += more
                if self.tool_calls:
                    self.finish_reason = "tool_calls"
        self.text += shown
        return shown

    def message(self) -> dict[str, Any]:
        if not self.tool_calls:
            return {"role": "assistant", "content": self.text}
        return {
            "role": "assistant",
            "content": self.text if self.text.strip() else None,
            "tool_calls": self.tool_calls,
        }


class Formatter:
    """Builds response objects for one request (``model`` name, ``id``, ``created``)."""

    def __init__(self, tokenizer: Any, model: str, kind: str):
        self.tokenizer, self.model, self.kind = tokenizer, model, kind
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self._names: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        if token_id not in self._names:
            self._names[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._names[token_id]

    # ---------------------------------------------------------------------------------- log-probs

    def chat_logprobs(self, tokens: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        return {
            "content": [
                entry(t, lp) | {"top_logprobs": [entry(i, p) for i, p in top]} for t, lp, top in tokens
            ]
        }

    def completion_logprobs(self, tokens: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        names = [self.token(t) for t, _, _ in tokens]
        offsets = []
        for name in names:
            offsets.append(offset)
            offset += len(name)
        return {
            "tokens": names,
            "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [{self.token(i): p for i, p in top} for _, _, top in tokens],
            "text_offset": offsets,
        }

    # ---------------------------------------------------------------------------------- objects

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def completion(self, answers: list[Answer], usage: dict[str, int], logprobs: bool) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        if self.kind == "chat":
            choices = [
                {
                    "index": a.index,
                    "message": a.message(),
                    "logprobs": self.chat_logprobs(a.tokens) if logprobs else None,
                    "finish_reason": a.finish_reason,
                }
                for a in answers
            ]
            return self._head("chat.completion") | {"choices": choices, "usage": usage}
        choices = [
            {
                "index": a.index,
                "text": a.text,
                "logprobs": self.completion_logprobs(a.tokens) if logprobs else None,
                "finish_reason": a.finish_reason,
            }
            for a in answers
        ]
        return self._head("text_completion") | {"choices": choices, "usage": usage}

    def chunk(
        self,
        answer: Answer,
        text: str,
        tokens: list[TokenLogprob],
        *,
        logprobs: bool,
        finish: bool = False,
        role: bool = False,
        usage: bool = False,
    ) -> dict[str, Any]:
        """One streamed chunk for ``answer``: ``text`` and the ``tokens`` it came from; with ``finish`` its
        finish_reason (and, for chat, the tool calls); ``role`` the opening chunk of a chat answer."""
        reason = answer.finish_reason if finish else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if finish and answer.tool_calls:
                delta["tool_calls"] = [call | {"index": k} for k, call in enumerate(answer.tool_calls)]
            choice = {
                "index": answer.index,
                "delta": delta,
                "logprobs": self.chat_logprobs(tokens) if logprobs and tokens else None,
                "finish_reason": reason,
            }
            out = self._head("chat.completion.chunk") | {"choices": [choice]}
        else:
            choice = {
                "index": answer.index,
                "text": text,
                "logprobs": (
                    self.completion_logprobs(tokens, len(answer.text) - len(text))
                    if logprobs and tokens
                    else None
                ),
                "finish_reason": reason,
            }
            out = self._head("text_completion") | {"choices": [choice]}
        return out | ({"usage": None} if usage else {})

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        object_ = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._head(object_) | {"choices": [], "usage": usage}


def usage(prompt_tokens: int, answers: list[Answer]) -> dict[str, int]:
    completion = sum(a.count for a in answers)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
