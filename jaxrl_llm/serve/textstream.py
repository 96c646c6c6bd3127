"""Token ids in, text deltas out: incremental detokenization and stop strings, for streaming answers.

``TextStream(tokenizer, stop=("\\n\\n",))``; ``push(token_id) -> str`` returns the text that token makes
safe to show, ``finish() -> str`` what was held back once the answer ended; the concatenated deltas equal
``tokenizer.decode(ids, skip_special_tokens=True)`` of every pushed id, cut before the first stop string.

Detokenization. A token's text cannot be decoded on its own: a byte-level BPE token may hold half of a
UTF-8 character, and SentencePiece drops the leading space of the first token it decodes. So the stream
decodes a window: the ids from the start of the last emitted token's window to the end
(``decode(ids[prefix:])``) minus the text of the already emitted part (``decode(ids[prefix:read])``); while
the new text ends with U+FFFD (an incomplete character) nothing is emitted and the window grows. This is the
scheme of vLLM's and HF's streamers, linear in the answer's length where decoding everything at every token
would be quadratic.

Stop strings are matched on the decoded text (a stop string spelt with any tokens is caught). Text that could
be the start of a stop string is held back until it is known not to be one; once one matches, ``stopped`` is
set, the text before it is the last delta, and the stop string itself is left out (as OpenAI's API does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental decoding of one answer (see the module docstring).

    Attributes:
      ids: every pushed id.
      text: the text emitted so far (the concatenated deltas).
      stopped: the stop string that ended the answer, or None.
    """

    def __init__(self, tokenizer: Any, stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.stopped: str | None = None
        self._prefix = 0  # ids[prefix:read] decode to the tail of the emitted (or held) text
        self._read = 0
        self._held = ""  # decoded text not emitted yet: it may be the start of a stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Adds one generated id; returns the text it makes safe to emit (often ``""``)."""
        if self.stopped is not None:
            return ""
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still incomplete
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(after[len(before) :])

    def finish(self) -> str:
        """The text held back at the end of the answer (an incomplete character is emitted as U+FFFD)."""
        if self.stopped is not None:
            return ""
        tail = self._decode(self.ids[self._prefix :])[
            len(self._decode(self.ids[self._prefix : self._read])) :
        ]
        self._prefix = self._read = len(self.ids)
        out = self._release(tail, final=True)
        return out

    def _release(self, new: str, *, final: bool = False) -> str:
        pending = self._held + new
        cut = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = next(s for s in self.stops if pending.find(s) == cut)
            out, self._held = pending[:cut], ""
        else:
            keep = 0 if final else partial_match(pending, self.stops)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out


def partial_match(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
