"""LLaMA-Factory's registry and formats, OpenAI messages and GSM8K -> canonical records, through
``open_source``; the vendored demo files all load, and malformed records fail naming file, record, field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxrl_llm.data.llamafactory import DatasetInfo, DatasetSpec, convert, make_spec
from jaxrl_llm.data.records import DataError, RecordError
from jaxrl_llm.data.sources import FORMATS, Source, open_source

DATA = Path(__file__).parent / "data"
LF = DATA / "llamafactory"
INFO = LF / "dataset_info.json"
GSM8K = DATA / "gsm8k" / "test.jsonl"

# dataset_info name (None: the file has no entry) -> (file, kind, record count)
VENDORED = {
    "identity": ("identity.json", "conversation", 91),
    "alpaca_en_demo": ("alpaca_en_demo.json", "conversation", 999),
    "glaive_toolcall_en_demo": ("glaive_toolcall_en_demo.json", "conversation", 300),
    "dpo_en_demo": ("dpo_en_demo.json", "preference", 300),
    "kto_en_demo": ("kto_en_demo.json", "unpaired", 300),
    "c4_demo": ("c4_demo.jsonl", "text", 300),
}


def _raw(path: Path) -> list:
    """The file's records, read independently of the readers under test."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


def _convert_all(source: Source) -> list[dict]:
    out = []
    for raw in source.records():
        assert raw.error is None, f"{raw.location}: {raw.error}"
        try:
            out.append(source.convert(raw.value))
        except RecordError as err:
            raise err.at(raw.location) from None
    return out


def _errors(source: Source) -> list[str]:
    """Every record's error message (reader or conversion), None for a converted one."""
    messages = []
    for raw in source.records():
        if raw.error is not None:
            messages.append(f"{raw.location}: {raw.error}")
            continue
        try:
            source.convert(raw.value)
            messages.append(None)
        except RecordError as err:
            messages.append(str(err.at(raw.location)))
    return messages


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[dict]]:
    return {name: _convert_all(open_source(None, dataset_info=INFO, name=name)) for name in VENDORED}


def test_every_vendored_file_is_covered():
    data_files = {p.name for p in LF.iterdir()} - {
        "LICENSE",
        "README.md",
        "PROVENANCE.md",
        "dataset_info.json",
    }
    assert data_files == {f for f, _, _ in VENDORED.values()} | {"reason_tool_use_demo_50.jsonl"}


@pytest.mark.parametrize("name", list(VENDORED))
def test_registry_entries_load_with_no_errors(name, loaded):
    file_name, kind, count = VENDORED[name]
    source = open_source(None, dataset_info=INFO, name=name)
    assert (Path(source.path), source.kind) == (LF / file_name, kind)
    assert len(loaded[name]) == len(_raw(LF / file_name)) == count


@pytest.mark.parametrize(
    "file_name, fmt, kind, count",
    [
        ("reason_tool_use_demo_50.jsonl", "openai", "conversation", 50),
        ("kto_en_demo.json", "openai", "unpaired", 300),
        ("glaive_toolcall_en_demo.json", "sharegpt", "conversation", 300),
        ("dpo_en_demo.json", "sharegpt", "preference", 300),
        ("alpaca_en_demo.json", "alpaca", "conversation", 999),
        ("identity.json", "alpaca", "conversation", 91),
        ("c4_demo.jsonl", "canonical", None, 300),
    ],
)
def test_files_load_by_detected_format(file_name, fmt, kind, count, loaded):
    source = open_source(LF / file_name)
    assert (source.format, source.kind) == (fmt, kind)
    records = _convert_all(source)
    assert len(records) == len(_raw(LF / file_name)) == count
    # Without the registry the columns and tags are read off the file: the same records come out.
    name = next((n for n, (f, _, _) in VENDORED.items() if f == file_name), None)
    if name is not None:
        assert records == loaded[name]


