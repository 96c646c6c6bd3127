"""Shared vocabulary of the data layer: record kinds, where a record came from, and record errors.

Readers turn files into :class:`RawRecord` items (a parsed JSON-like value, or the reason it could not be
parsed); converters turn a source format (LLaMA-Factory alpaca/sharegpt, OpenAI messages, ...) into one of
the canonical kinds below; the schema validates canonical records. Every error names the source, the
record and the field path, and says what was expected.

Canonical kinds (see docs/ARCHITECTURE.md):

- conversation: ``{"messages": [message, ...], "tools"?: [json-schema, ...]}``
- preference: ``{"prompt": [message, ...], "chosen": [message, ...], "rejected": [message, ...], "tools"?: [...]}``
- unpaired (KTO): ``{"prompt": [message, ...], "completion": [message, ...], "label": bool, "tools"?: [...]}``
- prompt (RL): ``{"prompt": [message, ...], "ground_truth"?: any JSON, "meta"?: dict, "tools"?: [...]}``
- text (pre-training): ``{"text": str}``

with ``message = {"role": "system"|"user"|"assistant"|"tool", "content": str,
"tool_calls"?: [{"name": str, "arguments": dict}], "reasoning"?: str, "name"?: str}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrl_llm.errors import UserError

KINDS = ("conversation", "preference", "unpaired", "prompt", "text")
ROLES = ("system", "user", "assistant", "tool")
SCHEMA_VERSION = 1
# json.loads raises RecursionError (not JSONDecodeError) on arrays/objects nested ~1000 deep.
TOO_DEEP = "invalid JSON: nested too deeply to parse"


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record came from: ``source`` (file path or dataset name), its 0-based ``index`` among the
    records of that source, and for line-based files its 1-based ``line``."""

    source: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source}[{self.index}]"


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record as a reader produced it: a parsed value, or ``error`` saying why it could not be parsed
    (a broken JSON line, bytes that are not UTF-8, a row of the wrong type). Exactly one of the two is set."""

    location: Location
    value: Any = None
    error: str | None = None
    text: str | None = None  # with ``error``: the record's own text when it is not JSON (for rejects.jsonl)


def option(name: str) -> str:
    """How a user sets the data option ``name``, said to both entry points that reach the data layer:
    ``--format (data.format in a training config)``."""
    return f"--{name.replace('_', '-')} (data.{name} in a training config)"


def listed(names: list[str], limit: int = 10) -> str:
    """``names`` joined for a message: the first ``limit``, then how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


class DataError(UserError):
    """A source that cannot be read at all (missing file, unknown format, bad dataset_info.json entry)."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecordError(UserError):
    """One record that does not fit its schema or source format.

    ``field`` is the path inside the record (``messages[2].tool_calls[0].arguments``; empty for the record
    itself), ``expected`` what would have been accepted, ``got`` what was found; ``location`` is added by
    whoever knows it (``at``).
    """

    def __init__(
        self, field: str, expected: str, got: Any = dataclasses.MISSING, *, location: Location | None = None
    ):
        self.field, self.expected, self.got, self.location = field, expected, got, location
        found = "" if got is dataclasses.MISSING else f", got {_short(got)}"
        where = f"{location}: " if location is not None else ""
        super().__init__(f"{where}{field or 'record'}: expected {expected}{found}")

    def at(self, location: Location) -> RecordError:
        """The same error, naming the record it happened in."""
        return RecordError(self.field, self.expected, self.got, location=location)
