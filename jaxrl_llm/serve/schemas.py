"""The request bodies the server accepts (pydantic, strict: a wrong-typed field is an error, never coerced)
and their translation into what the renderer and the engine take.

Unknown fields are ignored (clients send ``user``, ``store``, ``parallel_tool_calls``, ...), except those
that would change the answer and are not implemented (penalties, ``logit_bias``, a JSON ``response_format``,
``echo``, ``suffix``, a forced ``tool_choice``): asking for them is a 400, not a silent no-op.

OpenAI messages become the data layer's canonical messages (``data.schema.message`` checks them, as it
checks training records): ``developer`` is ``system``, content parts are joined, an assistant's
``tool_calls`` become ``{"name", "arguments": dict}``, a tool result gets the ``name`` of the call it
answers (from its ``tool_call_id``), ``reasoning_content`` is ``reasoning``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..data.records import RecordError
from ..data.schema import message as canonical_message
from ..rollout.engine import MAX_TOP_LOGPROBS
from ..rollout.sampling import SamplingParams

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error the client gets as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(self.top_k or 0, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
        )

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError("a stop string must not be empty", param="stop")
        return tuple(stops)

    def unsupported(self) -> None:
        """400 for a field that would change the answer but is not implemented."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise APIError(f"{name} is not supported (only 0)", param=name)
        if self.repetition_penalty not in (None, 1):
            raise APIError("repetition_penalty is not supported (only 1)", param="repetition_penalty")
        if self.logit_bias:
            raise APIError("logit_bias is not supported", param="logit_bias")


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError("response_format: only {'type': 'text'} is supported", param="response_format")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(
                "tool_choice: only 'auto' and 'none' are supported (the model decides whether to call a tool)",
                param="tool_choice",
            )

    def parse_calls(self) -> bool:
        """Whether generated ``<tool_call>`` blocks are parsed: tools were declared and not switched off."""
        return bool(self.tools) and self.tool_choice != "none"

    def canonical(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """``(messages, tools)`` in the data layer's canonical form (raises ``APIError``)."""
        names: dict[str, str] = {}  # tool_call_id -> the called function's name
        out = []
        for i, m in enumerate(self.messages):
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
            if isinstance(m.content, list):
                msg["content"] = "".join(part.text for part in m.content)
            elif m.content is not None:
                msg["content"] = m.content
            if m.tool_calls:
                msg["tool_calls"] = [
                    _call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m.tool_calls)
                ]
                names.update((c.id, c.function.name) for c in m.tool_calls if c.id)
            if m.role == "tool" and (m.name or names.get(m.tool_call_id or "")):
                msg["name"] = m.name or names[m.tool_call_id or ""]
            if m.reasoning_content is not None:
                msg["reasoning"] = m.reasoning_content
            try:
                out.append(canonical_message(msg, f"messages[{i}]"))
            except RecordError as err:
                raise APIError(str(err), param=err.field or f"messages[{i}]") from None
        tools = [t.function.model_dump(exclude_none=True) for t in self.tools or ()] or None
        return out, tools


def _call(call: ToolCall, where: str) -> dict[str, Any]:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            raise APIError(f"{where}.function.arguments: not a JSON object", param=where) from None
        if not isinstance(args, dict):
            raise APIError(f"{where}.function.arguments: not a JSON object", param=where)
    return {"name": call.function.name, "arguments": args}


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def budget(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError("echo is not supported", param="echo")
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise APIError("best_of is not supported (only equal to n)", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string or id list, or a batch of them."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError("prompt is empty", param="prompt")
        return list(p)


def error_param(loc: tuple[Any, ...]) -> str | None:
    """``messages[0].role`` from a pydantic error location (union member tags such as ``str`` or
    ``list[int]`` left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "function-after"):
            continue
        else:
            out += f".{part}" if out else part
    return out or None
