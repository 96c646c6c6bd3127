"""A conversation with a served model: messages kept between turns, answers streamed as they are made."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..serve.service import Service, Settings


class ChatSession:
    """The conversation so far and how to answer it.

    Args:
      service: a started ``Service``.
      settings: generation settings (``max_tokens`` None: the rest of the context).
      system: the system prompt (None: none).
    """

    def __init__(self, service: Service, settings: Settings, system: str | None = None):
        self.service, self.settings, self.system = service, settings, system
        self.messages: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.messages = []

    def conversation(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def ask(self, text: str, write: Callable[[str], Any] = lambda s: None) -> tuple[str, str]:
        """Answers ``text``; every piece of the answer goes to ``write`` as it is made. Returns ``(answer,
        finish_reason)`` and keeps both turns in the conversation (``APIError`` when the conversation no
        longer fits the context: nothing is kept then)."""
        messages = self.conversation() + [{"role": "user", "content": text}]
        prompt = self.service.chat_prompt(messages)
        s = self.settings
        settings = self.service.settings(
            [len(prompt)],
            s.max_tokens if s.max_tokens is None else min(s.max_tokens, self.service.max_len - len(prompt)),
            sampling=s.sampling,
            stop=s.stop,
            seed=s.seed,
        )
        answer, reason, error = "", None, None
        with contextlib.closing(self.service.run(prompt, settings)) as pieces:  # Ctrl-C cancels the request
            for piece in pieces:
                if piece.text:
                    write(piece.text)
                    answer += piece.text
                reason, error = piece.finish_reason or reason, piece.error or error
        if reason == "error":
            raise RuntimeError(f"the generation failed: {error}")
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer, reason or "length"