def test_alpaca_with_input(loaded):
    raw = _raw(LF / "alpaca_en_demo.json")[5]
    assert raw["input"]
    assert loaded["alpaca_en_demo"][5] == {
        "messages": [
            {
                "role": "user",
                "content": "Given the parameters of a triangle, find out its perimeter.\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8",
            },
            {"role": "assistant", "content": raw["output"]},
        ]
    }


def test_identity_keeps_placeholders(loaded):
    assert loaded["identity"][0] == {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?",
            },
        ]
    }


def test_glaive_function_call_observation_and_tools(loaded):
    raw = _raw(LF / "glaive_toolcall_en_demo.json")[0]
    record = loaded["glaive_toolcall_en_demo"][0]
    assert [m["role"] for m in record["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
    ] + [
        "user",
        "assistant",
    ]
    assert record["messages"][3] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}
        ],
    }
    assert record["messages"][4] == {"role": "tool", "content": raw["conversations"][4]["value"]}
    assert record["tools"] == [
        {
            "name": "search_recipes",
            "description": "Search for recipes based on ingredients",
            "parameters": {
                "type": "object",
                "properties": {
                    "ingredients": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "The ingredients to search for",
                    }
                },
                "required": ["ingredients"],
            },
        }
    ]
    # "tools": "[]" means no tools: the key is left out rather than kept empty.
    empty = next(i for i, r in enumerate(_raw(LF / "glaive_toolcall_en_demo.json")) if r["tools"] == "[]")
    assert "tools" not in loaded["glaive_toolcall_en_demo"][empty]


def test_dpo_ranking_with_a_system_turn(loaded):
    raw = _raw(LF / "dpo_en_demo.json")[1]
    system, human = raw["conversations"]
    assert system["from"] == "system"
    assert loaded["dpo_en_demo"][1] == {
        "prompt": [
            {"role": "system", "content": system["value"]},
            {"role": "user", "content": human["value"]},
        ],
        "chosen": [{"role": "assistant", "content": raw["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": raw["rejected"]["value"]}],
    }


def test_kto_label_and_completion(loaded):
    raws = _raw(LF / "kto_en_demo.json")
    for i in (0, 4):
        messages = raws[i]["messages"]
        assert loaded["kto_en_demo"][i] == {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
            "completion": [{"role": "assistant", "content": messages[-1]["content"]}],
            "label": raws[i]["label"],
        }
    assert (loaded["kto_en_demo"][0]["label"], loaded["kto_en_demo"][4]["label"]) == (True, False)


def test_reason_tool_use_typed_parts():
    raw = _raw(LF / "reason_tool_use_demo_50.jsonl")[1]
    record = open_source(LF / "reason_tool_use_demo_50.jsonl", format="openai").convert(raw)
    parts = [m["content"] for m in raw["messages"]]
    assert [m["role"] for m in record["messages"]][:5] == ["system", "user", "assistant", "tool", "assistant"]
    assert record["messages"][2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "get_movie_details", "arguments": {"title": "Inception"}}],
        "reasoning": parts[2][0]["value"],
    }
    assert record["messages"][3] == {"role": "tool", "content": parts[3][0]["value"]}
    assert record["messages"][4] == {
        "role": "assistant",
        "content": parts[4][1]["value"],
        "reasoning": parts[4][0]["value"],
    }
    # OpenAI's {"type": "function", "function": schema} wrappers are unwrapped, like glaive's bare schemas.
    assert record["tools"] == [t["function"] for t in json.loads(raw["tools"])]
    assert record["tools"][0]["name"] == "get_movie_details"


def test_c4_text(loaded):
    assert loaded["c4_demo"][0] == {"text": _raw(LF / "c4_demo.jsonl")[0]["text"]}


