"""load_dataset: counts that always add up, rejects, raise mode, kinds, the manifest and its content hash.

These tests read with a small JSONL source of their own (``JsonlSource``), so they do not depend on the
readers in ``jaxrl_llm.data.sources``; the integration tests at the end use those when they exist.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jaxrl_llm.config import apply_overrides, base_config
from jaxrl_llm.data.filters import FilterConfig
from jaxrl_llm.data.load import load_dataset, load_from_config
from jaxrl_llm.data.manifest import MANIFEST_NAME, content_hash, file_sha256, write_manifest
from jaxrl_llm.data.records import SCHEMA_VERSION, DataError, Location, RawRecord, RecordError

REPO = Path(__file__).resolve().parents[1]
HAVE_SOURCES = importlib.util.find_spec("jaxrl_llm.data.sources") is not None


@dataclasses.dataclass
class JsonlSource:
    """A canonical-JSONL source with the interface of ``jaxrl_llm.data.sources.Source``."""

    path: str
    kind: str | None = None
    format: str = "jsonl"

    def records(self) -> Iterator[RawRecord]:
        if not Path(self.path).is_file():
            raise DataError(f"{self.path}: no such file")
        index = 0
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                location = Location(self.path, index, line_no)
                index += 1
                try:
                    yield RawRecord(location, value=json.loads(raw.decode("utf-8")))
                except (UnicodeDecodeError, ValueError) as err:
                    yield RawRecord(location, error=f"invalid JSON line ({type(err).__name__})")

    def convert(self, value: Any) -> dict:
        return value


def fake_open_source(source, *, format="auto", dataset_info=None, name=None, kind="auto"):
    if not Path(source).exists():
        raise DataError(f"{source}: no such file or directory")
    return JsonlSource(str(source))


def write_jsonl(path: Path, records: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(question: str, answer: str = "ok") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


MIXED = [
    chat("q1"),
    "{broken json",
    chat("q2", answer="   "),  # filtered: empty_turn
    {"messages": [{"role": "robot", "content": "x"}]},  # rejected: role
    chat("q1"),  # filtered: duplicate
    {"prompt": [{"role": "user", "content": "x"}]},  # rejected: another kind
    chat("q3"),
]


def load(path: Path, **kwargs) -> Any:
    return load_dataset(JsonlSource(str(path)), **kwargs)


# -------------------------------------------------------------------------------------- counts


def test_skip_counts_add_up_and_rejects_file(tmp_path):
    src = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    rejects = tmp_path / "run" / "deep" / "rejects.jsonl"
    ds = load(src, on_error="skip", rejects_path=rejects)
    assert ds.counts.as_dict() == {
        "read": 7,
        "accepted": 2,
        "rejected": 3,
        "filtered": {"duplicate": 1, "empty_turn": 1},
    }
    assert [r["messages"][0]["content"] for r in ds.records] == ["q1", "q3"]
    assert ds.kind == "conversation"
    entries = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [e["location"] for e in entries] == [f"{src}:2", f"{src}:4", f"{src}:6"]
    assert entries[0]["field"] == "" and "invalid JSON" in entries[0]["reason"] and entries[0]["raw"] is None
    assert entries[1]["field"] == "messages[0].role" and entries[1]["reason"].startswith(
        "messages[0].role: expected one of"
    )
    assert entries[1]["raw"] == MIXED[3]  # the record itself, as JSON
    # A record of another kind than the dataset's (fixed by the first valid record) says which it is.
    assert entries[2]["field"] == "" and "these keys make a prompt record" in entries[2]["reason"]
    assert len(ds.errors) == 3 and ds.errors[1].startswith(f"{src}:4: messages[0].role")


def test_rejects_file_is_written_even_when_empty_and_replaces_an_old_one(tmp_path):
    src = write_jsonl(tmp_path / "good.jsonl", [chat("a"), chat("b")])
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text("stale\n")
    ds = load(src, on_error="skip", rejects_path=rejects)
    assert ds.counts.rejected == 0 and rejects.read_text() == ""


def test_raise_mode_names_file_line_and_field(tmp_path):
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}
    src = write_jsonl(tmp_path / "bad.jsonl", [chat("a"), "", bad])
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(RecordError) as info:
        load(src, rejects_path=rejects)
    assert str(info.value).startswith(f"{src}:3: messages[1].content: expected a string")
    assert info.value.field == "messages[1].content" and info.value.location.line == 3
    assert not rejects.exists()  # raise mode writes no rejects file


def test_raise_mode_on_a_broken_line(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [chat("a"), "[1,"])
    with pytest.raises(RecordError, match=rf"^{src}:2: invalid JSON line"):
        load(src)


# --------------------------------------------------------------------------------------- kinds


def test_kind_comes_from_the_first_valid_record(tmp_path):
    records = [
        {"nothing": 1},
        {"prompt": "not a list"},
        {"prompt": [{"role": "user", "content": "x"}]},
        chat("a"),
    ]
    ds = load(write_jsonl(tmp_path / "k.jsonl", records), on_error="skip")
    assert ds.kind == "prompt" and ds.counts.accepted == 1 and ds.counts.rejected == 3
    assert "a record of one of the kinds" in ds.errors[0]
    assert ds.errors[1].endswith("prompt: expected a list of messages, got str 'not a list'")
    assert "these keys make a conversation record" in ds.errors[2]


def test_explicit_kind_and_source_kind(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [chat("a"), {"text": "plain"}])
    ds = load(src, kind="text", on_error="skip")
    assert ds.kind == "text" and ds.counts.accepted == 1 and ds.counts.rejected == 1
    with pytest.raises(DataError, match="holds conversation records"):
        load_dataset(JsonlSource(str(src), kind="conversation"), kind="preference")
    ds = load_dataset(JsonlSource(str(src), kind="conversation"), on_error="skip")
    assert ds.kind == "conversation" and ds.counts.rejected == 1


def test_bad_arguments(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [chat("a")])
    with pytest.raises(DataError, match="kind='chat'"):
        load(src, kind="chat")
    with pytest.raises(DataError, match="on_error='ignore'"):
        load(src, on_error="ignore")


def test_empty_source(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    ds = load(src, on_error="skip")
    assert ds.counts.as_dict() == {"read": 0, "accepted": 0, "rejected": 0, "filtered": {}}
    assert ds.kind is None and ds.manifest["statistics"]["turns"] is None


def test_filters_are_configurable(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [chat("a"), chat("a"), chat("b")])
    assert load(src, filters=FilterConfig(dedup=False)).counts.accepted == 3
    assert load(src, filters=FilterConfig(max_turns=1)).counts.filtered == {"too_many_turns": 3}


# ----------------------------------------------------------------------------- hash and manifest


def test_content_hash_is_the_version(tmp_path):
    records = [chat("a"), chat("b", "Ünïcode"), chat("c")]
    one = load(write_jsonl(tmp_path / "1.jsonl", records))
    # The same records with different file bytes (key order, spacing, an extra column) hash the same.
    texts = [json.dumps({"id": i, **r}, indent=None, separators=(", ", ": ")) for i, r in enumerate(records)]
    two = load(write_jsonl(tmp_path / "2.jsonl", texts))
    assert one.content_hash == two.content_hash == content_hash(one.records)
    reordered = load(write_jsonl(tmp_path / "3.jsonl", [records[1], records[0], records[2]]))
    changed = load(write_jsonl(tmp_path / "4.jsonl", [records[0], chat("b", "Ünïcodf"), records[2]]))
    shorter = load(write_jsonl(tmp_path / "5.jsonl", records[:2]))
    hashes = {one.content_hash, reordered.content_hash, changed.content_hash, shorter.content_hash}
    assert len(hashes) == 4
    assert content_hash([]) == content_hash(iter([]))


def test_content_hash_definition():
    import hashlib

    records = [{"text": "é"}, {"text": "b"}]
    expected = hashlib.sha256('{"text":"é"}\n{"text":"b"}\n'.encode()).hexdigest()
    assert content_hash(records) == expected


def test_manifest_contents(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", MIXED)
    ds = load(src, on_error="skip", filters=FilterConfig(max_turns=10))
    m = ds.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["kind"] == "conversation"
    assert m["sources"] == [{"path": str(src), "format": "jsonl", "sha256": file_sha256(src)}]
    assert len(m["sources"][0]["sha256"]) == 64
    assert m["counts"] == ds.counts.as_dict() and m["on_error"] == "skip"
    assert m["filters"] == {
        "drop_empty_turns": True,
        "dedup": True,
        "check_tool_calls": True,
        "check_role_order": True,
        "max_turns": 10,
    }
    stats = m["statistics"]
    assert stats["records"] == 2 and stats["turns"] == {"min": 2, "mean": 2.0, "max": 2}
    assert stats["chars"] == {"min": 4, "mean": 4.0, "max": 4} and stats["messages_by_role"] == {
        "assistant": 2,
        "user": 2,
    }
    path = write_manifest(m, tmp_path / "run")
    assert path == tmp_path / "run" / MANIFEST_NAME and json.loads(path.read_text()) == m


def test_directory_sha256_covers_names_and_bytes(tmp_path):
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    (d / "a.arrow").write_bytes(b"1")
    (d / "sub" / "b.json").write_bytes(b"2")
    first = file_sha256(d)
    (d / "sub" / "b.json").write_bytes(b"3")
    assert file_sha256(d) != first
    (d / "sub" / "b.json").write_bytes(b"2")
    assert file_sha256(d) == first
    (d / "sub" / "b.json").rename(d / "sub" / "c.json")
    assert file_sha256(d) != first
    assert file_sha256(tmp_path / "missing") is None


def test_load_from_config_writes_rejects_and_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr("jaxrl_llm.data.load.open_source", fake_open_source)
    src = write_jsonl(tmp_path / "c.jsonl", MIXED)
    run = tmp_path / "run"
    cfg = apply_overrides(
        base_config(), {"data.path": str(src), "data.on_error": "skip", "run_dir": str(run)}
    )
    ds = load_from_config(cfg)
    assert ds.counts.rejected == 3 and len((run / "rejects.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / MANIFEST_NAME).read_text())["content_hash"] == ds.content_hash
    with pytest.raises(DataError, match="data.path is empty"):
        load_from_config(base_config())


# ------------------------------------------------------------------------------------------ fuzz


def _garbage(rng: random.Random, depth: int = 0) -> Any:
    choices = [None, True, 0, -1.5, "", "x" * rng.randint(0, 5), "\ud800", "y" * 200_000, [], {}]
    if depth < 3:
        choices += [
            [_garbage(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            {"k": _garbage(rng, depth + 1)},
        ]
    return rng.choice(choices)


def _malformed(rng: random.Random) -> Any:
    msg = {"role": rng.choice(["user", "assistant", "system", "tool", "bot", None, 3]), "content": "hi"}
    msg2 = dict(msg)
    if rng.random() < 0.5:
        msg2[rng.choice(["content", "role", "tool_calls", "reasoning", "name", "extra"])] = _garbage(rng)
    if rng.random() < 0.3:
        msg2.pop(rng.choice(["content", "role"]), None)
    base = rng.choice(
        [
            {"messages": [msg, msg2]},
            {"prompt": [msg2], "chosen": [msg2], "rejected": _garbage(rng)},
            {"prompt": [msg], "completion": [msg2], "label": _garbage(rng)},
            {"prompt": [msg2], "ground_truth": _garbage(rng), "meta": _garbage(rng)},
            {"text": _garbage(rng)},
            {"tools": _garbage(rng), "messages": [msg2]},
            _garbage(rng),
        ]
    )
    return json.dumps(base) if rng.random() < 0.9 else json.dumps(base)[: rng.randint(0, 20)]


def test_fuzzed_records_are_all_accounted_for(tmp_path):
    rng = random.Random(1234)
    lines = [_malformed(rng) for _ in range(400)]
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass") + b"\xff\xfe{\n")
    rejects = tmp_path / "rejects.jsonl"
    ds = load(src, on_error="skip", rejects_path=rejects)
    c = ds.counts
    assert (
        c.read
        == c.accepted + c.rejected + sum(c.filtered.values())
        == sum(1 for line in lines if line.strip()) + 1
    )
    assert c.rejected > 100 and c.accepted > 0
    entries = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert len(entries) == c.rejected
    assert all(e["location"].startswith(f"{src}:") and e["reason"] for e in entries)
    assert all("raw" in e for e in entries)  # each a JSON value (the record), or None (not parsed)


# ----------------------------------------------------------------------------------- integration


@pytest.mark.skipif(not HAVE_SOURCES, reason="jaxrl_llm.data.sources not present yet")
def test_config_choices_mirror_the_data_layer():
    from jaxrl_llm.config.schema import DATA_FORMATS, DATA_KINDS
    from jaxrl_llm.data.records import KINDS
    from jaxrl_llm.data.sources import FORMATS

    assert DATA_FORMATS == FORMATS and DATA_KINDS == ("auto", *KINDS)


LLAMAFACTORY = REPO / "tests" / "data" / "llamafactory"
GSM8K = REPO / "tests" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.skipif(
    not HAVE_SOURCES or not GSM8K.exists(), reason="readers or vendored GSM8K not present yet"
)
def test_gsm8k_through_open_source():
    ds = load_dataset(GSM8K, on_error="skip")
    assert ds.kind == "prompt" and ds.counts.rejected == 0 and ds.counts.accepted > 1000
    assert ds.counts.read == ds.counts.accepted + sum(ds.counts.filtered.values())
    assert ds.manifest["sources"][0]["sha256"] == file_sha256(GSM8K)
    assert load_dataset(GSM8K, on_error="skip").content_hash == ds.content_hash


@pytest.mark.skipif(
    not HAVE_SOURCES or not LLAMAFACTORY.exists(), reason="readers or vendored data not present yet"
)
def test_llamafactory_registry_through_open_source():
    info = LLAMAFACTORY / "dataset_info.json"
    registry = json.loads(info.read_text())
    loaded = 0
    for name, entry in registry.items():
        if not (LLAMAFACTORY / entry.get("file_name", "\0")).is_file():
            continue  # the registry lists many datasets that are not vendored
        ds = load_dataset(None, dataset_info=info, name=name, on_error="skip")
        c = ds.counts
        assert c.rejected == 0, (name, ds.errors)
        assert c.accepted > 0 and c.read == c.accepted + sum(c.filtered.values()), (name, c)
        assert ds.manifest["dataset_info"]["name"] == name
        loaded += 1
    assert loaded >= 5
