"""The canonical record schemas: ``validate_record`` checks one record and returns its canonical form.

The canonical form is what everything downstream (filters, the content hash, rendering) sees, so it is
normalised: top-level keys the kind does not define are dropped (datasets carry ``id`` and similar columns
that must not change the dataset's version), messages become plain dicts with their keys in one order, a
JSON string in ``tool_calls[i].arguments`` or ``tools`` is parsed, tool schemas lose OpenAI's
``{"type": "function", "function": ...}`` wrapper, ``None`` optional keys are removed, and
an assistant message that only calls tools gets ``content = ""``.

Messages are strict: an unknown message key is an error listing the allowed ones, because a misspelt
``"contnet"`` silently dropped would train on an empty turn.

Tool-call arguments that are a string but not a JSON object are kept as the string: whether such a call is
dropped is the ``bad_tool_call`` quality filter's decision (``data.check_tool_calls``), not a schema error.
"""

from __future__ import annotations

import json
from typing import Any

from .records import KINDS, ROLES, RecordError

MESSAGE_KEYS = ("role", "content", "tool_calls", "reasoning", "name")
TOOL_CALL_KEYS = ("name", "arguments")
# Per kind: the required keys, then the optional ones. The order of KINDS in detect_kind matters
# (preference and unpaired records also have a "prompt").
KIND_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "conversation": (("messages",), ("tools",)),
    "preference": (("prompt", "chosen", "rejected"), ("tools",)),
    "unpaired": (("prompt", "completion", "label"), ("tools",)),
    "prompt": (("prompt",), ("ground_truth", "meta", "tools")),
    "text": (("text",), ()),
}
# Keys that identify a kind on their own, checked in this order.
_MARKERS = (
    ("messages", "conversation"),
    ("chosen", "preference"),
    ("rejected", "preference"),
    ("completion", "unpaired"),
    ("label", "unpaired"),
    ("prompt", "prompt"),
    ("text", "text"),
)


def detect_kind(value: Any) -> str | None:
    """The kind a record's keys indicate (``messages`` -> conversation, ``chosen`` -> preference, ...), or
    None when ``value`` is not a dict or has none of the identifying keys."""
    if not isinstance(value, dict):
        return None
    for key, kind in _MARKERS:
        if key in value:
            return kind
    return None


def validate_record(kind: str, value: Any) -> dict:
    """Checks ``value`` against the schema of ``kind`` and returns its canonical form.

    Raises:
      RecordError: naming the field path (``messages[2].tool_calls[0].arguments``) and what was expected.
      ValueError: when ``kind`` is not one of ``KINDS`` (a programming error, not a data error).
    """
    if kind not in KIND_KEYS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(value, dict):
        raise RecordError("", f"a JSON object (a {kind} record)", _type_name(value))
    required, _ = KIND_KEYS[kind]
    missing = [key for key in required if key not in value]
    if missing:
        detected = detect_kind(value)
        if detected is not None and detected != kind:
            raise RecordError(
                "",
                f"a {kind} record with keys {list(required)} (these keys make a {detected} record)",
                sorted(value),
            )
        raise RecordError(missing[0], f"a key of every {kind} record (required: {list(required)})")
    detected = detect_kind(value)
    if detected != kind and all(key in value for key in KIND_KEYS[detected][0]):
        # Validating it as `kind` would silently drop the keys that make it a `detected` record.
        raise RecordError(
            "", f"a {kind} record, not one with every key of a {detected} record", sorted(value)
        )
    return _CHECKS[kind](value)


def _conversation(value: dict) -> dict:
    out: dict[str, Any] = {"messages": messages(value["messages"], "messages")}
    return _with_tools(out, value)


def _preference(value: dict) -> dict:
    out: dict[str, Any] = {"prompt": messages(value["prompt"], "prompt")}
    for key in ("chosen", "rejected"):
        out[key] = messages(value[key], key)
        _needs_assistant(out[key], key)
    return _with_tools(out, value)


def _unpaired(value: dict) -> dict:
    out: dict[str, Any] = {"prompt": messages(value["prompt"], "prompt")}
    out["completion"] = messages(value["completion"], "completion")
    _needs_assistant(out["completion"], "completion")
    label = value["label"]
    if not isinstance(label, bool):
        # 0/1 are refused on purpose: a column of scores or a string "false" would pass as a label.
        raise RecordError("label", "true or false (a JSON boolean; 0/1 and strings are not accepted)", label)
    out["label"] = label
    return _with_tools(out, value)


def _prompt(value: dict) -> dict:
    out: dict[str, Any] = {"prompt": messages(value["prompt"], "prompt")}
    if value.get("ground_truth") is not None:
        out["ground_truth"] = _json_value(value["ground_truth"], "ground_truth")
    if value.get("meta") is not None:
        meta = value["meta"]
        if not isinstance(meta, dict):
            raise RecordError("meta", "a JSON object (dict)", _type_name(meta))
        out["meta"] = _json_value(meta, "meta")
    return _with_tools(out, value)


def _text(value: dict) -> dict:
    text = _string(value["text"], "text")
    if not text:
        raise RecordError("text", "a non-empty string", text)
    return {"text": text}


_CHECKS = {
    "conversation": _conversation,
    "preference": _preference,
    "unpaired": _unpaired,
    "prompt": _prompt,
    "text": _text,
}


