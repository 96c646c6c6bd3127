"""The renderer on real tokenizers and chat templates: Qwen2.5-Instruct and Qwen3 (vendored, tokenizer only).

Qwen2.5's template renders tool calls and keeps history as it was, so every turn has train/inference
parity; Qwen3's drops reasoning from assistant turns before the last user query and adds a
``<think>`` block to the last turn only, so a multi-turn record fails the check when every turn is
trained (and passes when only the last is). See ``tests/data/tokenizers/*/PROVENANCE.md``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxrl_llm.render import Renderer, RenderError, check_parity_sample, load_tokenizer, parity_report
from tests.test_render import TOOL_CALLING, TOOLS, TWO_TURNS, WITH_REASONING

TOKENIZERS = Path(__file__).resolve().parent / "data" / "tokenizers"
QWEN25 = TOKENIZERS / "qwen2.5-instruct"
THINK, IM_END, TOOL_CALL = 151667, 151645, 151657

# An agent loop after the last user query, with reasoning in every assistant turn: Qwen3 keeps it all.
AGENTIC = [
    {"role": "user", "content": "What is 2+2?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning": "I should add.",
        "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 2}}],
    },
    {"role": "tool", "content": "4", "name": "add"},
    {"role": "assistant", "content": "It is 4.", "reasoning": "The tool said 4."},
]


@pytest.fixture(scope="module")
def qwen25():
    return load_tokenizer(QWEN25)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    # Qwen3 shares Qwen2.5's vocab.json and merges.txt (stored once, see qwen3/PROVENANCE.md).
    out = tmp_path_factory.mktemp("qwen3")
    shutil.copy(TOKENIZERS / "qwen3" / "tokenizer_config.json", out)
    for name in ("vocab.json", "merges.txt"):
        (out / name).symlink_to(QWEN25 / name)
    return load_tokenizer(out)


def test_vendored_tokenizers_are_the_real_ones(qwen25, qwen3):
    assert qwen25.eos_id == IM_END and qwen25.pad_id == 151643 and len(qwen25.hf) == 151665
    assert qwen3.token_to_id("<think>") == THINK and len(qwen3.hf) == 151669
    assert qwen25.encode("<tool_call>") == [TOOL_CALL]


@pytest.mark.parametrize("messages", [TWO_TURNS, TOOL_CALLING], ids=["two_turns", "tool_calling"])
def test_qwen_builtin_renders_what_qwen25_renders(qwen25, messages):
    # Identical whenever there is a system message (Qwen2.5's own adds a default one otherwise).
    tools = TOOLS if messages is TOOL_CALLING else None
    assert Renderer(qwen25, "qwen").render_text(messages, tools) == Renderer(qwen25).render_text(
        messages, tools
    )


@pytest.mark.parametrize("template", [None, "qwen"])
@pytest.mark.parametrize("messages", [TWO_TURNS, TOOL_CALLING], ids=["two_turns", "tool_calling"])
def test_qwen25_parity_holds_for_every_turn(qwen25, template, messages):
    tools = TOOLS if messages is TOOL_CALLING else None
    r = Renderer(qwen25, template)
    ids, mask = r.check(messages, tools)
    for i in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        prompt = r.render_prompt(messages[:i], tools)
        np.testing.assert_array_equal(ids[: len(prompt)], prompt)
        assert mask[len(prompt)] and not mask[len(prompt) - 1]
    trained = qwen25.decode(ids[mask])
    if messages is TOOL_CALLING:
        assert trained == (
            '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>\n'
            "It is 4.<|im_end|>\n"
        )
    else:
        assert trained == "4.<|im_end|>\n6.<|im_end|>\n"
    assert (ids[mask] == IM_END).sum() == 2


def test_qwen25_template_would_drop_reasoning(qwen25):
    with pytest.raises(
        RenderError, match=r"messages\[1\]\): .* leaves the assistant's reasoning 'two plus two'"
    ):
        Renderer(qwen25).check(WITH_REASONING)
    Renderer(qwen25, "qwen").check(WITH_REASONING)  # the built-in keeps it


def test_qwen3_passes_a_single_turn_with_reasoning(qwen3):
    ids, mask = Renderer(qwen3).check(WITH_REASONING[:2])
    assert qwen3.decode(ids[mask]) == "<think>\ntwo plus two\n</think>\n\n4.<|im_end|>\n"


@pytest.mark.parametrize("messages", [WITH_REASONING, TWO_TURNS[1:]], ids=["reasoning", "no_reasoning"])
def test_qwen3_fails_multi_turn_records_when_every_turn_is_trained(qwen3, messages):
    # Alone, turn 0 ends the conversation and gets a <think> block (its reasoning, or an empty one); once
    # a later user turn follows, Qwen3 renders it without: the history is rewritten.
    with pytest.raises(RenderError) as info:
        Renderer(qwen3).check(messages)
    message = str(info.value)
    assert message.startswith("assistant turn 0 (messages[1]): the template renders this turn differently")
    assert f"messages[:2] has id {THINK} '<think>', the whole conversation has id 19 '4'" in message


@pytest.mark.parametrize("messages", [WITH_REASONING, TWO_TURNS[1:]], ids=["reasoning", "no_reasoning"])
def test_qwen3_passes_when_only_the_last_turn_is_trained(qwen3, messages):
    r = Renderer(qwen3, mask="last")
    ids, mask = r.check(messages)
    prompt = r.render_prompt(messages[:-1])
    np.testing.assert_array_equal(ids[: len(prompt)], prompt)
    assert mask[len(prompt) :].all() and not mask[: len(prompt)].any()


def test_qwen3_passes_an_agent_loop_with_reasoning_in_every_turn(qwen3):
    ids, mask = Renderer(qwen3).check(AGENTIC, TOOLS)
    trained = qwen3.decode(ids[mask])
    assert trained.startswith("<think>\nI should add.\n</think>\n\n<tool_call>\n")
    assert trained.endswith("<think>\nThe tool said 4.\n</think>\n\nIt is 4.<|im_end|>\n")


def test_parity_sample_names_the_failing_record(qwen3):
    records = [{"messages": WITH_REASONING[:2]}, {"messages": WITH_REASONING}, {"messages": TWO_TURNS[1:3]}]
    locations = ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]
    with pytest.raises(RenderError) as info:
        check_parity_sample(records, Renderer(qwen3), n=10, seed=0, locations=locations)
    assert str(info.value).startswith(
        "data.jsonl:2: parity check failed with template tokenizer: messages: assistant turn 0 (messages[1])"
    )
    assert check_parity_sample(records, Renderer(qwen3, mask="last"), n=10, locations=locations) == 3
    report = parity_report(records, Renderer(qwen3), n=10)
    assert (report.checked, report.failed) == (3, 1) and report.errors[0].startswith("record 1: messages: ")
