"""Chat messages -> token ids and a loss mask for training, or a generation prompt for rollout and serving.

One :class:`Renderer` holds a tokenizer and one chat template (the tokenizer's own Jinja template, or a
built-in from ``jaxrl_llm.render.templates``); training, rollout, eval and serving all render through it,
so the ids a model is trained on are the ids it is prompted with.

How a conversation becomes ids and a mask. Texts are rendered by the template and encoded with
``add_special_tokens=False``: as with HF's ``apply_chat_template(tokenize=True)`` and vLLM, the template
writes BOS itself when the model wants one (``{{ bos_token }}``; the built-ins that need it do), and
nothing is added on top. For the assistant message at index ``i``::

    P_i = encode(render(messages[:i], add_generation_prompt=True))    # what the model is prompted with
    F_i = encode(render(messages[:i + 1]))                            # ... and what it then produced

The turn's trained tokens are ``full[len(P_i):len(F_i)]``: everything the template writes for the turn
after the generation prompt, end-of-turn token included (with ChatML ``content<|im_end|>\\n``). The mask is
positional, never derived from token values, so EOS stays in the labels even when ``pad_id == eos_id``.
``mask="all"`` trains every assistant turn, ``"last"`` only the last one.

The mask is only right when ``P_i`` is a token prefix of ``F_i`` and ``F_i`` a token prefix of the full
conversation; ``render`` raises :class:`RenderError` otherwise, and :meth:`Renderer.check` also checks that
each trained span holds the assistant's content, reasoning and tool calls, and that the whole rendering
holds every message's content and tool calls and every declared tool (so a template cannot silently drop
tool use). The prefix checks look only at the turns the mask trains: with ``mask="last"`` earlier turns are context, rendered as inference will render them,
so a template that rewrites history (Qwen3's drops earlier reasoning) still has train/inference parity.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxrl_llm.errors import UserError

from .templates import TEMPLATES, RenderError, get_template
from .tokenizer import Tokenizer

MASK_MODES = ("all", "last")
_CONTEXT_TOKENS = 8  # tokens of shared prefix shown before a difference
_SHOWN_CHARS = 160
# Why a prefix check failed, by (which check, whether the texts still agree).
_PREFIX_PROBLEMS = {
    ("prompt", False): "the generation prompt is not a prefix of the turn it opens (the template renders "
    "the earlier messages, or the turn's opening, differently when it generates)",
    ("prompt", True): "the generation prompt's text opens the turn, but its tokens are not a prefix of the "
    "turn's: the text at its end tokenizes differently once the reply follows (a trailing space, or "
    "markers that are not single tokens in this vocabulary)",
    ("history", False): "the template renders this turn differently once later messages follow (it "
    "rewrites history, e.g. drops earlier reasoning or adds text to the last turn only)",
    ("history", True): "this turn's text is unchanged once later messages follow, but its tokens are not: "
    "the turn boundary tokenizes differently (markers that are not single tokens in this vocabulary)",
}


class Rendered(NamedTuple):
    """A rendered conversation: ``ids: int32 [T]`` and ``loss_mask: bool [T]``.

    ``loss_mask[t]`` marks ``ids[t]`` as a training target (predicted from position ``t - 1``).
    """

    ids: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Turn:
    """Assistant message ``index`` (the ``number``-th assistant message) and its trained span ``[start, end)``."""

    index: int
    number: int
    start: int
    end: int
    prompt_text: str
    text: str

    @property
    def where(self) -> str:
        return _where(self.number, self.index)


def tool_call_id(message_index: int, call_index: int) -> str:
    """The id of tool call ``call_index`` of ``messages[message_index]``: 9 alphanumeric characters, the
    form Mistral's templates require (``call`` + 3 + 2 digits while they fit, else a hash of both)."""
    if message_index < 1000 and call_index < 100:
        return f"call{message_index:03d}{call_index:02d}"
    return hashlib.sha256(f"{message_index}:{call_index}".encode()).hexdigest()[:9]


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Canonical messages in the form HF chat templates read.

    A tool call ``{"name", "arguments": dict}`` becomes ``{"id", "type": "function", "function": {"name",
    "arguments"}}`` (what Qwen2.5, Qwen3, Llama 3.1 and Mistral templates read), ``reasoning`` becomes
    ``reasoning_content`` (what Qwen3's reads); ``role``, ``content`` and a tool result's ``name`` pass as
    they are. Canonical records carry no call ids, and some templates (Mistral's) require them: each call
    gets ``tool_call_id(message index, call index)``, and the tool results that follow an assistant
    message get its calls' ids as ``tool_call_id``, in order. Templates that ignore ids render the same.
    """
    out = []
    pending: list[str] = []  # ids of the latest assistant message's calls not yet answered
    for i, message in enumerate(messages):
        msg: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
        if message["role"] == "assistant":
            pending = []
        if message.get("tool_calls"):
            msg["tool_calls"] = [
                {
                    "id": tool_call_id(i, j),
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for j, c in enumerate(message["tool_calls"])
            ]
            pending = [c["id"] for c in msg["tool_calls"]]
        if message["role"] == "tool" and pending:
            msg["tool_call_id"] = pending.pop(0)
        if message.get("reasoning") is not None:
            msg["reasoning_content"] = message["reasoning"]
        if message.get("name") is not None:
            msg["name"] = message["name"]
        out.append(msg)
    return out


def template_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tool schemas as HF templates expect them: ``{"type": "function", "function": schema}``.

    A record's schemas may be bare (``{"name", "description", "parameters"}``, LLaMA-Factory's form) or
    already wrapped; both come out wrapped.
    """
    if not tools:
        return None
    out = []
    for tool in tools:
        if "name" not in tool and isinstance(tool.get("function"), Mapping):
            out.append({"type": "function", **tool})
        else:
            out.append({"type": "function", "function": dict(tool)})
    return out


class Renderer:
    """Renders chat messages with one tokenizer and one chat template.

    Args:
      tokenizer: from ``load_tokenizer``.
      template: ``None`` for the tokenizer's own chat template, else a built-in name (``TEMPLATES``).
      mask: ``"all"`` trains every assistant turn, ``"last"`` only the last.

    Attributes:
      template_name: ``"tokenizer"`` or the built-in's name.
      template_sha256: sha256 of the template text; with the name, what a run records to reproduce prompts.
      template_text: the Jinja text (for a tokenizer with several named templates, its default one).

    Raises:
      RenderError: an unknown template name, an unknown mask mode, or no template at all.
    """

    def __init__(self, tokenizer: Tokenizer, template: str | None = None, *, mask: str = "all"):
        if not isinstance(tokenizer, Tokenizer):
            raise RenderError(
                f"tokenizer: expected a Tokenizer, got a {type(tokenizer).__name__} ({_short(str(tokenizer))}); "
                "load one first: Renderer(load_tokenizer(path), ...)"
            )
        if mask not in MASK_MODES:
            raise RenderError(f"mask={mask!r}: expected one of {', '.join(repr(m) for m in MASK_MODES)}")
        self.tokenizer, self.mask = tokenizer, mask
        if template is None:
            if tokenizer.chat_template is None:
                names = ", ".join(repr(n) for n in TEMPLATES)
                raise RenderError(
                    f"tokenizer {tokenizer.name_or_path} has no chat template: pick a built-in one of "
                    f"{names} (config render.template, --template NAME)"
                )
            self._source: str | None = None
            self.template_name = "tokenizer"
            self._phrase = "the tokenizer's own chat template"
            self.template_sha256 = tokenizer.template_sha256
            self.template_text = tokenizer.chat_template
        else:
            builtin = get_template(template)
            self._source = builtin.source
            self.template_name, self.template_sha256 = builtin.name, builtin.sha256
            self._phrase = f"the built-in {builtin.name} chat template"
            self.template_text = builtin.source

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Tokenizer) -> Renderer:
        """From a validated config's ``render`` section (``render.template`` empty = the tokenizer's own)."""
        return cls(tokenizer, cfg.render.template or None, mask=cfg.render.mask)

    def identity(self) -> dict[str, Any]:
        """What a run records about its rendering: template name and sha256, tokenizer, mask mode."""
        return {
            "template": self.template_name,
            "template_sha256": self.template_sha256,
            "tokenizer": self.tokenizer.name_or_path,
            "mask": self.mask,
        }

    def __repr__(self) -> str:
        return (
            f"Renderer(template={self.template_name!r}, mask={self.mask!r}, "
            f"tokenizer={self.tokenizer.name_or_path!r})"
        )

    # ------------------------------------------------------------------------------------ text and ids

    def render_text(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = False,
    ) -> str:
        """The template's text for canonical ``messages`` (and the record's ``tools`` schemas)."""
        _check_messages(messages)
        if not messages:
            raise RenderError("nothing to render: the conversation has no messages")
        try:
            return self.tokenizer.apply_chat_template(
                template_messages(messages),
                tools=template_tools(tools),
                add_generation_prompt=add_generation_prompt,
                chat_template=self._source,
            )
        except UserError:
            raise
        except Exception as err:  # the template is user code: whatever it raises is about this input
            from jinja2 import TemplateError

            reason = str(err) if isinstance(err, TemplateError) else f"{type(err).__name__}: {err}"
            raise RenderError(f"{self._phrase} cannot render this: {reason}") from err

    def encode(self, text: str) -> np.ndarray:
        """``int32 [T]`` ids of rendered text; no special tokens are added (the template writes them)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)

    def render_ids(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> np.ndarray:
        """``int32 [T]`` ids of the whole conversation, without a mask (one render; for length checks)."""
        return self.encode(self.render_text(messages, tools))

    def render_prompt(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> np.ndarray:
        """``int32 [T]`` ids of ``messages`` plus the generation prompt: what rollout and serving feed."""
        return self.encode(self.render_text(messages, tools, add_generation_prompt=True))

    def render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> Rendered:
        """``Rendered(ids: int32 [T], loss_mask: bool [T])`` for training (see the module docstring).

        Raises:
          RenderError: the template raises, or a trained turn's prompt is not a token prefix of it.
        """
        rendered, _ = self._render(messages, tools)
        return rendered

    def check(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> Rendered:
        """The parity check: ``render`` (every trained turn's prompt is a token prefix of it, and it a prefix
        of the whole conversation) plus, for every trained turn, that its span holds the assistant's content,
        reasoning and tool-call names, and that the whole rendering holds every message's content and
        tool-call names (tool results and untrained turns included) and every declared tool's name: a
        template that silently drops tool use fails here. Returns the rendering.

        Raises:
          RenderError: naming the turn and, for a prefix failure, the first differing token position with
            both token ids and their text.
        """
        rendered, turns = self._render(messages, tools)
        for turn in turns:
            self._check_span(messages[turn.index], turn)
        self._check_whole(messages, tools)
        return rendered

    # ------------------------------------------------------------------------------------ internals

    def _render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> tuple[Rendered, list[_Turn]]:
        full_text = self.render_text(messages, tools)
        full = self.encode(full_text)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = list(enumerate(assistant))
        if self.mask == "last":
            trained = trained[-1:]
        mask = np.zeros(full.shape, dtype=np.bool_)
        turns = [self._turn(messages, tools, index, number, (full_text, full)) for number, index in trained]
        for turn in turns:
            mask[turn.start : turn.end] = True
        return Rendered(full, mask), turns

    def _turn(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        index: int,
        number: int,
        full: tuple[str, np.ndarray],
    ) -> _Turn:
        where = _where(number, index)
        if index == 0:
            raise RenderError(f"{where}: opens the conversation, so no prompt comes before it to train from")
        prompt_text = self.render_text(messages[:index], tools, add_generation_prompt=True)
        text = self.render_text(messages[: index + 1], tools)
        prompt, upto = self.encode(prompt_text), self.encode(text)
        self._require_prefix(
            where, "prompt", ("the prompt", prompt_text, prompt), (f"messages[:{index + 1}]", text, upto)
        )
        if index + 1 < len(messages):
            self._require_prefix(
                where, "history", (f"messages[:{index + 1}]", text, upto), ("the whole conversation", *full)
            )
        return _Turn(index, number, len(prompt), len(upto), prompt_text, text)

    def _require_prefix(
        self, where: str, kind: str, a: tuple[str, str, np.ndarray], b: tuple[str, str, np.ndarray]
    ) -> None:
        (a_name, a_text, a_ids), (b_name, b_text, b_ids) = a, b
        pos = first_difference(a_ids, b_ids)
        if pos is None:
            return
        # Telling a template that writes different text from text that tokenizes differently at a boundary
        # points at the fix: the template, or the tokenizer (markers that are not single tokens).
        problem = _PREFIX_PROBLEMS[kind, b_text.startswith(a_text)]
        context = self.tokenizer.decode(a_ids[max(0, pos - _CONTEXT_TOKENS) : pos])
        raise RenderError(
            f"{where}: {problem}, so the ids trained on are not the ids the model sees at inference; "
            f"first difference at token {pos} (after {_short(context)}): {a_name} has "
            f"{self._token(a_ids, pos)}, {b_name} has {self._token(b_ids, pos)}"
        )

    def _token(self, ids: np.ndarray, pos: int) -> str:
        if pos >= len(ids):
            return "nothing (it ends there)"
        return f"id {int(ids[pos])} {self.tokenizer.decode([int(ids[pos])])!r}"

    def _check_span(self, message: Mapping[str, Any], turn: _Turn) -> None:
        if turn.end == turn.start:
            raise RenderError(f"{turn.where}: the template renders no tokens for it")
        # The texts agree with the ids here (the prefix checks passed); text keeps the content exact where
        # decoding ids may not (normalisers, stripped spaces).
        span = turn.text[len(turn.prompt_text) :] if turn.text.startswith(turn.prompt_text) else turn.text
        for what, piece in _expected_pieces(message, reasoning=True):
            if piece not in span:
                raise RenderError(
                    f"{turn.where}: {self._phrase} leaves the assistant's {what} "
                    f"{_short(piece)} out of the tokens trained on, {_short(span)}"
                )

    def _check_whole(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> None:
        """Every message's content and tool-call names, and every declared tool's name, are in the text.

        Only what survives any template is required: content stripped (templates trim it), and no
        reasoning outside the trained turns (templates may drop earlier reasoning, as Qwen3's does).
        """
        text = self.render_text(messages, tools)
        for i, message in enumerate(messages):
            for what, piece in _expected_pieces(message, reasoning=False):
                if piece not in text:
                    raise RenderError(
                        f"messages[{i}] ({message['role']}): {self._phrase} leaves its {what} "
                        f"{_short(piece)} out of the rendered conversation (a template without support "
                        "for this role or for tool use drops it silently; pick one that renders it)"
                    )
        for tool in template_tools(tools) or ():
            name = (tool.get("function") or {}).get("name")
            if name and name not in text:
                raise RenderError(
                    f"tools: {self._phrase} leaves the declared tool {name!r} out of the rendered "
                    "conversation (it does not render the record's tools schemas; pick one that does)"
                )


def _check_messages(messages: Any) -> None:
    if isinstance(messages, Mapping):
        hint = (
            "; for a record, pass record['messages'] and record.get('tools')"
            if "messages" in messages
            else ""
        )
        raise RenderError(f"messages: expected a list of messages, got a {type(messages).__name__}{hint}")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise RenderError(f"messages: expected a list of messages, got a {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise RenderError(
                f"messages[{i}]: expected a message {{'role', 'content', ...}}, got {_short(repr(message))}"
            )


def _expected_pieces(message: Mapping[str, Any], *, reasoning: bool) -> list[tuple[str, str]]:
    """(what, text) a rendering must contain for ``message``: its stripped content (templates trim it),
    optionally its reasoning, and its tool-call names; empty pieces are left out."""
    pieces = [("content", (message.get("content") or "").strip())]
    if reasoning:
        pieces.append(("reasoning", (message.get("reasoning") or "").strip()))
    pieces += [("tool call", call["name"]) for call in message.get("tool_calls") or ()]
    return [(what, piece) for what, piece in pieces if piece]


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first position at which ``a`` stops being a prefix of ``b``; None when it is one."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    if differ.size:
        return int(differ[0])
    return None if len(a) <= len(b) else n


def _where(number: int, index: int) -> str:
    return f"assistant turn {number} (messages[{index}])"


def _short(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= _SHOWN_CHARS else shown[: _SHOWN_CHARS - 4] + "...'"