def test_gsm8k_prompt_and_ground_truth():
    source = open_source(GSM8K)
    assert (source.format, source.kind, source.reader) == ("gsm8k", "prompt", "jsonl")
    records = _convert_all(source)
    raws = _raw(GSM8K)
    assert len(records) == len(raws) == 1319
    assert records[0] == {
        "prompt": [{"role": "user", "content": raws[0]["question"]}],
        "ground_truth": "18",
        "meta": {"solution": raws[0]["answer"]},
    }
    assert raws[146]["answer"].endswith("#### 2,125") and records[146]["ground_truth"] == "2125"
    with pytest.raises(
        RecordError, match=r"answer: expected a worked solution ending in '#### <final answer>'"
    ):
        source.convert({"question": "q", "answer": "no marker"})


def test_same_records_from_parquet_and_hf_disk(tmp_path, loaded):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _raw(LF / "alpaca_en_demo.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    assert _convert_all(open_source(tmp_path / "alpaca.parquet")) == loaded["alpaca_en_demo"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "alpaca_hf"))
    source = open_source(tmp_path / "alpaca_hf", format="alpaca")
    assert source.reader == "hf_disk"
    assert _convert_all(source) == loaded["alpaca_en_demo"]


def test_dataset_spec_from_registry():
    info = DatasetInfo.load(LF)  # a dataset_dir works as well as the file
    assert info.entry("glaive_toolcall_en_demo") == DatasetSpec(
        name="glaive_toolcall_en_demo",
        path=str(LF / "glaive_toolcall_en_demo.json"),
        formatting="sharegpt",
        kind="conversation",
        columns={"messages": "conversations", "tools": "tools"},
        tags={
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "observation_tag": "observation",
            "function_tag": "function_call",
            "system_tag": "system",
        },
    )
    kto = info.entry("kto_en_demo")
    assert (kto.kind, kto.columns["kto_tag"], kto.tags["role_tag"], kto.tags["user_tag"]) == (
        "unpaired",
        "label",
        "role",
        "user",
    )
    assert info.entry("c4_demo").columns == {"prompt": "text"}
    assert info.entry("identity").columns == {"prompt": "instruction", "query": "input", "response": "output"}
    assert info.entry("dpo_en_demo").ranking is True


def test_registry_errors():
    info = DatasetInfo.load(INFO)
    with pytest.raises(DataError, match=r"no dataset named 'alpaca_en_dem'; did you mean 'alpaca_en_demo'"):
        info.entry("alpaca_en_dem")
    with pytest.raises(
        DataError, match=r"'alpaca_en' is remote \(hf_hub_url='llamafactory/alpaca_en'.*not downloaded"
    ):
        info.entry("alpaca_en")
    with pytest.raises(DataError, match=r"multimodal columns \(images\) are not supported"):
        info.entry("mllm_demo")
    with pytest.raises(
        DataError, match=r"dataset 'alpaca_zh_demo': its file .*alpaca_zh_demo\.json does not exist"
    ):
        open_source(None, dataset_info=INFO, name="alpaca_zh_demo")
    with pytest.raises(
        DataError, match="the format asked for is 'alpaca', but .* says dataset 'dpo_en_demo' is sharegpt"
    ):
        open_source(None, dataset_info=INFO, name="dpo_en_demo", format="alpaca")
    with pytest.raises(
        DataError, match="this is a LLaMA-Factory dataset directory: pick a dataset with --name"
    ):
        open_source(LF)
    assert open_source(LF, name="identity").kind == "conversation"


def test_registry_file_errors(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"x": {"file_name": "x.json", "columns": {"promt": "q"}}}')
    with pytest.raises(DataError, match=r"unknown 'promt'; known: prompt, query"):
        DatasetInfo.load(tmp_path).entry("x")
    (tmp_path / "dataset_info.json").write_text('{"x": {\n  "file_name": }')
    with pytest.raises(DataError, match=r"dataset_info\.json: not valid JSON: .* at line 2 column 16"):
        DatasetInfo.load(tmp_path)
    with pytest.raises(DataError, match="no such dataset_info.json"):
        DatasetInfo.load(tmp_path / "nowhere")


def test_registry_entry_applied_to_another_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    )
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        open_source(tmp_path / "nope.jsonl", dataset_info=INFO, name="glaive_toolcall_en_demo")
    source = open_source(path, dataset_info=INFO, name="glaive_toolcall_en_demo")
    assert source.path == str(path) and source.reader == "jsonl"
    assert _convert_all(source) == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]