def messages(value: Any, field: str) -> list[dict]:
    """Checks a non-empty list of messages at ``field`` and returns their canonical forms."""
    if not isinstance(value, list):
        raise RecordError(field, "a list of messages", _type_name(value))
    if not value:
        raise RecordError(field, "a non-empty list of messages", value)
    return [message(item, f"{field}[{i}]") for i, item in enumerate(value)]


def message(value: Any, field: str) -> dict:
    """Checks one message at ``field`` and returns it as a plain dict with keys in ``MESSAGE_KEYS`` order."""
    if not isinstance(value, dict):
        raise RecordError(field, "a message object with 'role' and 'content'", _type_name(value))
    unknown = [key for key in value if key not in MESSAGE_KEYS]
    if unknown:
        raise RecordError(field, f"only the message keys {list(MESSAGE_KEYS)}", f"unknown keys {unknown}")
    role = value.get("role")
    if role not in ROLES:
        raise RecordError(f"{field}.role", f"one of {list(ROLES)}", role)
    out: dict[str, Any] = {"role": role}
    calls = value.get("tool_calls")
    if calls is not None and role != "assistant":
        raise RecordError(f"{field}.tool_calls", "tool_calls only on assistant messages", role)
    calls = _tool_calls(calls, f"{field}.tool_calls") if calls is not None else []
    content = value.get("content")
    if content is None and not calls:
        expected = "a string (None or absent only for an assistant message with tool_calls)"
        got = {"got": None} if "content" in value else {}
        raise RecordError(f"{field}.content", expected, **got)
    out["content"] = "" if content is None else _string(content, f"{field}.content")
    if calls:
        out["tool_calls"] = calls
    if value.get("reasoning") is not None:
        out["reasoning"] = _string(value["reasoning"], f"{field}.reasoning")
    if value.get("name") is not None:
        if role != "tool":
            raise RecordError(f"{field}.name", "'name' only on tool messages (the tool that answered)", role)
        out["name"] = _string(value["name"], f"{field}.name")
    return out


def _tool_calls(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise RecordError(field, "a list of tool calls {'name': str, 'arguments': dict}", _type_name(value))
    calls = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise RecordError(where, "a tool call {'name': str, 'arguments': dict}", _type_name(call))
        unknown = [key for key in call if key not in TOOL_CALL_KEYS]
        if unknown:
            raise RecordError(
                where, f"only the tool-call keys {list(TOOL_CALL_KEYS)}", f"unknown keys {unknown}"
            )
        name = _string(call.get("name"), f"{where}.name")
        if not name:
            raise RecordError(f"{where}.name", "a non-empty tool name", name)
        calls.append({"name": name, "arguments": _arguments(call.get("arguments", {}), f"{where}.arguments")})
    return calls


def _arguments(value: Any, field: str) -> dict | str:
    if isinstance(value, dict):
        return _json_value(value, field)
    if isinstance(value, str):
        _string(value, field)
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value  # left for the bad_tool_call filter
        return parsed if isinstance(parsed, dict) else value
    raise RecordError(field, "a JSON object (dict) or a string holding one", _type_name(value))


def _with_tools(out: dict, value: dict) -> dict:
    tools = value.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return out
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise RecordError(
                "tools", "a list of tool schemas (or a string holding a JSON list)", tools
            ) from None
    if tools is None or tools == []:
        return out  # no tools declared; [] and absent mean the same, so they hash the same
    if not isinstance(tools, list):
        raise RecordError("tools", "a list of tool schemas", _type_name(tools))
    bare = [tool_schema(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    out["tools"] = _json_value(bare, "tools")
    return out


def tool_schema(tool: Any, field: str) -> dict:
    """One tool schema as a bare function schema ``{"name", "description"?, "parameters"?}``: OpenAI's
    ``{"type": "function", "function": {...}}`` wrapper is removed, so that the same tools hash the same
    whichever way a source writes them. The one normalisation of tools, used by converters and schema."""
    if not isinstance(tool, dict):
        raise RecordError(field, "a tool schema object", _type_name(tool))
    if "name" not in tool and isinstance(tool.get("function"), dict):
        tool, field = tool["function"], f"{field}.function"
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise RecordError(f"{field}.name", "the tool's name, a string (at 'name' or 'function.name')", name)
    return tool


def tool_names(tools: list[dict] | None) -> set[str]:
    """The names declared by tool schemas (bare, as canonical records hold them, or OpenAI-wrapped)."""
    return {tool_schema(tool, "tools")["name"] for tool in tools or ()}


def _needs_assistant(msgs: list[dict], field: str) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise RecordError(field, "at least one assistant message", [m["role"] for m in msgs])


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(field, "a string", _type_name(value))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from "\ud800" escapes) pass json.loads but break tokenizers and hashing.
        raise RecordError(field, "valid Unicode text (no lone surrogates)", value) from None
    return value


def _json_value(value: Any, field: str) -> Any:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as err:
        raise RecordError(field, f"a JSON-serialisable value ({err})", _type_name(value)) from None
    return value


class _TypeName(str):
    # repr() without quotes, so an error reads "got int" rather than "got 'int'".
    def __repr__(self) -> str:
        return str(self)


def _type_name(value: Any) -> Any:
    """What to show for a value of the wrong type: small scalars as themselves, containers by type name."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _TypeName(f"str {value[:40]!r}" + ("..." if len(value) > 40 else ""))
    return _TypeName(type(value).__name__)
