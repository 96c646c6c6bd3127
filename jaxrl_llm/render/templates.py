"""Built-in chat templates, selected by name (``Renderer(tokenizer, "qwen")``, config ``render.template``).

Each is Jinja text rendered exactly like a tokenizer's own template (``Tokenizer.apply_chat_template`` with
``chat_template=``): the same sandbox, filters and special-token variables (``bos_token``, ``eos_token``).
They see messages in the form HF templates read (``jaxrl_llm.render.render.template_messages``): tool
calls as ``{"type": "function", "function": {"name", "arguments"}}`` and reasoning as
``reasoning_content``.

Shared conventions, where a built-in departs from the model family's own template:

- Reasoning is rendered inside the assistant turn as ``<think>\\n{reasoning}\\n</think>\\n\\n`` before
  the content, in every turn. History is never rewritten (Qwen3's own template drops earlier reasoning),
  so the prompt of each turn is a prefix of the conversation and every turn can be trained on.
- Only ``qwen`` renders tools: the others raise on ``tools``, tool calls and tool results rather than
  silently train on a conversation with its calls left out.
- No default system prompt is invented (Qwen2.5's own template adds "You are Qwen, ...").
"""

from __future__ import annotations

import dataclasses
import hashlib

from jaxrl_llm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Template:
    """A named chat template: ``source`` is its Jinja text; ``tools`` says whether it renders tool use."""

    name: str
    source: str
    doc: str
    tools: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()


class RenderError(UserError):
    """Messages that cannot be rendered: an unknown template, a template that raises, a failed parity check.

    Defined here, the bottom of the render layer, and exported by ``jaxrl_llm.render``.
    """


class UnknownTemplateError(RenderError):
    """A template name that is not in ``TEMPLATES``."""


# Reasoning before the content of an assistant turn, kept in every turn (see the module docstring).
_REASONING = r"""
    {%- if message.role == 'assistant' and message.reasoning_content %}
        {{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}
    {%- endif %}"""


def _no_tools(name: str) -> str:
    why = f"the {name} template does not render tools; use the qwen template or the tokenizer's own"
    return (
        '\n{%- if tools %}{{- raise_exception("' + why + ' (the record declares tools)") }}{%- endif %}'
        "\n{%- for message in messages %}"
        "\n    {%- if message.tool_calls or message.role == 'tool' %}"
        '\n        {{- raise_exception("'
        + why
        + ' (messages[" ~ loop.index0 ~ "] is a tool call or result)") }}'
        "\n    {%- endif %}"
        "\n{%- endfor %}"
    )


CHATML = (
    _no_tools("chatml")
    + r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\n' }}"""
    + _REASONING
    + r"""
    {{- message.content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
)

LLAMA3 = (
    _no_tools("llama3")
    + r"""
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' }}"""
    + _REASONING
    + r"""
    {{- message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""
)

GEMMA = (
    _no_tools("gemma")
    + r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set first_user_prefix = messages[0].content + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == 'system' %}
        {{- raise_exception('the gemma template takes a system message only as the first message') }}
    {%- endif %}
    {{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\n' }}
    {{- first_user_prefix if loop.first else '' }}"""
    + _REASONING
    + r"""
    {{- message.content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}"""
)

QWEN = (
    r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}"""
    + _REASONING
    + r"""
        {{- message.content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {%- if message.content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
)

PLAIN = (
    _no_tools("plain")
    + r"""
{%- if not eos_token %}
    {{- raise_exception('the plain template needs a tokenizer with an EOS token: it ends every assistant turn with one') }}
{%- endif %}
{%- if bos_token %}
    {{- bos_token }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {{- message.content + '\n\n' }}
    {%- elif message.role == 'user' %}
        {{- 'User: ' + message.content + '\n' }}
    {%- else %}
        {{- 'Assistant: ' }}"""
    + _REASONING
    + r"""
        {{- message.content + eos_token + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:' }}
{%- endif %}"""
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "chatml",
            CHATML,
            "ChatML: <|im_start|>{role}\\n{content}<|im_end|>\\n per message; no tools.",
        ),
        Template(
            "llama3",
            LLAMA3,
            "Llama 3: {bos}<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>; no tools.",
        ),
        Template(
            "qwen",
            QWEN,
            "Qwen2.5 ChatML with tools: schemas in the system prompt inside <tools>, calls as "
            "<tool_call>{json}</tool_call>, results as user turns inside <tool_response>.",
            tools=True,
        ),
        Template(
            "gemma",
            GEMMA,
            "Gemma: {bos}<start_of_turn>user|model\\n{content|trim}<end_of_turn>\\n; the system message is "
            "folded into the first user turn; no tools.",
        ),
        Template(
            "plain",
            PLAIN,
            "Base models, no special markup: {bos}{system}\\n\\n, 'User: {content}\\n', "
            "'Assistant: {content}{eos}\\n'; the generation prompt is 'Assistant:'; no tools.",
        ),
    )
}


def get_template(name: str) -> Template:
    """The built-in template ``name``; an unknown name lists the valid ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        valid = ", ".join(repr(n) for n in TEMPLATES)
        raise UnknownTemplateError(
            f"unknown chat template {name!r}: the built-ins are {valid} (or None for the tokenizer's own)"
        ) from None
