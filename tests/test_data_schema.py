"""The canonical record schemas: every rule's error names the exact field path and what was expected."""

from __future__ import annotations

import pytest

from jaxrl_llm.data.records import RecordError
from jaxrl_llm.data.schema import MESSAGE_KEYS, detect_kind, tool_names, validate_record


def _user(text="hi"):
    return {"role": "user", "content": text}


def _assistant(text="hello", **extra):
    return {"role": "assistant", "content": text, **extra}


def _error(kind, value) -> RecordError:
    with pytest.raises(RecordError) as info:
        validate_record(kind, value)
    return info.value


# --------------------------------------------------------------------------------------------- valid


def test_conversation_is_normalised():
    value = {
        "id": 7,  # an extra column: dropped so it cannot change the dataset's version
        "messages": [
            {"content": "be brief", "role": "system"},
            _user(),
            {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": '{"x": 1}'}]},
            {"role": "tool", "content": "2", "name": "f"},
            _assistant("done", reasoning="because", tool_calls=None),
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    out = validate_record("conversation", value)
    assert set(out) == {"messages", "tools"}
    assert list(out["messages"][0]) == ["role", "content"]  # one key order
    assert out["messages"][2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "f", "arguments": {"x": 1}}],
    }
    assert out["messages"][3] == {"role": "tool", "content": "2", "name": "f"}
    assert out["messages"][4] == {"role": "assistant", "content": "done", "reasoning": "because"}
    assert tool_names(out["tools"]) == {"f"}


def test_assistant_tool_call_without_content_key():
    out = validate_record(
        "conversation", {"messages": [_user(), {"role": "assistant", "tool_calls": [{"name": "f"}]}]}
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "f", "arguments": {}}],
    }


def test_tools_as_json_string_and_empty_tools_dropped():
    msgs = [_user(), _assistant()]
    assert validate_record("conversation", {"messages": msgs, "tools": '[{"name": "g"}]'})["tools"] == [
        {"name": "g"}
    ]
    assert "tools" not in validate_record("conversation", {"messages": msgs, "tools": []})
    assert "tools" not in validate_record("conversation", {"messages": msgs, "tools": ""})


def test_arguments_string_that_is_not_a_json_object_is_kept_for_the_filter():
    call = {"name": "f", "arguments": "{not json"}
    out = validate_record("conversation", {"messages": [_user(), _assistant(tool_calls=[call])]})
    assert out["messages"][1]["tool_calls"][0]["arguments"] == "{not json"


def test_every_kind_validates():
    prompt = [_user("2+2?")]
    assert validate_record(
        "preference", {"prompt": prompt, "chosen": [_assistant("4")], "rejected": [_assistant("5")]}
    )
    assert (
        validate_record("unpaired", {"prompt": prompt, "completion": [_assistant("4")], "label": False})[
            "label"
        ]
        is False
    )
    out = validate_record("prompt", {"prompt": prompt, "ground_truth": {"answer": 4}, "meta": {"src": "x"}})
    assert out == {"prompt": prompt, "ground_truth": {"answer": 4}, "meta": {"src": "x"}}
    assert validate_record("text", {"text": "abc"}) == {"text": "abc"}


def test_detect_kind():
    assert detect_kind({"messages": []}) == "conversation"
    assert detect_kind({"prompt": [], "chosen": [], "rejected": []}) == "preference"
    assert detect_kind({"prompt": [], "completion": [], "label": True}) == "unpaired"
    assert detect_kind({"prompt": [], "ground_truth": 1}) == "prompt"
    assert detect_kind({"text": "x"}) == "text"
    assert detect_kind({"question": "x"}) is None and detect_kind([1]) is None


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "messages, field, expected",
    [
        ([], "messages", "non-empty list"),
        ("hi", "messages", "a list of messages"),
        ([_user(), "hello"], "messages[1]", "a message object"),
        (
            [_user(), {"role": "bot", "content": "x"}],
            "messages[1].role",
            "one of ['system', 'user', 'assistant', 'tool']",
        ),
        ([{"content": "x"}], "messages[0].role", "one of"),
        ([_user(), {"role": "assistant", "content": 3}], "messages[1].content", "a string"),
        ([{"role": "user", "content": None}], "messages[0].content", "None or absent only for an assistant"),
        ([{"role": "user"}], "messages[0].content", "a string"),
        ([_user(), _assistant(reasoning=5)], "messages[1].reasoning", "a string"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name", "only on tool messages"),
        (
            [
                _user(
                    "x",
                )
                | {"tool_calls": [{"name": "f"}]}
            ],
            "messages[0].tool_calls",
            "only on assistant",
        ),
        ([_user(), _assistant(tool_calls={"name": "f"})], "messages[1].tool_calls", "a list of tool calls"),
        ([_user(), _assistant(tool_calls=["f"])], "messages[1].tool_calls[0]", "a tool call"),
        ([_user(), _assistant(tool_calls=[{"name": 1}])], "messages[1].tool_calls[0].name", "a string"),
        ([_user(), _assistant(tool_calls=[{"name": ""}])], "messages[1].tool_calls[0].name", "non-empty"),
        (
            [_user(), _user(), _assistant(tool_calls=[{"name": "f", "arguments": [1, 2]}])],
            "messages[2].tool_calls[0].arguments",
            "a JSON object (dict) or a string holding one",
        ),
        (
            [_user(), _assistant(tool_calls=[{"name": "f", "id": "c1"}])],
            "messages[1].tool_calls[0]",
            "only the tool-call keys ['name', 'arguments']",
        ),
        ([{"role": "user", "content": "\ud800"}], "messages[0].content", "no lone surrogates"),
    ],
)
def test_message_rules_name_the_field(messages, field, expected):
    err = _error("conversation", {"messages": messages})
    assert err.field == field and expected in err.expected, str(err)
    assert str(err).startswith(f"{field}: expected ")


