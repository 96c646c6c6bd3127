"""Readers: JSON Lines, JSON arrays, Parquet, text, HF save_to_disk, TFDS; malformed input never crashes
and never loses a record."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from jaxrl_llm.data.readers import READER_FORMATS, read_records
from jaxrl_llm.data.records import DataError, RawRecord

ROWS = [
    {"id": 0, "text": "héllo", "nested": {"a": [1, 2.5, None, True]}},
    {"id": 1, "text": "line\u2028separator and \r inside", "nested": {"a": []}},
    {"id": 2, "text": "", "nested": {"a": [{"k": "v"}]}},
]


def _values(records: list[RawRecord]) -> list:
    assert all(r.error is None for r in records), [r.error for r in records if r.error]
    return [r.value for r in records]


def _write_jsonl(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_jsonl_round_trip_keeps_line_numbers_across_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps(ROWS[0]).encode(),
        b"",
        b"   ",
        json.dumps(ROWS[1]).encode(),
        json.dumps(ROWS[2]).encode(),
    ]
    _write_jsonl(path, lines)
    records = list(read_records(path))
    assert _values(records) == ROWS
    assert [(r.location.index, r.location.line) for r in records] == [(0, 1), (1, 4), (2, 5)]
    assert str(records[1].location) == f"{path}:4"


def test_jsonl_malformed_lines_become_errors_in_place(tmp_path):
    path = tmp_path / "bad.jsonl"
    huge = "x" * 1_000_000
    lines = [
        b'{"ok": 1}',
        b'{"broken": ',  # line 2
        b'{"bytes": "\xff\xfe"}',  # line 3: not UTF-8
        b"[1, 2, 3]",  # line 4: not an object
        b"",  # line 5: blank, skipped but counted
        b"42",  # line 6
        json.dumps({"huge": huge}).encode(),  # line 7
        b'{"ok": 2}\r',  # line 8: CRLF line ending
    ]
    _write_jsonl(path, lines)
    records = list(read_records(path, format="jsonl"))
    non_blank = sum(1 for line in lines if line.strip())
    assert len(records) == non_blank == 7
    assert [r.location.line for r in records] == [1, 2, 3, 4, 6, 7, 8]
    errors = {r.location.line: r.error for r in records if r.error}
    assert set(errors) == {2, 3, 4, 6}
    assert "invalid JSON" in errors[2] and "column" in errors[2]
    assert "not valid UTF-8" in errors[3] and "byte 11" in errors[3]
    assert "expected a JSON object, got list" in errors[4]
    assert "got int 42" in errors[6]
    assert records[5].value == {"huge": huge}
    assert records[6].value == {"ok": 2}
    for r in records:
        assert (r.value is None) != (r.error is None)
        message = f"{r.location}: {r.error}"  # how the loader reports it
        assert f"{path}:{r.location.line}" in message


def test_empty_sources_are_zero_records_not_errors(tmp_path):
    for name, content in [("a.jsonl", b""), ("b.jsonl", b"\n\n  \n"), ("c.json", b""), ("d.json", b"[]")]:
        (tmp_path / name).write_bytes(content)
        assert list(read_records(tmp_path / name)) == []
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": pa.array([], pa.int64())}), tmp_path / "e.parquet")
    assert list(read_records(tmp_path / "e.parquet")) == []


def test_json_array_round_trip_with_indices(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([*ROWS, "not an object"], ensure_ascii=False, indent=2), encoding="utf-8")
    records = list(read_records(path, format="json"))
    assert [r.value for r in records[:3]] == ROWS
    assert [r.location.index for r in records] == [0, 1, 2, 3]
    assert records[3].error == "expected a JSON object, got str 'not an object'"
    assert str(records[3].location) == f"{path}[3]"


def test_json_source_errors_name_the_file_and_position(tmp_path):
    obj = tmp_path / "obj.json"
    obj.write_text('{"a": 1,\n "b": 2}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON array .* got dict"):
        read_records(obj)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON: Expecting value at line 3 column 9"):
        read_records(broken, format="json")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"a": "\xe9"}]')
    with pytest.raises(DataError, match=r"latin\.json: not valid UTF-8 \(byte 8\)"):
        read_records(latin)


def test_json_extension_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    _write_jsonl(path, [json.dumps(row).encode() for row in ROWS])
    records = list(read_records(path))
    assert _values(records) == ROWS
    assert records[2].location.line == 3


def test_parquet_round_trip_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"i": i, "s": f"row {i}", "xs": [{"k": "a", "v": float(i)}]} for i in range(2500)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    records = list(read_records(path))
    assert _values(records) == rows
    assert [r.location.index for r in records] == list(range(2500))


def test_parquet_bytes_decode_or_fail_per_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"b": pa.array([b"ok \xc3\xa9", b"\xff bad"], pa.binary())}), path)
    records = list(read_records(path, format="parquet"))
    assert records[0].value == {"b": "ok é"}
    assert records[1].error == "b: expected UTF-8 text, got bytes not valid UTF-8 at byte 0"


def test_text_format_reads_a_document_per_line(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_bytes(b"first doc\n\nsecond doc\r\n\xff\n")
    records = list(read_records(path))
    assert [r.value for r in records[:2]] == [{"text": "first doc"}, {"text": "second doc"}]
    assert [r.location.line for r in records] == [1, 3, 4] and "UTF-8" in records[2].error


def test_source_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(
        DataError, match="unknown reader format 'xml'; valid formats: " + ", ".join(READER_FORMATS)
    ):
        read_records(tmp_path, format="xml")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"cannot tell the format from the extension '\.csv'"):
        read_records(tmp_path / "data.csv")
    with pytest.raises(DataError, match="neither an HF `save_to_disk` dataset"):
        read_records(tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "bad.parquet")


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"id": i, "text": f"héllo {i}", "tags": ["a"] * i, "meta": {"x": i / 2, "y": None}} for i in range(3)
    ]
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    assert _values(list(read_records(single))) == rows

    both = tmp_path / "dict"
    train, test = [{"q": "a", "n": 1}, {"q": "b", "n": 2}], [{"q": "c", "n": 3}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(both))
    assert _values(list(read_records(both, split="test"))) == test
    records = list(read_records(both / "train", format="hf_disk"))  # a split's own directory
    assert _values(records) == train and str(records[1].location) == f"{both / 'train'}[1]"
    with pytest.raises(DataError, match=r"several splits \(test, train\); pass split="):
        read_records(both)
    with pytest.raises(DataError, match="no split 'valid'; it has test, train"):
        read_records(both, split="valid")


def test_hf_disk_without_datasets_installed_says_so(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"needs the `datasets` package \(pip install datasets\)"):
        read_records(tmp_path)


def _tiny_tfds(data_dir) -> str:
    """Prepares a two-split TFDS dataset in ``data_dir`` (no TensorFlow needed) and returns its directory."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyGsm(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        # No source directory to look for checksums in: TFDS's lookup of one for a class defined in a test
        # package needs `importlib_resources`, which is not a dependency.
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "question": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "scores": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "tags": tfds.features.Sequence(tfds.features.Text()),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"question": f"q{i} é", "answer": f"#### {i}", "scores": [i, -i], "tags": ["a", "ü"]}

    builder = TinyGsm(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def test_tfds_data_source_without_tensorflow(tmp_path):
    version_dir = _tiny_tfds(tmp_path)
    records = list(read_records(version_dir, split="train"))  # auto: features.json marks a TFDS directory
    # Text comes back as bytes and tensors as NumPy from TFDS: the reader hands out plain values. (TFDS
    # stores examples in the order of a hash of their keys, hence the sort.)
    assert sorted(_values(records), key=lambda v: v["answer"]) == [
        {"question": f"q{i} é", "answer": f"#### {i}", "scores": [i, -i], "tags": ["a", "ü"]}
        for i in range(3)
    ]
    assert type(records[0].value["scores"][0]) is int
    assert str(records[2].location) == f"{version_dir}/train[2]"
    by_name = list(read_records("tiny_gsm", format="tfds", split="test", data_dir=str(tmp_path)))
    assert sorted(r.value["answer"] for r in by_name) == ["#### 0", "#### 1"]
    with pytest.raises(DataError, match=r"several splits \(test, train\)"):
        read_records(version_dir, format="tfds")
    # Through the loader's entry point: a TFDS directory of GSM8K-shaped examples as RL prompts.
    from jaxrl_llm.data.sources import open_source

    source = open_source(version_dir, format="gsm8k", split="test")
    assert (source.reader, source.kind) == ("tfds", "prompt")
    prompts = sorted((source.convert(r.value) for r in source.records()), key=lambda p: p["ground_truth"])
    assert [p["ground_truth"] for p in prompts] == ["0", "1"]
    assert prompts[0]["prompt"] == [{"role": "user", "content": "q0 é"}]
    with pytest.raises(DataError, match="cannot open the TFDS dataset"):
        read_records("no_such_dataset_xyz", format="tfds", split="train", data_dir=str(tmp_path))


def test_deeply_nested_json_is_a_record_error_not_a_crash(tmp_path):
    # json.loads raises RecursionError, not JSONDecodeError, on deep nesting.
    path = tmp_path / "deep.jsonl"
    _write_jsonl(path, [b'{"text": "ok"}', b"[" * 100_000, b'{"k": ' * 100_000])
    records = list(read_records(path))
    assert [r.value for r in records] == [{"text": "ok"}, None, None]
    assert all("nested too deeply" in r.error for r in records[1:])
    array = tmp_path / "deep.json"
    array.write_bytes(b"[" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        read_records(array)