def test_source_format_errors(tmp_path):
    with pytest.raises(DataError, match="unknown format 'yaml'; valid formats: " + ", ".join(FORMATS)):
        open_source(GSM8K, format="yaml")
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"cannot tell the record format from the first record \(keys: foo\)"):
        open_source(odd)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert list(open_source(empty).records()) == []


SHAREGPT_BAD = [
    # (record, field path in the message, what it says)
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        "conversations[1].from",
        "one of 'human', 'gpt'",
    ),
    ({"conversations": [{"from": "human", "value": 5}]}, "conversations[0].value", "a string, got 5"),
    (
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": "get_weather(city)"},
            ]
        },
        "conversations[1].value",
        "a JSON tool call",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": '{"name": "f", "arguments": {}'},
            ]
        },
        "conversations[1].value",
        "invalid JSON",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": "[" * 100_000},
            ]
        },
        "conversations[1].value",
        "nested too deeply",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}], "tools": "[" * 100_000},
        "tools",
        "nested too deeply",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": '{"arguments": {}}'},
            ]
        },
        "conversations[1].value.name",
        "the tool's name",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]},
        "conversations[1].from",
        "only as the first turn",
    ),
    ({"conversations": [{"value": "q"}]}, "conversations[0].from", "one of"),
    ({"conversations": [{"from": "human"}]}, "conversations[0].value", "the key is missing"),
    ({"conversations": "hi"}, "conversations", "a list of turns"),
    ({"conversations": []}, "conversations", "a non-empty list of turns"),
    (
        {"conversations": [{"from": "human", "value": "q"}], "tools": "[{bad"},
        "tools",
        "a JSON list of tool schemas",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}], "tools": [{"description": "no name"}]},
        "tools[0].name",
        "the tool's name",
    ),
    ({"turns": []}, "conversations", "the column is missing; the record has turns"),
]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_sharegpt_errors_name_file_line_and_field(tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = _jsonl(tmp_path / "bad.jsonl", [good] + [r for r, _, _ in SHAREGPT_BAD])
    messages = _errors(open_source(path, format="sharegpt"))
    assert len(messages) == 1 + len(SHAREGPT_BAD)  # nothing lost
    assert messages[0] is None
    for line, (message, (_, field, says)) in enumerate(zip(messages[1:], SHAREGPT_BAD, strict=True), start=2):
        assert message.startswith(f"{path}:{line}: {field}: expected"), message
        assert says in message, message


def test_alpaca_errors_name_file_index_and_field(tmp_path):
    bad = [
        ({"input": "x", "output": "y"}, "instruction", "the column is missing"),
        ({"instruction": 3, "output": "y"}, "instruction", "a string, got 3"),
        ({"instruction": "i"}, "output", "the answer, a string"),
        ({"instruction": "i", "output": ["y"]}, "output", "a string, got ['y']"),
        (
            {"instruction": "i", "output": "o", "history": [["only one"]]},
            "history[0]",
            "a [prompt, response] pair",
        ),
        ({"instruction": "i", "output": "o", "history": [["u", 7]]}, "history[0][1]", "a string, got 7"),
        ({"instruction": "i", "output": "o", "system": {"text": "s"}}, "system", "a string"),
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "i", "output": "o"}] + [r for r, _, _ in bad]))
    messages = _errors(open_source(path, format="alpaca"))
    assert len(messages) == 1 + len(bad) and messages[0] is None
    for index, (message, (_, field, says)) in enumerate(zip(messages[1:], bad, strict=True), start=1):
        assert message.startswith(f"{path}[{index}]: {field}: expected"), message
        assert says in message, message


