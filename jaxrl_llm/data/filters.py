"""Quality filters over canonical records: each returns the reason a record is dropped, or None.

A filtered record is valid but unwanted; it is counted under its reason (``empty_turn``, ``bad_tool_call``,
``role_order``, ``too_many_turns``, ``too_long``, ``too_short``, ``duplicate``) and never written to the
rejects file. A record is
counted once, under the first filter that drops it, in that order; deduplication runs last so that only a
record that is kept is remembered (the first copy of a duplicated record survives, unless it is itself
dropped for another reason, in which case the next copy takes its place).

Role order is checked on every conversation a record holds (``messages``; ``prompt + chosen``,
``prompt + rejected``; ``prompt + completion``; ``prompt``) as a table of allowed successors:

====================================  ===========================
message                               may be followed by
====================================  ===========================
(start)                               system, user
system                                user
user                                  assistant
assistant without tool_calls          user
assistant with tool_calls             tool
tool                                  tool, assistant
====================================  ===========================

So a system message only comes first, a conversation never opens with an assistant or a tool result, a
tool result follows a tool call, and roles alternate. Two user turns in a row are a violation on purpose:
several chat templates (Llama 2, Mistral, Gemma) refuse them, and the right fix (merging them) belongs in
the data, not in a silent rewrite here. Any role may end a conversation (an RL prompt ends with a user).

Token-length bounds (``min_tokens``/``max_tokens``) need a renderer (``jaxrl_llm.render.Renderer``): a
record is ``too_long`` when its longest rendered sequence has more than ``max_tokens`` tokens and
``too_short`` when its shortest has fewer than ``min_tokens`` (``jaxrl_llm.render.records`` says what each
kind renders to: a preference record both of its conversations, an RL prompt its generation prompt, a text
record its encoded text). With a renderer every record is rendered, bounds or not, and one the template
cannot render is not filtered but rejected, with the template's error (``UnrenderableRecord``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jaxrl_llm.errors import UserError

from .records import DataError, Location, RecordError
from .schema import tool_names

REASONS = (
    "empty_turn",
    "bad_tool_call",
    "role_order",
    "too_many_turns",
    "too_long",
    "too_short",
    "duplicate",
)

_NEXT = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
    "assistant+calls": ("tool",),
    "tool": ("tool", "assistant"),
}
_SPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Which quality filters run (the ``data.*`` config keys of the same names)."""

    drop_empty_turns: bool = True
    dedup: bool = True
    check_tool_calls: bool = True
    check_role_order: bool = True
    max_turns: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> FilterConfig:
        """From a validated config's ``data`` section."""
        data = cfg.data
        return cls(
            drop_empty_turns=bool(data.drop_empty_turns),
            dedup=bool(data.dedup),
            check_tool_calls=bool(data.check_tool_calls),
            check_role_order=bool(data.check_role_order),
            max_turns=data.max_turns,
            min_tokens=data.min_tokens,
            max_tokens=data.max_tokens,
        )

    @property
    def counts_tokens(self) -> bool:
        """Whether a token-length bound is set (and so a renderer is needed)."""
        return self.min_tokens is not None or self.max_tokens is not None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # Unset token bounds are left out, so the manifests of data loaded without a tokenizer stay as they were.
        for key in ("min_tokens", "max_tokens"):
            if out[key] is None:
                del out[key]
        return out


DEFAULT_FILTERS = FilterConfig()


def conversations(record: dict) -> Iterator[list[dict]]:
    """Every full conversation a canonical record holds (none for a text record)."""
    if "messages" in record:
        yield record["messages"]
    elif "chosen" in record:
        yield record["prompt"] + record["chosen"]
        yield record["prompt"] + record["rejected"]
    elif "completion" in record:
        yield record["prompt"] + record["completion"]
    elif "prompt" in record:
        yield record["prompt"]


def turns(record: dict) -> int:
    """Messages in the longest conversation of ``record`` (system and tool messages included); 0 for text."""
    return max((len(c) for c in conversations(record)), default=0)


def empty_turn(record: dict) -> str | None:
    """``empty_turn`` when a message (or a text record) is empty or whitespace only; an assistant message
    that only calls tools is not empty."""
    if "text" in record:
        return "empty_turn" if not record["text"].strip() else None
    for conversation in conversations(record):
        for msg in conversation:
            if not msg["content"].strip() and not msg.get("tool_calls"):
                return "empty_turn"
    return None


def bad_tool_call(record: dict) -> str | None:
    """``bad_tool_call`` when a call's arguments are not a JSON object, or when the record declares
    ``tools`` and a call names a tool that is not among them."""
    declared = tool_names(record.get("tools"))
    for conversation in conversations(record):
        for msg in conversation:
            for call in msg.get("tool_calls", ()):
                if not isinstance(call["arguments"], dict):
                    return "bad_tool_call"
                if declared and call["name"] not in declared:
                    return "bad_tool_call"
    return None


