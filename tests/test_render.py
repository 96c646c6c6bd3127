"""Renderer: built-in templates, ids and loss masks, generation prompts, and the parity check.

All with tokenizers trained in-process (``tests/fixtures_tokenizers.py``); the real Qwen tokenizers are in
``test_render_real.py``, the data layer and CLI in ``test_render_data.py``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from jaxrl_llm.errors import UserError
from jaxrl_llm.render import (
    TEMPLATES,
    Renderer,
    RenderError,
    SFTEncoder,
    UnknownTemplateError,
    load_tokenizer,
    template_messages,
    template_tools,
    token_lengths,
)
from jaxrl_llm.render.render import first_difference, tool_call_id
from tests.fixtures_tokenizers import (
    BOS_EOS_TEMPLATE,
    CHATML_TEMPLATE,
    EOS,
    make_hf_tokenizer_dir,
    make_sentencepiece_model,
)

SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]
WITH_REASONING = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning": "two plus two"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6.", "reasoning": "three plus three"},
]
TOOLS = [{"name": "add", "description": "Add two numbers", "parameters": {"type": "object"}}]
TOOL_CALLING = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 2}}]},
    {"role": "tool", "content": "4", "name": "add"},
    {"role": "assistant", "content": "It is 4."},
]

EXPECTED_TWO_TURNS = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\n6.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n6.<|eot_id|>",
    "gemma": "<|begin_of_text|><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n4.<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
    "<start_of_turn>model\n6.<end_of_turn>\n",
    "plain": "<|begin_of_text|>Be brief.\n\nUser: What is 2+2?\nAssistant: 4.<|im_end|>\n"
    "User: And 3+3?\nAssistant: 6.<|im_end|>\n",
}
EXPECTED_TWO_TURNS["qwen"] = EXPECTED_TWO_TURNS["chatml"]
GENERATION_PROMPTS = {
    "chatml": "<|im_start|>assistant\n",
    "qwen": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>model\n",
    "plain": "Assistant:",
}

EXPECTED_QWEN_TOOLS = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": '
    '{"type": "object"}}}\n</tools>\n\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """ChatML template, no pad token: pad_id falls back to eos_id."""
    return load_tokenizer(make_hf_tokenizer_dir(tmp_path_factory.mktemp("tok"), pad=False))


def _with_template(tmp_path: Path, template: str | None):
    return load_tokenizer(make_hf_tokenizer_dir(tmp_path, chat_template=template, name="custom"))


def _assistant_indices(messages):
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


# ------------------------------------------------------------------------------------- built-in templates


@pytest.mark.parametrize("name", sorted(EXPECTED_TWO_TURNS))
def test_builtin_renders_exact_text(tok, name):
    r = Renderer(tok, name)
    assert r.render_text(TWO_TURNS) == EXPECTED_TWO_TURNS[name]
    prompt = r.render_text(TWO_TURNS[:4], add_generation_prompt=True)
    history = EXPECTED_TWO_TURNS[name][: EXPECTED_TWO_TURNS[name].index("And 3+3?")]
    assert prompt.startswith(history) and prompt.endswith(GENERATION_PROMPTS[name])


def test_qwen_builtin_renders_tool_calls_exactly(tok):
    assert Renderer(tok, "qwen").render_text(TOOL_CALLING, TOOLS) == EXPECTED_QWEN_TOOLS


def test_qwen_builtin_tool_call_layout_with_content_and_several_calls(tok):
    calls = [{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}]
    text = Renderer(tok, "qwen").render_text(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "Let me add.", "tool_calls": calls},
        ]
    )
    assert text.endswith(
        '<|im_start|>assistant\nLet me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
        '\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call><|im_end|>\n'
    )


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "plain"])
def test_templates_without_tools_refuse_tool_conversations(tok, name):
    r = Renderer(tok, name)
    with pytest.raises(RenderError, match=f"the {name} template does not render tools.*declares tools"):
        r.render(TOOL_CALLING, TOOLS)
    with pytest.raises(RenderError, match=r"messages\[2\] is a tool call or result"):
        r.render(TOOL_CALLING)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_builtins_keep_reasoning_in_every_turn(tok, name):
    r = Renderer(tok, name)
    rendered = r.check(WITH_REASONING)
    trained = tok.decode(rendered.ids[rendered.loss_mask])
    assert "<think>\ntwo plus two\n</think>\n\n4." in trained
    assert "<think>\nthree plus three\n</think>\n\n6." in trained


def test_gemma_takes_a_system_message_only_first(tok):
    with pytest.raises(RenderError, match="system message only as the first"):
        Renderer(tok, "gemma").render_text([{"role": "user", "content": "q"}, SYSTEM])


def test_unknown_template_lists_the_builtins(tok):
    with pytest.raises(UnknownTemplateError, match="'chatml', 'llama3', 'qwen', 'gemma', 'plain'") as info:
        Renderer(tok, "chatm")
    assert isinstance(info.value, RenderError) and isinstance(info.value, UserError)


def test_tokenizer_without_template_must_pick_a_builtin(tmp_path):
    bare = _with_template(tmp_path, None)
    with pytest.raises(RenderError, match="has no chat template: pick a built-in one of 'chatml'"):
        Renderer(bare)
    assert Renderer(bare, "plain").render_text(TWO_TURNS[1:3]).startswith("<|begin_of_text|>User: ")


def test_unknown_mask(tok):
    with pytest.raises(RenderError, match="mask='first': expected one of 'all', 'last'"):
        Renderer(tok, mask="first")


def test_template_identity(tok):
    own, qwen = Renderer(tok), Renderer(tok, "qwen", mask="last")
    assert own.template_name == "tokenizer" and own.template_sha256 == tok.template_sha256
    assert own.template_text == CHATML_TEMPLATE
    assert qwen.identity() == {
        "template": "qwen",
        "template_sha256": hashlib.sha256(TEMPLATES["qwen"].source.encode()).hexdigest(),
        "tokenizer": tok.name_or_path,
        "mask": "last",
    }
    assert len({t.sha256 for t in TEMPLATES.values()}) == len(TEMPLATES)


# ------------------------------------------------------------------------------------- ids and masks


def test_mask_covers_every_assistant_turn_with_its_eos_when_pad_is_eos(tok):
    assert tok.pad_id == tok.eos_id  # the fixture has no pad token
    ids, mask = Renderer(tok).render(TWO_TURNS)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
    np.testing.assert_array_equal(ids, tok.encode(EXPECTED_TWO_TURNS["chatml"]))
    assert tok.decode(ids[mask]) == "4.<|im_end|>\n6.<|im_end|>\n"
    # Exactly two trained spans, each ending its turn with EOS (and the template's newline after it).
    starts = np.flatnonzero(np.diff(mask.astype(np.int8)) == 1) + 1
    ends = np.flatnonzero(np.diff(mask.astype(np.int8)) == -1) + 1
    assert len(starts) == 2 and mask[-1] and len(ends) == 1
    eos = tok.token_to_id(EOS)
    assert [bool(mask[i]) for i in np.flatnonzero(ids == eos)] == [False, False, True, False, True]


def test_mask_last_trains_only_the_last_turn(tok):
    ids, mask = Renderer(tok, mask="last").render(TWO_TURNS)
    assert tok.decode(ids[mask]) == "6.<|im_end|>\n"
    np.testing.assert_array_equal(ids, Renderer(tok).render(TWO_TURNS).ids)


def test_conversation_without_assistant_has_an_empty_mask(tok):
    ids, mask = Renderer(tok).render(TWO_TURNS[:2])
    assert len(ids) > 0 and not mask.any()


@pytest.mark.parametrize("template", [None, *sorted(TEMPLATES)])
@pytest.mark.parametrize("messages", [TWO_TURNS, WITH_REASONING], ids=["plain", "reasoning"])
def test_render_prompt_is_a_prefix_of_render_for_every_assistant_turn(tmp_path, tok, template, messages):
    if template is None:  # the tokenizer's own template, with reasoning support as a built-in would
        tok = _with_template(tmp_path, TEMPLATES["qwen"].source)
    r = Renderer(tok, template)
    ids, mask = r.check(messages)
    for i in _assistant_indices(messages):
        prompt = r.render_prompt(messages[:i])
        np.testing.assert_array_equal(ids[: len(prompt)], prompt)
        turn_end = len(r.render_ids(messages[: i + 1]))
        assert mask[len(prompt) : turn_end].all() and not mask[len(prompt) - 1]


def test_token_ids_carry_no_added_bos(tmp_path, tok):
    # The tokenizer adds BOS when asked for special tokens; rendering never asks (templates write BOS).
    assert tok.encode("x", add_special_tokens=True)[0] == tok.bos_id
    ids = Renderer(tok).render_ids(TWO_TURNS)
    assert tok.bos_id not in ids.tolist()
    assert Renderer(tok, "llama3").render_ids(TWO_TURNS).tolist().count(tok.bos_id) == 1


def test_sentencepiece_tokenizer_maps_template_special_tokens_to_ids(tmp_path):
    sp = load_tokenizer(make_sentencepiece_model(tmp_path), chat_template=BOS_EOS_TEMPLATE)
    assert sp.encode("<s>hi</s>") == [sp.bos_id, *sp.sp.encode("hi"), sp.eos_id]
    convo = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "the answer"}]
    ids, mask = Renderer(sp).check(convo)
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id and mask[-1]


# ------------------------------------------------------------------------------------- parity check

# The generation prompt says "assistant:" while the turn itself opens with "assistant".
MISMATCHED_PROMPT = CHATML_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant:\\n' }}"
)
# Like Qwen3: reasoning is shown only in the last assistant turn.
DROPS_EARLIER_REASONING = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.reasoning_content and loop.last %}"
    "{{- '<think>' + message.reasoning_content + '</think>' }}"
    "{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _differing_token(r: Renderer, a: np.ndarray, b: np.ndarray) -> tuple[int, str, str]:
    pos = first_difference(a, b)
    assert pos is not None
    show = lambda ids: f"id {ids[pos]} {r.tokenizer.decode([ids[pos]])!r}"
    return pos, show(a), show(b)


def test_parity_catches_a_generation_prompt_unlike_the_turn(tmp_path):
    r = Renderer(_with_template(tmp_path, MISMATCHED_PROMPT))
    prompt, turn = r.render_prompt(TWO_TURNS[:2]), r.render_ids(TWO_TURNS[:3])
    pos, in_prompt, in_turn = _differing_token(r, prompt, turn)
    with pytest.raises(RenderError) as info:
        r.check(TWO_TURNS)
    message = str(info.value)
    assert message.startswith("assistant turn 0 (messages[2]): the generation prompt is not a prefix")
    assert f"first difference at token {pos} " in message
    assert f"the prompt has {in_prompt}, messages[:3] has {in_turn}" in message
    with pytest.raises(RenderError, match="generation prompt"):
        r.render(TWO_TURNS)  # the mask cannot be computed either


def test_parity_catches_a_template_that_drops_earlier_reasoning(tmp_path):
    r = Renderer(_with_template(tmp_path, DROPS_EARLIER_REASONING))
    upto, full = r.render_ids(WITH_REASONING[:2]), r.render_ids(WITH_REASONING)
    pos, in_turn, in_full = _differing_token(r, upto, full)
    with pytest.raises(RenderError) as info:
        r.check(WITH_REASONING)
    message = str(info.value)
    assert message.startswith("assistant turn 0 (messages[1]): the template renders this turn differently")
    assert "rewrites history" in message and f"first difference at token {pos} " in message
    assert f"messages[:2] has {in_turn}, the whole conversation has {in_full}" in message
    # Trained on the last turn only, the history is rendered as inference renders it: parity holds.
    ids, mask = Renderer(r.tokenizer, mask="last").check(WITH_REASONING)
    assert r.tokenizer.decode(ids[mask]) == "<think>three plus three</think>6.<|im_end|>\n"
    # Without reasoning nothing is rewritten.
    assert r.check(TWO_TURNS).loss_mask.any()


def test_parity_catches_a_generation_prompt_that_tokenizes_differently(tmp_path):
    # "[assistant] " ends in a space that BPE merges with the reply's first word (" t" + "he").
    r = Renderer(_with_template(tmp_path, BOS_EOS_TEMPLATE))
    convo = [
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "the answer is 42."},
    ]
    assert r.render_text(convo).startswith(r.render_text(convo[:1], add_generation_prompt=True))
    with pytest.raises(RenderError, match=r"text opens the turn, but its tokens are not .*has id \d+ ' '"):
        r.check(convo)


def test_check_catches_a_template_that_drops_tool_calls(tok):
    # The tokenizer's ChatML template has no tool branch: the call would silently vanish from training.
    convo = [*TOOL_CALLING[1:3]]
    convo[1] = {**convo[1], "content": "Calling it."}
    with pytest.raises(RenderError, match=r"messages\[1\]\): the tokenizer's own chat template leaves the "):
        Renderer(tok).check(convo)
    with pytest.raises(RenderError, match="tool call 'add'"):
        Renderer(tok).check(convo)
    Renderer(tok, "qwen").check(convo)


DROPS_TOOL_MESSAGES = (
    "{%- for m in messages %}{%- if m.role != 'tool' %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- for c in m.tool_calls or [] %}{{- c.function.name }}{%- endfor %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_check_catches_a_template_that_drops_tool_results_untrained_turns_or_tools(tmp_path, tok):
    drops = Renderer(_with_template(tmp_path, DROPS_TOOL_MESSAGES))
    convo = [*TOOL_CALLING[:3], {"role": "tool", "content": "sum=4", "name": "add"}, TOOL_CALLING[4]]
    drops.render(convo)  # prefixes agree: only the content check sees what is missing
    with pytest.raises(RenderError, match=r"messages\[3\] \(tool\): .* leaves its content 'sum=4' out"):
        drops.check(convo)
    # With mask="last" the tool call is context, not trained on: it must still be rendered.
    last = Renderer(tok, mask="last")
    with pytest.raises(RenderError, match=r"messages\[2\] \(assistant\): .* leaves its tool call 'add' out"):
        last.check(TOOL_CALLING)
    # Declared tools the template never renders.
    with pytest.raises(RenderError, match="tools: .* leaves the declared tool 'add' out"):
        Renderer(tok).check(TWO_TURNS, TOOLS)
    Renderer(tok, "qwen", mask="last").check(TOOL_CALLING, TOOLS)


def test_check_catches_a_template_that_drops_reasoning(tok):
    with pytest.raises(RenderError, match="leaves the assistant's reasoning 'two plus two' out"):
        Renderer(tok).check(WITH_REASONING)


def test_a_template_that_raises_is_a_render_error(tmp_path):
    raising = "{{- raise_exception('roles must alternate') }}"
    with pytest.raises(RenderError, match="the tokenizer's own chat template cannot render this: roles must"):
        Renderer(_with_template(tmp_path, raising)).render(TWO_TURNS)
    broken = "{{- messages[0].content + 1 }}"
    with pytest.raises(RenderError, match="cannot render this: TypeError"):
        Renderer(_with_template(tmp_path / "b", broken)).render(TWO_TURNS)


def test_an_assistant_message_cannot_open_the_conversation(tok):
    with pytest.raises(RenderError, match=r"messages\[0\]\): opens the conversation"):
        Renderer(tok).render(TWO_TURNS[2:])
    with pytest.raises(RenderError, match="no messages"):
        Renderer(tok).render([])


def test_wrong_argument_types_are_clear_errors(tok):
    with pytest.raises(
        RenderError, match=r"tokenizer: expected a Tokenizer, got a str .*load_tokenizer\(path\)"
    ):
        Renderer("Qwen/Qwen2.5-0.5B-Instruct")
    record = {"messages": TWO_TURNS}
    with pytest.raises(RenderError, match=r"got a dict; for a record, pass record\['messages'\]"):
        Renderer(tok).render(record)
    with pytest.raises(RenderError, match="expected a list of messages, got a str"):
        Renderer(tok).render_prompt("What is 2+2?")
    with pytest.raises(RenderError, match=r"messages\[1\]: expected a message"):
        Renderer(tok).render([TWO_TURNS[1], "4."])


def test_first_difference():
    a = np.array([1, 2, 3])
    assert first_difference(a, a) is None and first_difference(a[:2], a) is None
    assert first_difference(a, np.array([1, 5, 3])) == 1 and first_difference(a, a[:2]) == 2


# ------------------------------------------------------------------------------------- message form


def test_template_messages_and_tools_use_the_hf_form():
    messages = template_messages(
        [
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]},
            {"role": "tool", "content": "2", "name": "f"},
            {"role": "assistant", "content": "ok", "reasoning": "why"},
        ]
    )
    assert messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call00000", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
            ],
        },
        {"role": "tool", "content": "2", "name": "f", "tool_call_id": "call00000"},
        {"role": "assistant", "content": "ok", "reasoning_content": "why"},
    ]
    wrapped = {"type": "function", "function": {"name": "g"}}
    assert template_tools([{"name": "f"}, wrapped, {"function": {"name": "h"}}]) == [
        {"type": "function", "function": {"name": "f"}},
        wrapped,
        {"type": "function", "function": {"name": "h"}},
    ]
    assert template_tools(None) is None and template_tools([]) is None


def test_tool_calls_get_ids_and_their_results_the_matching_tool_call_id():
    call = {"name": "f", "arguments": {}}
    messages = template_messages(
        [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [call, {**call, "name": "g"}]},
            {"role": "tool", "content": "1", "name": "f"},
            {"role": "tool", "content": "2", "name": "g"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "3", "name": "f"},
            {"role": "assistant", "content": "done"},
            {"role": "tool", "content": "stray"},  # no call left to answer: no id
        ]
    )
    ids = [[c["id"] for c in m.get("tool_calls", [])] for m in messages]
    assert ids[1] == ["call00100", "call00101"] and ids[4] == ["call00400"]
    assert [m.get("tool_call_id") for m in messages if m["role"] == "tool"] == [
        "call00100",
        "call00101",
        "call00400",
        None,
    ]
    every = [c for row in ids for c in row]
    assert len(set(every)) == len(every)
    # Mistral's templates want 9 alphanumeric characters, however long the conversation.
    for i, j in ((0, 0), (999, 99), (1000, 0), (12, 345)):
        cid = tool_call_id(i, j)
        assert len(cid) == 9 and cid.isalnum() and cid == tool_call_id(i, j)
    assert tool_call_id(1000, 0) != tool_call_id(1000, 1)


def test_token_lengths_by_record_kind(tok):
    r = Renderer(tok)
    user, answer = TWO_TURNS[1], TWO_TURNS[2]
    short = {"role": "assistant", "content": "4"}
    assert token_lengths({"messages": TWO_TURNS}, r) == [len(r.render_ids(TWO_TURNS))]
    pref = token_lengths({"prompt": [user], "chosen": [answer], "rejected": [short]}, r)
    assert pref == [len(r.render_ids([user, answer])), len(r.render_ids([user, short]))]
    assert token_lengths({"prompt": [user], "completion": [answer], "label": True}, r) == [pref[0]]
    assert token_lengths({"prompt": [user]}, r) == [len(r.render_prompt([user]))]
    text = {"text": "Hello world"}
    assert token_lengths(text, r) == [len(SFTEncoder(r)(text)["ids"])]  # EOS counted, as trained on
    assert token_lengths(text, r) == [len(r.encode("Hello world")) + 1]


def test_render_errors_name_the_sequence_of_the_record(tmp_path):
    no_fours = (
        "{%- for m in messages %}{% if m.content == '4' %}{{ raise_exception('no fours') }}{% endif %}"
        "{%- endfor %}" + CHATML_TEMPLATE
    )
    r = Renderer(_with_template(tmp_path, no_fours))
    four = {"role": "assistant", "content": "4"}
    record = {"prompt": [TWO_TURNS[1]], "chosen": [TWO_TURNS[2]], "rejected": [four]}
    with pytest.raises(RenderError, match=r"^prompt \+ rejected: the tokenizer's own .* no fours"):
        token_lengths(record, r)