def test_kto_and_preference_errors(tmp_path):
    kto = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": "yes",
        },
        {"messages": [{"role": "user", "content": "q"}], "label": True},
    ]
    messages = _errors(
        open_source(_jsonl(tmp_path / "kto.jsonl", kto), dataset_info=INFO, name="kto_en_demo")
    )
    assert "kto.jsonl:1: label: expected the KTO label, true or false, got 'yes'" in messages[0]
    assert "kto.jsonl:2: messages[0].role: expected an assistant turn last" in messages[1]
    dpo = [
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "human", "value": "c"},
            "rejected": {"from": "gpt", "value": "r"},
        },
        {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "c"}},
    ]
    messages = _errors(
        open_source(_jsonl(tmp_path / "dpo.jsonl", dpo), dataset_info=INFO, name="dpo_en_demo")
    )
    assert "dpo.jsonl:1: chosen.from: expected an assistant turn, got 'human'" in messages[0]
    assert "dpo.jsonl:2: rejected: expected an assistant turn (the column is missing" in messages[1]


def test_openai_messages_variants(tmp_path):
    spec = make_spec("t", "t.jsonl", "openai", columns={"tools": "tools"})
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "wea"}, {"type": "text", "text": "ther?"}]},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "need the tool",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "w", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "content": "rain", "name": "w", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Rain."},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
    }
    assert convert(record, spec) == {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "w", "arguments": {"city": "Oslo"}}],
                "reasoning": "need the tool",
            },
            {"role": "tool", "content": "rain", "name": "w"},
            {"role": "assistant", "content": "Rain."},
        ],
        "tools": [{"name": "w", "parameters": {"type": "object"}}],
    }
    with pytest.raises(
        RecordError, match=r"messages\[0\]\.content\[0\]\.type: expected one of 'text'.*media"
    ):
        convert({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, spec)
    with pytest.raises(
        RecordError, match=r"messages\[0\]\.tool_calls: expected tool calls only on assistant turns"
    ):
        convert(
            {"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "w", "arguments": {}}]}]},
            spec,
        )
    # Canonical conversations are OpenAI messages too, and come out unchanged.
    canonical = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "w", "arguments": {}}],
                "reasoning": "r",
            },
            {"role": "tool", "content": "{}", "name": "w"},
        ]
    }
    assert convert(canonical, spec) == canonical


def test_huge_strings_pass_through(tmp_path):
    huge = "é" * 1_000_000
    path = _jsonl(tmp_path / "huge.jsonl", [{"instruction": huge, "input": "", "output": huge}])
    (record,) = _convert_all(open_source(path))
    assert record == {"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": huge}]}


def test_malformed_file_loses_nothing(tmp_path):
    lines = [
        json.dumps({"instruction": "i", "output": "o"}).encode(),
        b"",
        b'{"instruction": "broken',
        b"\xff\xfe not utf-8",
        b'"a string"',
        json.dumps({"instruction": 1, "output": "o"}).encode(),
        json.dumps({"instruction": "i2", "output": "o2"}).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines))
    messages = _errors(open_source(path))
    assert len(messages) == sum(1 for line in lines if line.strip()) == 6
    assert [m is None for m in messages] == [True, False, False, False, False, True]
    assert [m.split(": ")[0] for m in messages if m] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    assert "instruction: expected the instruction, a string, got 1" in messages[4]


def _mutations(value, rng, path=()):
    """Every (path, container) inside ``value``, to pick one to break."""
    yield path, value
    children = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    )
    for key, child in children:
        yield from _mutations(child, rng, (*path, key))


def _mutate(value, rng):
    import copy

    value = copy.deepcopy(value)
    spots = [(p, c) for p, c in _mutations(value, rng) if isinstance(c, dict | list) and c]
    _, container = spots[rng.randrange(len(spots))]
    key = rng.choice(list(container)) if isinstance(container, dict) else rng.randrange(len(container))
    action = rng.randrange(3)
    if action == 0:
        del container[key]
    else:
        container[key] = rng.choice([None, 7, 2.5, True, "", "{not json", [], {}, ["x"], {"k": 1}, "bogus"])
    return value