def role_order(record: dict) -> str | None:
    """``role_order`` when some message may not follow the one before it (see the module docstring)."""
    for conversation in conversations(record):
        previous: str | None = None
        for msg in conversation:
            if msg["role"] not in _NEXT[previous]:
                return "role_order"
            previous = "assistant+calls" if msg.get("tool_calls") else msg["role"]
    return None


def too_many_turns(record: dict, max_turns: int) -> str | None:
    """``too_many_turns`` when the longest conversation has more than ``max_turns`` messages."""
    return "too_many_turns" if turns(record) > max_turns else None


def token_bounds(lengths: Sequence[int], min_tokens: int | None, max_tokens: int | None) -> str | None:
    """``too_long`` when the longest of a record's rendered ``lengths`` exceeds ``max_tokens``, else
    ``too_short`` when the shortest is below ``min_tokens``."""
    if max_tokens is not None and max(lengths, default=0) > max_tokens:
        return "too_long"
    if min_tokens is not None and min(lengths, default=0) < min_tokens:
        return "too_short"
    return None


class UnrenderableRecord(RecordError):
    """A valid record the chat template cannot render (the template raises, or its parity check fails);
    rejected rather than filtered, since the data or the template needs fixing."""

    def __init__(self, reason: str, location: Location | None = None):
        super().__init__("", "a record the chat template can render", location=location)
        self.reason = reason
        where = f"{location}: " if location is not None else ""
        # RecordError phrases "expected X"; the renderer's message already says what is wrong and where.
        self.args = (f"{where}cannot render: {reason}",)

    def at(self, location: Location) -> UnrenderableRecord:
        return UnrenderableRecord(self.reason, location)


class TokenLength:
    """The token-length filter: renders each record with ``renderer`` and applies ``token_bounds``."""

    def __init__(self, renderer: Any, min_tokens: int | None, max_tokens: int | None):
        # Imported here: the data layer needs the render layer only when a renderer is given.
        from jaxrl_llm.render.records import token_lengths

        self._lengths = lambda record: token_lengths(record, renderer)
        self.min_tokens, self.max_tokens = min_tokens, max_tokens

    def __call__(self, record: dict) -> str | None:
        try:
            lengths = self._lengths(record)
        except UserError as err:  # RenderError, or a tokenizer without a template
            raise UnrenderableRecord(str(err)) from err
        return token_bounds(lengths, self.min_tokens, self.max_tokens)


def dedup_key(record: dict) -> bytes:
    """A digest equal for records that differ only in whitespace runs inside their text (case is kept)."""
    normal: dict[str, Any] = {}
    for key, value in record.items():
        if key == "text":
            normal[key] = _collapse(value)
        elif key in ("messages", "prompt", "chosen", "rejected", "completion"):
            normal[key] = [_normal_message(m) for m in value]
        else:
            normal[key] = value
    text = json.dumps(normal, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).digest()


def _normal_message(msg: dict) -> dict:
    out = dict(msg)
    for key in ("content", "reasoning"):
        if key in out:
            out[key] = _collapse(out[key])
    return out


def _collapse(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


class Deduplicator:
    """Remembers the records it has kept; ``duplicate`` for a record equal (see ``dedup_key``) to one."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __call__(self, record: dict) -> str | None:
        key = dedup_key(record)
        if key in self._seen:
            return "duplicate"
        self._seen.add(key)
        return None


class Filters:
    """The filters ``config`` turns on, applied in ``REASONS`` order; call it once per record, in order.

    ``renderer`` (a ``jaxrl_llm.render.Renderer``) is needed when ``config`` sets token bounds; when given,
    every record is rendered once. A call raises ``UnrenderableRecord`` for a record the template cannot
    render.
    """

    def __init__(self, config: FilterConfig = DEFAULT_FILTERS, renderer: Any = None):
        self.config = config
        checks: list[Callable[[dict], str | None]] = []
        if config.drop_empty_turns:
            checks.append(empty_turn)
        if config.check_tool_calls:
            checks.append(bad_tool_call)
        if config.check_role_order:
            checks.append(role_order)
        if config.max_turns is not None:
            limit = config.max_turns
            checks.append(lambda record: too_many_turns(record, limit))
        if config.counts_tokens or renderer is not None:
            # With a renderer every record is rendered here, bounds or not: one the template cannot render
            # is rejected at load time (counted, in the rejects) rather than failing later in a pipeline.
            if renderer is None:
                raise DataError(
                    f"min_tokens={config.min_tokens!r}, max_tokens={config.max_tokens!r}: token-length bounds "
                    "need a tokenizer and chat template to count tokens (a renderer; --tokenizer DIR)"
                )
            checks.append(TokenLength(renderer, config.min_tokens, config.max_tokens))
        if config.dedup:
            checks.append(Deduplicator())
        self._checks = checks

    def __call__(self, record: dict) -> str | None:
        """The reason ``record`` is dropped, or None to keep it."""
        for check in self._checks:
            reason = check(record)
            if reason is not None:
                return reason
        return None
