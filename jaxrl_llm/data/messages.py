"""Pieces shared by the converters: typed field access, tool calls, tool schemas and typed content parts.

Every function takes the field path of its value *in the source format* (``conversations[3].value``) so
that a :class:`RecordError` points at what the user wrote, not at our canonical form.
"""

from __future__ import annotations

import json
from typing import Any

from jaxrl_llm.data.records import RecordError
from jaxrl_llm.data.schema import tool_schema

TOOL_CALL_SHAPE = 'a JSON tool call {"name": str, "arguments": object} or a list of them'


def _loads(text: str, field: str, expected: str) -> Any:
    """``json.loads(text)``, or a RecordError at ``field`` saying ``expected`` and why it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(field, f"{expected} (invalid JSON: {err.msg} at char {err.pos})", text) from None
    except RecursionError:
        raise RecordError(field, f"{expected} (invalid JSON: nested too deeply to parse)", text) from None


def column(value: dict, key: str, expected: str) -> Any:
    """``value[key]``, or a RecordError saying the column is missing."""
    if key not in value:
        raise RecordError(key, f"{expected} (the column is missing; the record has {_keys(value)})")
    return value[key]


def str_column(value: dict, key: str, expected: str) -> str:
    """``value[key]`` when it is a string; a RecordError saying ``expected`` otherwise."""
    return expect_str(column(value, key, expected), key, expected)


def _keys(value: dict) -> str:
    keys = sorted(map(str, value))
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "") if keys else "no keys"


def expect_str(value: Any, field: str, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise RecordError(field, expected, value)
    return value


def expect_list(value: Any, field: str, expected: str) -> list:
    if not isinstance(value, list):
        raise RecordError(field, expected, value)
    return value


def expect_dict(value: Any, field: str, expected: str) -> dict:
    if not isinstance(value, dict):
        raise RecordError(field, expected, value)
    return value


def optional_str(value: dict, key: str | None, field: str | None = None) -> str | None:
    """The string in column ``key`` when it is set and non-empty; None for a missing, null or empty one."""
    if not key or value.get(key) in (None, ""):
        return None
    return expect_str(value[key], field or key)


def parse_tool_calls(raw: Any, field: str) -> list[dict]:
    """Tool calls as canonical ``[{"name": str, "arguments": dict}]``.

    Accepts a JSON string or an already-parsed value; one call or a list; each call flat
    (``{"name", "arguments"}``, LLaMA-Factory) or nested (``{"type": "function", "function": {...}}``,
    OpenAI); ``arguments`` an object or a JSON string holding one.
    """
    if isinstance(raw, str):
        raw = _loads(raw, field, TOOL_CALL_SHAPE)
    calls = raw if isinstance(raw, list) else [raw]
    if not calls:
        raise RecordError(field, f"{TOOL_CALL_SHAPE}, not an empty list", raw)
    path = (lambda i: f"{field}[{i}]") if isinstance(raw, list) else (lambda i: field)
    return [_tool_call(call, path(i)) for i, call in enumerate(calls)]


def _tool_call(call: Any, field: str) -> dict:
    expect_dict(call, field, TOOL_CALL_SHAPE)
    if isinstance(call.get("function"), dict):
        call, field = call["function"], f"{field}.function"
    name = expect_str(call.get("name"), f"{field}.name", "the tool's name, a string")
    if "arguments" in call:
        key = "arguments"
    elif "parameters" in call:  # Llama-3-style calls name them "parameters"
        key = "parameters"
    else:
        raise RecordError(f"{field}.arguments", "an object of arguments (the key is missing)")
    args = call[key]
    if isinstance(args, str):
        # A string that is not a JSON object is kept as it is, as the schema does: whether the call is
        # dropped is the `bad_tool_call` filter's decision, the same for every source format.
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError):
            parsed = None
        return {"name": name, "arguments": parsed if isinstance(parsed, dict) else args}
    return {"name": name, "arguments": expect_dict(args, f"{field}.{key}", "an object of arguments")}


def parse_tools(raw: Any, field: str) -> list[dict] | None:
    """Tool schemas as a list of function schemas ``{"name", "description"?, "parameters"?}``, or None for
    no tools (missing, null, ``""``, ``[]``).

    LLaMA-Factory stores them as a JSON string; OpenAI wraps each in ``{"type": "function", "function":
    ...}``; both come out unwrapped so that every canonical record lists tools the same way.
    """
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        raw = _loads(raw, field, "a JSON list of tool schemas")
    tools = [raw] if isinstance(raw, dict) else expect_list(raw, field, "a list of tool schemas")
    where = (lambda i: f"{field}[{i}]") if isinstance(raw, list) else (lambda i: field)
    return [tool_schema(tool, where(i)) for i, tool in enumerate(tools)] or None


def content_parts(parts: list, field: str) -> tuple[str, str | None, list[dict]]:
    """Typed content parts -> (text, reasoning or None, tool calls).

    Parts are ``{"type": ..., "text"|"value": ...}`` (OpenAI uses ``text``, LLaMA-Factory's v1 demos use
    ``value``). Text parts are concatenated as OpenAI does; ``reasoning``/``thinking`` parts become the
    message's reasoning; ``tool_call`` parts hold a JSON tool call each. Media parts are refused: the
    canonical records are text-only.
    """
    text, reasoning, calls = [], [], []
    for i, part in enumerate(parts):
        where = f"{field}[{i}]"
        expect_dict(part, where, 'a content part {"type": ..., "text": ...}')
        kind = part.get("type")
        key = "text" if "text" in part else "value"
        if kind == "text":
            text.append(expect_str(part.get(key), f"{where}.{key}"))
        elif kind in ("reasoning", "thinking"):
            reasoning.append(expect_str(part.get(key), f"{where}.{key}"))
        elif kind == "tool_call":
            calls.extend(parse_tool_calls(part.get(key), f"{where}.{key}"))
        else:
            raise RecordError(
                f"{where}.type",
                "one of 'text', 'reasoning', 'tool_call' (media parts are not supported)",
                kind,
            )
    return "".join(text), ("".join(reasoning) if reasoning else None), calls


def kto_label(value: dict, key: str) -> bool:
    """The KTO label: true (desirable) or false (undesirable), as LLaMA-Factory requires a boolean."""
    label = column(value, key, "the KTO label, true or false")
    if not isinstance(label, bool):
        raise RecordError(key, "the KTO label, true or false", label)
    return label