def test_unknown_message_keys_are_named_with_the_allowed_ones():
    err = _error("conversation", {"messages": [{"role": "user", "contnet": "x", "content": "y"}]})
    assert err.field == "messages[0]" and "contnet" in str(err) and str(list(MESSAGE_KEYS)) in str(err)


def test_tools_errors():
    msgs = [_user(), _assistant()]
    assert _error("conversation", {"messages": msgs, "tools": {"name": "f"}}).field == "tools"
    assert _error("conversation", {"messages": msgs, "tools": "[broken"}).field == "tools"
    assert _error("conversation", {"messages": msgs, "tools": [{"name": "f"}, 3]}).field == "tools[1]"
    err = _error("conversation", {"messages": msgs, "tools": [{"description": "no name"}]})
    assert err.field == "tools[0].name" and "'function.name'" in err.expected
    assert (
        _error("conversation", {"messages": msgs, "tools": [{"function": {"name": 1}}]}).field
        == "tools[0].function.name"
    )


def test_top_level_errors():
    assert "a JSON object" in _error("conversation", [1, 2]).expected
    err = _error("conversation", {"msgs": []})
    assert err.field == "messages" and "required" in err.expected
    err = _error("preference", {"prompt": [_user()], "chosen": [_assistant()]})
    assert err.field == "rejected"


def test_a_record_of_another_kind_says_so():
    pref = {"prompt": [_user()], "chosen": [_assistant()], "rejected": [_assistant("no")]}
    err = _error("conversation", pref)
    assert err.field == "" and "preference record" in str(err)
    # It has every key a prompt record needs, but validating it as one would drop chosen/rejected.
    assert "preference record" in str(_error("prompt", pref))
    # An extra "label" column alone does not make a prompt record unpaired.
    assert validate_record("prompt", {"prompt": [_user()], "label": "easy"}) == {"prompt": [_user()]}


def test_preference_sides_need_an_assistant_message():
    err = _error("preference", {"prompt": [_user()], "chosen": [_assistant()], "rejected": [_user("x")]})
    assert err.field == "rejected" and "assistant" in err.expected
    err = _error("preference", {"prompt": [], "chosen": [_assistant()], "rejected": [_assistant()]})
    assert err.field == "prompt"
    err = _error(
        "preference",
        {"prompt": [_user()], "chosen": [_assistant(), {"role": "x", "content": ""}], "rejected": []},
    )
    assert err.field == "chosen[1].role"


@pytest.mark.parametrize("label", [0, 1, "true", None])
def test_label_must_be_a_bool(label):
    err = _error("unpaired", {"prompt": [_user()], "completion": [_assistant()], "label": label})
    assert err.field == "label" and "0/1" in err.expected


def test_unpaired_completion_needs_an_assistant():
    err = _error("unpaired", {"prompt": [_user()], "completion": [_user()], "label": True})
    assert err.field == "completion"


def test_prompt_ground_truth_and_meta():
    assert _error("prompt", {"prompt": [_user()], "meta": [1]}).field == "meta"
    assert _error("prompt", {"prompt": [_user()], "ground_truth": float("nan")}).field == "ground_truth"
    assert _error("prompt", {"prompt": [_user()], "ground_truth": {1, 2}}).field == "ground_truth"
    assert "ground_truth" not in validate_record("prompt", {"prompt": [_user()], "ground_truth": None})


@pytest.mark.parametrize("text, expected", [("", "non-empty"), (3, "a string"), (None, "a string")])
def test_text_errors(text, expected):
    err = _error("text", {"text": text})
    assert err.field == "text" and expected in err.expected


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown record kind 'chat'"):
        validate_record("chat", {})


def test_field_path_survives_location():
    from jaxrl_llm.data.records import Location

    err = _error(
        "conversation", {"messages": [_user(), _assistant(tool_calls=[{"name": "f", "arguments": 1}])]}
    )
    located = err.at(Location("data.jsonl", 4, 5))
    assert str(located).startswith("data.jsonl:5: messages[1].tool_calls[0].arguments: expected")
