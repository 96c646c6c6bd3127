"""Host rewards: Python over one sample's decoded completion and its record.

Each is ``fn(completion: str, record: Mapping, **params) -> float | None`` (``None``: does not apply to
this sample). The record is the prompt record the completion answers (``ground_truth``, ``tools``,
``tests``, ... as the data layer produced them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from .base import RewardError, register
from .math_answers import math_verify as _math_verify
from .sandbox import code_exec_reward


def _field(record: Mapping[str, Any], key: str, reward: str) -> Any:
    """``record[key]`` (a dotted ``a.b`` path walks mappings); a bare key also looks in the record's ``meta``."""
    value: Any = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None and "." not in key and isinstance(record.get("meta"), Mapping):
        value = record["meta"].get(key)
    if value is None:
        raise KeyError(f"{reward}: the record has no {key!r} field (keys: {sorted(record)})")
    return value


@register("math_verify", "host")
def math(completion: str, record: Mapping[str, Any], *, field: str = "ground_truth") -> float:
    """1.0 when the completion's final answer equals the record's ground truth (``math_verify``)."""
    return _math_verify(completion, str(_field(record, field, "math_verify")))


@lru_cache(maxsize=64)
def _compiled(pattern: str, flags: int) -> re.Pattern[str]:
    return re.compile(pattern, flags)


@register("format_regex", "host")
def format_regex(
    completion: str,
    record: Mapping[str, Any],
    *,
    pattern: str = "",
    mode: str = "fullmatch",
    dotall: bool = True,
) -> float:
    """1.0 when ``pattern`` matches the completion (``mode``: ``fullmatch``, ``match`` or ``search``)."""
    if not pattern:
        raise RewardError("format_regex: set params.pattern")
    if mode not in ("fullmatch", "match", "search"):
        raise RewardError(f"format_regex: mode {mode!r}; valid: fullmatch, match, search")
    regex = _compiled(pattern, re.DOTALL if dotall else 0)
    return float(getattr(regex, mode)(completion) is not None)


@register("think_answer_format", "host")
def think_answer_format(
    completion: str, record: Mapping[str, Any], *, think: str = "think", answer: str = "answer"
) -> float:
    """1.0 for ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else (whitespace aside), each
    tag exactly once (the R1-style format reward)."""
    t, a = re.escape(think), re.escape(answer)
    pattern = rf"\s*<{t}>(?:(?!</?{t}>).)*</{t}>\s*<{a}>(?:(?!</?{a}>).)*</{a}>\s*"
    return float(_compiled(pattern, re.DOTALL).fullmatch(completion) is not None)


TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)  # Qwen/Hermes


def parse_tool_calls(completion: str) -> list[Any]:
    """The JSON of each ``<tool_call>...</tool_call>`` block (Qwen/Hermes format); unparsable (or nested
    past the JSON parser's depth) -> the text."""
    calls = []
    for body in TOOL_CALL_BLOCK.findall(completion):
        try:
            calls.append(json.loads(body))
        except (ValueError, RecursionError):
            calls.append(body)
    return calls


def tool_call_problems(call: Any, tools: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why a parsed call is invalid against the record's tool schemas (empty when it is valid)."""
    import jsonschema

    if not isinstance(call, Mapping):
        return [f"not a JSON object: {str(call)[:80]!r}"]
    name, args = call.get("name"), call.get("arguments", {})
    by_name = {t.get("name"): t for t in tools}
    if name not in by_name:
        return [f"unknown tool {name!r}; declared: {sorted(n for n in by_name if n)}"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return [f"{name}: arguments are not JSON"]
    schema = by_name[name].get("parameters") or {"type": "object"}
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{name}: {e.message}" for e in validator.iter_errors(args)]


@register("tool_call_valid", "host")
def tool_call_valid(
    completion: str, record: Mapping[str, Any], *, require_call: bool = False
) -> float | None:
    """Tool calls valid against the record's ``tools`` schemas: JSON, a declared name, arguments that satisfy
    the tool's ``parameters`` JSON schema. 1.0 when every call is valid, 0.0 when one is not; a completion
    without calls scores 0.0 with ``require_call``, else the reward does not apply (``None``)."""
    calls = parse_tool_calls(completion)
    if not calls:
        return 0.0 if require_call else None
    tools = record.get("tools") or []
    return float(all(not tool_call_problems(c, tools) for c in calls))


@register("code_exec", "host")
def code_exec(
    completion: str, record: Mapping[str, Any], *, field: str = "tests", timeout_s: float = 5.0
) -> float:
    """Fraction of the record's tests (Python snippets, e.g. ``assert f(2) == 4``) that the completion's code
    passes, run in the sandbox (``code_exec_reward``)."""
    tests = _field(record, field, "code_exec")
    if isinstance(tests, str):
        tests = [tests]
    return code_exec_reward(completion, list(tests), timeout_s=timeout_s)