def test_fuzzed_records_give_record_errors_never_crashes():
    import random

    rng = random.Random(0)
    sources = [open_source(None, dataset_info=INFO, name=n) for n in VENDORED]
    sources += [open_source(LF / "reason_tool_use_demo_50.jsonl"), open_source(GSM8K)]
    outcomes = {"converted": 0, "rejected": 0}
    for source in sources:
        raws = [r.value for r, _ in zip(source.records(), range(20), strict=False)]
        for _ in range(150):
            try:
                assert isinstance(source.convert(_mutate(rng.choice(raws), rng)), dict)
                outcomes["converted"] += 1
            except RecordError as err:
                assert str(err) and "expected" in str(err)
                outcomes["rejected"] += 1
    assert outcomes["converted"] > 100 and outcomes["rejected"] > 100, outcomes


def test_detected_columns_follow_the_file(tmp_path):
    # A string "label" is a class name, not a KTO label; a boolean one is.
    labelled = _jsonl(tmp_path / "cls.jsonl", [{"instruction": "i", "output": "o", "label": "positive"}])
    assert open_source(labelled).kind == "conversation"
    kto = _jsonl(tmp_path / "kto.jsonl", [{"instruction": "i", "output": "o", "kto_tag": False}])
    source = open_source(kto)
    assert (source.format, source.kind) == ("alpaca", "unpaired")
    assert _convert_all(source) == [
        {
            "prompt": [{"role": "user", "content": "i"}],
            "completion": [{"role": "assistant", "content": "o"}],
            "label": False,
        }
    ]
    pairs = _jsonl(
        tmp_path / "pairs.jsonl",
        [{"instruction": "i", "input": "x", "chosen": "c", "rejected": "r", "system": "s"}],
    )
    assert _convert_all(open_source(pairs)) == [
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "i\nx"}],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        }
    ]
    history = _jsonl(
        tmp_path / "hist.jsonl", [{"instruction": "i", "output": "o", "history": [["u1", "a1"]]}]
    )
    assert _convert_all(open_source(history))[0]["messages"][:2] == [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
    ]


def test_tool_call_arguments_that_are_not_json_are_filtered_not_rejected(tmp_path):
    """Every source format treats unparsable arguments alike: kept by conversion and the schema, dropped
    (and counted) by the ``bad_tool_call`` filter; a call that is not JSON at all has no name: rejected."""
    from jaxrl_llm.data.load import load_dataset

    def record(call: str) -> dict:
        return {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": call},
                {"from": "observation", "value": "r"},
                {"from": "gpt", "value": "a"},
            ]
        }

    path = _jsonl(
        tmp_path / "calls.jsonl",
        [record('{"name": "f", "arguments": "{oops"}'), record('{"name": "f", "arguments": "[1]"}')],
    )
    spec = make_spec("t", "t.jsonl", "sharegpt")
    assert convert(_raw(path)[0], spec)["messages"][1]["tool_calls"] == [{"name": "f", "arguments": "{oops"}]
    loaded = load_dataset(path, format="sharegpt", on_error="skip")
    assert loaded.counts.as_dict() == {
        "read": 2,
        "accepted": 0,
        "rejected": 0,
        "filtered": {"bad_tool_call": 2},
    }
    broken = _jsonl(tmp_path / "broken.jsonl", [record('{"name": "f", "arguments": ')])
    assert load_dataset(broken, format="sharegpt", on_error="skip").counts.rejected == 1


