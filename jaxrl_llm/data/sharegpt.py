"""LLaMA-Factory's ``sharegpt`` format and its OpenAI-messages variant -> canonical records.

Turns are mapped through the spec's tags: ``user_tag`` -> user, ``assistant_tag`` -> assistant,
``observation_tag`` -> tool, ``system_tag`` -> system (first turn only; it overrides the ``system``
column, as in LLaMA-Factory), and ``function_tag`` -> an assistant turn whose ``tool_calls`` are parsed from
the JSON content. OpenAI-style turns may also carry ``tool_calls`` (flat or ``{"function": ...}``),
``reasoning``/``reasoning_content``, and content as typed parts (``text``, ``reasoning``, ``tool_call``; the
layout of LLaMA-Factory's ``reason_tool_use_demo_50.jsonl``).

Ranking records: the turns are the prompt; ``chosen``/``rejected`` hold one assistant turn each (or a list
of turns). KTO records: the last turn, which must be the assistant's, is the completion the label judges.
"""

from __future__ import annotations

from typing import Any

from jaxrl_llm.data.messages import (
    column,
    content_parts,
    expect_dict,
    expect_list,
    expect_str,
    kto_label,
    optional_str,
    parse_tool_calls,
    parse_tools,
)
from jaxrl_llm.data.records import RecordError
from jaxrl_llm.data.spec import DatasetSpec

_ROLE_OF_TAG = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function",
    "system_tag": "system",
}


class _Turns:
    """The tag mapping of one spec, turning source turns into canonical messages."""

    def __init__(self, spec: DatasetSpec):
        tags = spec.tags
        self.role_tag, self.content_tag = tags["role_tag"], tags["content_tag"]
        self.system_tag = tags["system_tag"]
        self.roles = {tags[t]: role for t, role in _ROLE_OF_TAG.items() if tags.get(t)}
        self.expected = "one of " + ", ".join(repr(t) for t in self.roles)

    def is_system(self, turn: Any) -> bool:
        return isinstance(turn, dict) and turn.get(self.role_tag) == self.system_tag

    def message(self, turn: Any, field: str, *, first: bool = False) -> dict:
        expect_dict(turn, field, f"a turn {{{self.role_tag!r}: ..., {self.content_tag!r}: ...}}")
        tag = turn.get(self.role_tag)
        role = self.roles.get(tag) if isinstance(tag, str) else None
        if role is None or (role == "system" and not first):
            extra = f" ({self.system_tag!r} only as the first turn)" if role == "system" else ""
            raise RecordError(f"{field}.{self.role_tag}", self.expected + extra, tag)
        where = f"{field}.{self.content_tag}"
        content = turn.get(self.content_tag)
        if role == "function":
            return {"role": "assistant", "content": "", "tool_calls": parse_tool_calls(content, where)}
        calls = parse_tool_calls(turn["tool_calls"], f"{field}.tool_calls") if turn.get("tool_calls") else []
        if calls and role != "assistant":
            raise RecordError(f"{field}.tool_calls", "tool calls only on assistant turns", turn["tool_calls"])
        reasoning = None
        if isinstance(content, list):
            content, reasoning, part_calls = content_parts(content, where)
            calls += part_calls
        elif content is None and calls:
            content = ""  # OpenAI sends null content beside tool calls
        elif self.content_tag not in turn:
            raise RecordError(where, "the turn's text, a string (the key is missing)")
        else:
            expect_str(content, where, "the turn's text, a string")
        for key in ("reasoning", "reasoning_content"):
            if turn.get(key) and reasoning is None:
                reasoning = expect_str(turn[key], f"{field}.{key}")
        message: dict[str, Any] = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = calls
        if reasoning is not None:
            message["reasoning"] = reasoning
        if role == "tool" and isinstance(turn.get("name"), str):
            message["name"] = turn["name"]
        return message


def sharegpt_to_canonical(value: dict, spec: DatasetSpec) -> dict:
    """One sharegpt/OpenAI-messages record as a canonical record of kind ``spec.kind``."""
    cols, turns_of = spec.columns, _Turns(spec)
    key = cols["messages"]
    turns = expect_list(column(value, key, "a list of turns"), key, "a list of turns")
    prefix: list[dict] = []
    start = 0
    if turns and turns_of.is_system(turns[0]):
        prefix, start = [turns_of.message(turns[0], f"{key}[0]", first=True)], 1
    else:
        system = optional_str(value, cols.get("system"))
        if system is not None:
            prefix = [{"role": "system", "content": system}]
    messages = [turns_of.message(t, f"{key}[{i}]") for i, t in enumerate(turns[start:], start)]
    out: dict[str, Any]
    if spec.kind == "preference":
        if not messages:
            raise RecordError(key, "a non-empty list of prompt turns", turns)
        chosen, rejected = (_answers(value, cols[k], turns_of) for k in ("chosen", "rejected"))
        out = {"prompt": prefix + messages, "chosen": chosen, "rejected": rejected}
    elif spec.kind == "unpaired":
        if not messages or messages[-1]["role"] != "assistant":
            last = f"{key}[{len(turns) - 1}].{turns_of.role_tag}" if turns else key
            got = turns[-1].get(turns_of.role_tag) if turns else turns
            raise RecordError(last, "an assistant turn last (the completion the KTO label judges)", got)
        out = {"prompt": prefix + messages[:-1], "completion": messages[-1:]}
        out["label"] = kto_label(value, cols["kto_tag"])
    else:
        if not messages:
            raise RecordError(key, "a non-empty list of turns", turns)
        out = {"messages": prefix + messages}
    tools = parse_tools(value.get(cols["tools"]), cols["tools"]) if cols.get("tools") else None
    if tools:
        out["tools"] = tools
    return out


def _answers(value: dict, key: str, turns_of: _Turns) -> list[dict]:
    """``chosen``/``rejected``: one turn (LLaMA-Factory) or a list of turns (TRL-style) opening with the
    assistant's."""
    raw = column(value, key, "an assistant turn")
    if not isinstance(raw, dict | list) or not raw:
        raise RecordError(key, "an assistant turn, or a non-empty list of turns", raw)
    items = [(raw, key)] if isinstance(raw, dict) else [(t, f"{key}[{i}]") for i, t in enumerate(raw)]
    out = [turns_of.message(turn, field) for turn, field in items]
    if out[0]["role"] != "assistant":
        turn, field = items[0]
        raise RecordError(f"{field}.{turns_of.role_tag}", "an assistant turn", turn.get(turns_of.role_tag))
    return out
