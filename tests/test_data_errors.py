"""Bad data never crashes or silently disappears: each error names what is wrong and where, and says what
to do (an empty file, every record rejected, a truncated or corrupt file, an unknown dataset name, ...)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrl_llm.config import apply_overrides, base_config
from jaxrl_llm.data.__main__ import main
from jaxrl_llm.data.load import load_dataset, load_from_config
from jaxrl_llm.data.readers import read_records
from jaxrl_llm.data.records import DataError, RecordError
from jaxrl_llm.data.sources import open_source

REPO = Path(__file__).resolve().parents[1]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
ROBOT = {"messages": [{"role": "robot", "content": "x"}]}


def chats(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
        for i in range(n)
    ]


def lines(path: Path, *items: object) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def config(tmp_path: Path, path: Path, **data: object):
    overrides = {f"data.{key}": value for key, value in data.items()}
    return apply_overrides(
        base_config(), {"data.path": str(path), "run_dir": str(tmp_path / "run"), **overrides}
    )


def validate(capsys, *argv: object) -> tuple[int, str, str]:
    code = main(["validate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- no record to train on


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_empty_file_says_it_is_empty_in_training(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=rf"data.path={path}: the file is empty: there are no records in it"):
        load_from_config(config(tmp_path, path))


def test_every_record_rejected_says_so_and_where_the_rejects_are(tmp_path):
    path = lines(tmp_path / "bad.jsonl", ROBOT, "{not json")
    with pytest.raises(DataError) as caught:
        load_from_config(config(tmp_path, path, on_error="skip"))
    rejects = tmp_path / "run" / "rejects.jsonl"
    assert str(caught.value) == (
        f"data.path={path}: all 2 records were rejected; they are written to {rejects}; the first: "
        f"{path}:1: messages[0].role: expected one of 'user', 'assistant', 'tool', 'function_call', "
        "'system', got 'robot'"
    )
    assert len(rejects.read_text().splitlines()) == 2


def test_tokenizer_training_path_says_why_there_is_nothing(tmp_path):
    # The tokenizer is trained on the data before anything is rendered: this read used to end in
    # "data.path holds None records".
    from jaxrl_llm.train.setup import raw_records
    from jaxrl_llm.train.stages import check_kind

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        raw_records(config(tmp_path, empty))
    bad = lines(tmp_path / "bad.jsonl", ROBOT)
    with pytest.raises(DataError, match=r"all 1 records were rejected; they are written to .*rejects\.jsonl"):
        raw_records(config(tmp_path, bad, on_error="skip"))
    with pytest.raises(DataError, match="data.path holds no accepted records"):
        check_kind("sft", None)


def test_validate_of_an_empty_file_exits_2(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    code, out, err = validate(capsys, path)
    assert (code, out) == (2, "")
    assert (
        err == f"python -m jaxrl_llm.data validate: {path}: the file is empty: there are no records in it\n"
    )


# ------------------------------------------------------------------------------- on_error=raise


def test_raise_mode_error_ends_with_how_to_skip_or_validate(tmp_path):
    path = lines(tmp_path / "d.jsonl", GOOD, ROBOT)
    with pytest.raises(RecordError) as caught:
        load_dataset(path)
    assert str(caught.value) == (
        f"{path}:2: messages[0].role: expected one of 'user', 'assistant', 'tool', 'function_call', 'system', "
        "got 'robot'; to skip bad records and count them, set data.on_error=skip (on_error='skip' in "
        f"Python); to list every bad record, run: python -m jaxrl_llm.data validate {path}"
    )
    # The command reads the same registry entry (and format) as the failed load.
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"chat": {"file_name": "d.jsonl", "formatting": "openai"}}))
    with pytest.raises(RecordError, match=rf"validate --dataset-info {info} --name chat --format openai$"):
        load_dataset(None, dataset_info=info, name="chat", format="openai")


# ------------------------------------------------------------------------------------ rejects.jsonl


def test_rejects_raw_is_the_record_as_json_or_the_line_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b"\n".join([json.dumps(ROBOT).encode(), b'{"messages": [', b"caf\xe9", json.dumps(GOOD).encode()])
    )
    rejects = tmp_path / "rejects.jsonl"
    load_dataset(path, on_error="skip", rejects_path=rejects)
    raws = [json.loads(line)["raw"] for line in rejects.read_text().splitlines()]
    assert raws == [ROBOT, '{"messages": [', "caf\\xe9"]


# ----------------------------------------------------------------------------- truncated files


def test_cut_off_json_says_where_once(tmp_path):
    array = tmp_path / "cut.json"
    array.write_text(json.dumps([GOOD, GOOD])[:-30])
    with pytest.raises(DataError) as caught:
        list(read_records(array))
    message = str(caught.value)
    assert "at at" not in message
    assert message.startswith(f"{array}: not valid JSON: Unterminated string starting at line 1 column ")
    assert message.endswith(" (the file ends before the JSON does: cut off?)")
    line = lines(tmp_path / "cut.jsonl", json.dumps(GOOD)[:20])
    (record,) = read_records(line)
    assert record.error == (
        "invalid JSON: Unterminated string starting at column 16 (the line ends before the record does: cut off?)"
    )


def test_utf16_file_says_so(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_text(json.dumps(GOOD), encoding="utf-16")
    (record,) = read_records(path)
    assert record.error == (
        "line is not valid UTF-8 (byte 0 is b'\\xff'); the file looks like UTF-16: save it as UTF-8"
    )


def test_corrupt_parquet_is_a_data_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(chats(100)), good)
    data = bytearray(good.read_bytes())
    data[8 : len(data) // 2] = b"\xab" * (len(data) // 2 - 8)  # the footer is intact, the pages are not
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{bad}: a corrupt Parquet file: reading failed after row 0 \("):
        list(read_records(bad))


def test_corrupt_save_to_disk_dataset_is_a_data_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "hf"
    datasets.Dataset.from_list(chats(3000)).save_to_disk(str(path))
    (arrow,) = path.glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    third, half = len(data) // 3, len(data) // 2
    data[third:half] = b"\xab" * (half - third)
    arrow.write_bytes(bytes(data))
    # In a subprocess: unchecked, the corrupt offsets crash the interpreter (SIGSEGV) rather than raise.
    code = "from jaxrl_llm.data.readers import read_records; import sys; list(read_records(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"DataError: {path}: a corrupt `save_to_disk` dataset (" in out.stderr


def test_validate_reports_an_unreadable_file_in_one_line(tmp_path, capsys, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "d.jsonl"))

    monkeypatch.setattr("jaxrl_llm.data.load.open_source", refused)
    code, _, err = validate(capsys, tmp_path / "d.jsonl")
    assert code == 2 and err.startswith("python -m jaxrl_llm.data validate: [Errno 13] Permission denied")


# ------------------------------------------------------------------- options and dataset names


def test_format_hints_name_the_flag_and_the_config_key(tmp_path):
    path = lines(tmp_path / "odd.jsonl", {"question_text": "q"})
    with pytest.raises(DataError) as caught:
        open_source(path)
    message = str(caught.value)
    assert "format=" not in message
    assert message.endswith(
        "set --format (data.format in a training config) to one of alpaca, sharegpt, openai, gsm8k, canonical"
    )
    (tmp_path / "odd.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"set --format \(data.format in a training config\) to one of jsonl"):
        open_source(tmp_path / "odd.csv")
    with pytest.raises(DataError, match="the kind asked for is 'prompt', but this canonical source holds"):
        load_dataset("synthetic:arithmetic?n=3", kind="prompt")


def test_unknown_dataset_names_list_the_known_ones(tmp_path):
    info = tmp_path / "dataset_info.json"
    names = [f"set_{i:02d}" for i in range(14)]
    info.write_text(json.dumps({name: {"file_name": f"{name}.json"} for name in names}))
    with pytest.raises(DataError) as caught:
        open_source(None, dataset_info=info, name="nope")
    assert str(caught.value) == (
        f"{info}: no dataset named 'nope' (datasets: {', '.join(names[:10])} and 4 more)"
    )
    with pytest.raises(DataError, match=r"did you mean 'set_13', .*\(datasets: set_00, set_01, "):
        open_source(None, dataset_info=info, name="set_1")
    with pytest.raises(
        DataError, match="unknown synthetic dataset 'nope'; valid: arithmetic, arithmetic_pref"
    ):
        open_source("synthetic:nope")
