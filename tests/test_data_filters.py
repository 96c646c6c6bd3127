"""Quality filters: each reason, the role-order table, dedup normalisation and the config switches."""

from __future__ import annotations

import json

import pytest

from jaxrl_llm.config import apply_overrides, base_config
from jaxrl_llm.data.filters import (
    FilterConfig,
    Filters,
    bad_tool_call,
    dedup_key,
    empty_turn,
    role_order,
    too_many_turns,
    turns,
)

S, U, T = (
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "tool", "content": "t"},
)
A = {"role": "assistant", "content": "a"}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}


def conv(*messages, **extra):
    return {"messages": list(messages), **extra}


def test_empty_turn():
    assert empty_turn(conv(U, A)) is None
    assert empty_turn(conv(U, {"role": "assistant", "content": " \n\t"})) == "empty_turn"
    assert empty_turn(conv({"role": "system", "content": ""}, U, A)) == "empty_turn"
    assert empty_turn(conv(U, CALL, T, A)) is None  # a call-only assistant turn is not empty
    assert empty_turn({"text": "  "}) == "empty_turn" and empty_turn({"text": "x"}) is None
    pref = {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": ""}]}
    assert empty_turn(pref) == "empty_turn"


def test_bad_tool_call():
    assert bad_tool_call(conv(U, CALL, T, A)) is None
    broken = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{oops"}]}
    assert bad_tool_call(conv(U, broken)) == "bad_tool_call"
    # With tools declared, a call must name one of them (top-level name or function.name).
    assert bad_tool_call(conv(U, CALL, tools=[{"name": "f"}])) is None
    assert bad_tool_call(conv(U, CALL, tools=[{"type": "function", "function": {"name": "f"}}])) is None
    assert bad_tool_call(conv(U, CALL, tools=[{"name": "g"}])) == "bad_tool_call"
    unpaired = {"prompt": [U], "completion": [CALL], "label": True, "tools": [{"name": "g"}]}
    assert bad_tool_call(unpaired) == "bad_tool_call"


@pytest.mark.parametrize(
    "messages, ok",
    [
        ((U, A), True),
        ((S, U, A, U, A), True),
        ((S, U, CALL, T, A), True),
        ((U, CALL, T, T, A), True),  # parallel calls, one result each
        ((U, CALL), True),  # ends on the call: nothing after it to be wrong
        ((U,), True),  # an RL prompt
        ((A, U), False),  # starts with the assistant
        ((S, A), False),
        ((T, A), False),
        ((U, S, A), False),  # system not first
        ((S, S, U, A), False),
        ((U, U, A), False),  # consecutive user turns
        ((U, A, A), False),
        ((U, A, T), False),  # tool result without a call
        ((U, CALL, U), False),  # call without a result
        ((U, CALL, T, U), False),  # the assistant must answer the tool result
    ],
)
def test_role_order_table(messages, ok):
    assert role_order(conv(*messages)) == (None if ok else "role_order")


def test_role_order_checks_prompt_plus_each_side():
    assert role_order({"prompt": [U], "chosen": [A], "rejected": [A]}) is None
    assert role_order({"prompt": [U], "chosen": [A], "rejected": [U, A]}) == "role_order"
    assert role_order({"prompt": [S, U], "completion": [A], "label": True}) is None
    assert role_order({"prompt": [A]}) == "role_order"


def test_too_many_turns_counts_every_message_of_the_longest_conversation():
    assert turns(conv(S, U, CALL, T, A)) == 5
    assert turns({"prompt": [U], "chosen": [A], "rejected": [A, U, A]}) == 4
    assert turns({"text": "x"}) == 0
    assert too_many_turns(conv(S, U, A), 3) is None and too_many_turns(conv(S, U, A), 2) == "too_many_turns"


def test_dedup_key_collapses_whitespace_and_keeps_case():
    a = conv(U, {"role": "assistant", "content": "Hello   there\n"})
    assert dedup_key(a) == dedup_key(conv(U, {"role": "assistant", "content": " Hello\tthere"}))
    assert dedup_key(a) != dedup_key(conv(U, {"role": "assistant", "content": "hello there"}))
    assert dedup_key({"text": "a  b"}) == dedup_key({"text": "a b"})
    assert dedup_key(conv(U, A)) != dedup_key(conv(U, A, tools=[{"name": "f"}]))
    yes = {"prompt": [U], "completion": [A], "label": True}
    assert dedup_key(yes) != dedup_key({**yes, "label": False})


def test_filters_apply_in_order_and_dedup_remembers_only_kept_records():
    f = Filters(FilterConfig(max_turns=2))
    empty = conv(U, {"role": "assistant", "content": ""})
    assert f(empty) == "empty_turn"
    assert f(conv(A, U)) == "role_order"
    assert f(conv(S, U, A)) == "too_many_turns"
    assert f(conv(U, A)) is None
    assert f(conv(U, A)) == "duplicate"
    # The first copy was dropped for another reason, so the next copy is kept.
    assert f(conv(A, {"role": "user", "content": ""})) == "empty_turn"


def test_switching_filters_off():
    off = Filters(
        FilterConfig(drop_empty_turns=False, dedup=False, check_tool_calls=False, check_role_order=False)
    )
    broken = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "x"}]}
    for record in (
        conv(U, {"role": "assistant", "content": ""}),
        conv(A, A),
        conv(U, broken),
        conv(U, A),
        conv(U, A),
    ):
        assert off(record) is None


