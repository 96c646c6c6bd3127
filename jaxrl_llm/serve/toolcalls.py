"""Generated tool calls back into OpenAI's ``tool_calls``: the ``<tool_call>{json}</tool_call>`` blocks of
the Qwen/Hermes templates (the format ``reward.host.parse_tool_calls`` reads for rewards).

``split_tool_calls(text) -> (content, calls)``: every block must hold a JSON object with a string ``name``
and ``arguments`` (an object, or a string holding one); then ``calls`` are OpenAI tool calls
(``{"id", "type": "function", "function": {"name", "arguments": JSON string}}``) and ``content`` is the text
outside the blocks (None when only whitespace). When a block is not such a call the text is returned whole
as content and ``calls`` is empty: a malformed call is shown to the client rather than silently dropped.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..reward.host import TOOL_CALL_BLOCK, parse_tool_calls
from .textstream import partial_match

OPEN = "<tool_call>"


def _call(call: Any) -> dict[str, Any] | None:
    """An OpenAI tool call from a parsed block (``parse_tool_calls``: a JSON value, or the text when it was
    not JSON); None when it is not a call."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError):
            return None
        args = parsed
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def split_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a generated answer (see the module docstring)."""
    parsed = parse_tool_calls(text)
    if not parsed:
        return text, []
    calls = [_call(call) for call in parsed]
    if any(c is None for c in calls):
        return text, []
    content = TOOL_CALL_BLOCK.sub("", text).strip()
    return content or None, calls


class ToolCallGate:
    """Streams the text before the first ``<tool_call>`` and keeps the rest for :meth:`finish` (text that
    could be the start of the tag is held back), so a streamed answer ends with the same ``(content,
    tool_calls)`` as ``split_tool_calls`` of the whole text gives after that text's own prefix."""

    def __init__(self):
        self.shown = ""  # the text let through
        self._held = ""
        self._rest: str | None = None  # from the first <tool_call> on

    def push(self, text: str) -> str:
        if self._rest is not None:
            self._rest += text
            return ""
        pending = self._held + text
        at = pending.find(OPEN)
        if at >= 0:
            self._rest, self._held = pending[at:], ""
            out = pending[:at]
        else:
            keep = partial_match(pending, (OPEN,))
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.shown += out
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """``(the text still to show, tool_calls)``: with calls, the text outside them (stripped)."""
        rest = self._held + (self._rest or "")
        self._held, self._rest = "", None
        content, calls = split_tool_calls(rest)
        if not calls:
            return rest, []
        return content or "", calls