def test_wrapped_and_bare_tools_are_one_canonical_form(tmp_path):
    from jaxrl_llm.data.load import load_dataset

    bare = [{"name": "w", "description": "weather", "parameters": {"type": "object"}}]
    wrapped = [{"type": "function", "function": tool} for tool in bare]
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    loaded = []
    for label, tools, fmt in [
        ("canonical_bare", bare, "jsonl"),
        ("canonical_wrapped", wrapped, "jsonl"),
        ("openai_wrapped", json.dumps(wrapped), "openai"),
        ("openai_bare", bare, "openai"),
    ]:
        path = _jsonl(tmp_path / f"{label}.jsonl", [{"messages": turns, "tools": tools}])
        loaded.append(load_dataset(path, format=fmt))
    assert all(d.records == [{"messages": turns, "tools": bare}] for d in loaded)
    assert len({d.content_hash for d in loaded}) == 1


def test_alpaca_entry_mapping_only_prompt_keeps_the_default_response(tmp_path):
    """``{"prompt": "question"}`` over instruction data is a conversation (the ``output`` column is the
    answer); over documents without ``output`` it is pre-training text, as LLaMA-Factory's c4_demo."""
    from jaxrl_llm.data.load import load_dataset

    _jsonl(tmp_path / "qa.jsonl", [{"question": "q", "output": "a"}])
    _jsonl(tmp_path / "docs.jsonl", [{"question": "a document"}])
    info = tmp_path / "dataset_info.json"
    entries = {
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question"}},
        "docs": {"file_name": "docs.jsonl", "columns": {"prompt": "question"}},
    }
    info.write_text(json.dumps(entries))
    qa = load_dataset(None, dataset_info=info, name="qa")
    assert qa.kind == "conversation"
    assert qa.records == [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ]
    docs = load_dataset(None, dataset_info=info, name="docs")
    assert (docs.kind, docs.records) == ("text", [{"text": "a document"}])
    # An explicit kind overrides the spec's where the conversion can yield it.
    assert load_dataset(None, dataset_info=info, name="qa", kind="text").records == [{"text": "q"}]
    assert open_source(info, name="qa", kind="text").kind == "text"
    with pytest.raises(DataError, match="holds text records"):
        load_dataset(None, dataset_info=info, name="docs", kind="preference")


# The content hash is each dataset's version. A change to these pinned values re-versions every dataset
# loaded through this code (a schema, converter, normalisation or filter change); it must be deliberate,
# and noted where versions are recorded, never updated just to make this test pass.
PINNED_CONTENT_HASHES = {
    "identity": "d80aa087245c7fb0cd868fa95d58770dd97f29abe54f83ec1d7092377845ccd2",
    "alpaca_en_demo": "4b44e19281cea4b0d67b72b31b9b67517d55bf324b57f6645e4b4ff1172018eb",
    "glaive_toolcall_en_demo": "5ae857a78a0f3489bbd12e8aa6de670326b689cf6b64b564bfe5bebdd6ebe42a",
    "dpo_en_demo": "632b4eecee6c6993dadf7236fd073415f7bfb40e0b1ae4e8ceb595a4b37764f4",
    "kto_en_demo": "124eb60e4eb6a2610c0586093b7cb8bfd6b7fe26949f37c4941619a7d2e3df9c",
    "c4_demo": "575ce6a59f83a838091de7a6cbc9e49b1ef156cdf66d21eb92467c0ea899fdf1",
    "reason_tool_use_demo_50.jsonl": "394710f533189504858376751df503674641f9e0aa85cdab15f207e4e390a1c1",
    "gsm8k/test.jsonl": "20a5524652aed52cc15365838e74b1b999b44d5a048183ffd9be02bb8d19a9b9",
}


@pytest.mark.parametrize("dataset", sorted(PINNED_CONTENT_HASHES))
def test_content_hashes_are_pinned(dataset):
    from jaxrl_llm.data.load import load_dataset

    if dataset in VENDORED:
        loaded = load_dataset(None, dataset_info=INFO, name=dataset)
    else:
        loaded = load_dataset(GSM8K if dataset.startswith("gsm8k/") else LF / dataset)
    assert loaded.counts.rejected == 0
    assert loaded.content_hash == PINNED_CONTENT_HASHES[dataset]