def test_filter_config_from_the_config_data_section():
    cfg = apply_overrides(base_config(), {"data.max_turns": 8, "data.dedup": False})
    config = FilterConfig.from_config(cfg)
    assert config == FilterConfig(dedup=False, max_turns=8)
    assert FilterConfig.from_config(base_config()) == FilterConfig()
    assert config.as_dict()["max_turns"] == 8


def test_config_data_section_cross_checks(tmp_path):
    from jaxrl_llm.config import ConfigError, validate

    def problems(**overrides):
        with pytest.raises(ConfigError) as info:
            validate(apply_overrides(base_config(), overrides))
        return str(info.value)

    assert "set both" in problems(**{"data.name": "alpaca_en_demo"})
    assert "set both" in problems(**{"data.dataset_info": str(tmp_path / "dataset_info.json")})
    missing = str(tmp_path / "dataset_info.json")
    assert "no such file" in problems(**{"data.dataset_info": missing, "data.name": "x"})
    (tmp_path / "dataset_info.json").write_text("{}")
    validate(apply_overrides(base_config(), {"data.dataset_info": missing, "data.name": "x"}))
    assert "data.max_turns=0: must be None or int >= 1" in problems(**{"data.max_turns": 0})
    assert "data.on_error='ignore'" in problems(**{"data.on_error": "ignore"})
    assert "data.kind='chat'" in problems(**{"data.kind": "chat"})


def test_a_renderer_renders_every_record_at_load_time(tmp_path):
    """Without token bounds, a record the template cannot render is still rejected at load (counted and
    in the rejects file), not left to fail later in the Grain pipeline."""
    from jaxrl_llm.data.load import load_dataset
    from jaxrl_llm.render import Renderer, load_tokenizer
    from tests.fixtures_tokenizers import make_hf_tokenizer_dir
    from tests.test_data_load import JsonlSource, chat, write_jsonl
    from tests.test_render import TOOL_CALLING, TOOLS

    chatml = Renderer(load_tokenizer(make_hf_tokenizer_dir(tmp_path / "tok")), "chatml")  # no tools
    src = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), {"messages": TOOL_CALLING, "tools": TOOLS}])
    rejects = tmp_path / "rejects.jsonl"
    loaded = load_dataset(JsonlSource(str(src)), on_error="skip", rejects_path=rejects, renderer=chatml)
    assert (loaded.counts.accepted, loaded.counts.rejected) == (1, 1)
    assert "cannot render" in loaded.errors[0] and "does not render tools" in loaded.errors[0]
    assert json.loads(rejects.read_text())["location"] == f"{src}:2"
    assert loaded.manifest["render"] == chatml.identity()
