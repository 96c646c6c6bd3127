"""``python -m jaxrl_llm.data validate``: exit codes 0/1/2, the text report and the --json object."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxrl_llm.data.__main__ import main
from tests.test_data_load import GSM8K, HAVE_SOURCES, MIXED, REPO, chat, fake_open_source, write_jsonl


@pytest.fixture(autouse=True)
def _own_reader(monkeypatch):
    # The unit tests read canonical JSONL with the test's own source, not jaxrl_llm.data.sources.
    monkeypatch.setattr("jaxrl_llm.data.load.open_source", fake_open_source)


def run(capsys, *argv):
    code = main(["validate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_all_accepted_or_filtered_exits_0(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ok.jsonl", [chat("a"), chat("a"), chat("b", " ")])
    code, out, err = run(capsys, src)
    assert code == 0 and err == ""
    assert "read:         3" in out and "accepted:     1" in out and "rejected:     0" in out
    assert "filtered:     2 (duplicate 1, empty_turn 1)" in out and "content hash: " in out


def test_rejections_exit_1_and_list_the_first_errors(tmp_path, capsys):
    src = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    rejects = tmp_path / "out" / "rejects.jsonl"
    code, out, _ = run(capsys, src, "--rejects", rejects)
    assert code == 1
    assert "rejected:     3" in out and "first errors (3 of 3):" in out
    assert f"  {src}:4: messages[0].role: expected one of" in out
    assert len(rejects.read_text().splitlines()) == 3 and f"rejects:      {rejects}" in out


def test_json_is_one_object_with_the_keys(tmp_path, capsys):
    src = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    code, out, _ = run(capsys, src, "--json")
    report = json.loads(out)  # exactly one JSON document on stdout
    assert code == 1 and out.count("\n") == 1
    assert {"read", "accepted", "rejected", "filtered", "content_hash", "first_errors"} <= set(report)
    assert (report["read"], report["accepted"], report["rejected"]) == (7, 2, 3)
    assert report["filtered"] == {"duplicate": 1, "empty_turn": 1} and len(report["content_hash"]) == 64
    assert report["kind"] == "conversation" and report["first_errors"][0].startswith(f"{src}:2: ")


def test_filter_flags(tmp_path, capsys):
    three = {"messages": [{"role": "system", "content": "s"}, *chat("a")["messages"]]}
    src = write_jsonl(tmp_path / "d.jsonl", [chat("a"), chat("a"), three])
    _, out, _ = run(capsys, src, "--json", "--no-dedup", "--max-turns", "2")
    assert json.loads(out)["filtered"] == {"too_many_turns": 1}
    with pytest.raises(SystemExit) as info:
        main(["validate", str(src), "--max-turns", "0"])
    assert info.value.code == 2


def test_unreadable_source_exits_2_with_one_line(tmp_path, capsys):
    code, out, err = run(capsys, tmp_path / "missing.jsonl")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--template", "chatml"], "--template: needs --tokenizer DIR"),
        (["--max-tokens", "5", "--parity-sample", "0"], "--max-tokens, --parity-sample: needs --tokenizer"),
        (["--tokenizer", "missing/"], "tokenizer path does not exist"),
        (["--dataset-info", "dataset_info.json"], "--dataset-info needs --name"),
    ],
)
def test_flags_that_cannot_run(tmp_path, capsys, argv, expected):
    src = write_jsonl(tmp_path / "ok.jsonl", [chat("a")])
    code, _, err = run(capsys, src, *argv)
    assert code == 2 and expected in err


def test_source_is_required_without_a_registry(capsys):
    assert main(["validate"]) == 2
    assert "SOURCE is required unless --dataset-info FILE --name NAME" in capsys.readouterr().err


def test_bad_kind_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate", "x.jsonl", "--kind", "chat"])
    assert info.value.code == 2 and "invalid choice: 'chat'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- integration


def _module(*argv):
    return subprocess.run(
        [sys.executable, "-m", "jaxrl_llm.data", "validate", *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    not HAVE_SOURCES or not GSM8K.exists(), reason="readers or vendored GSM8K not present yet"
)
def test_gsm8k_end_to_end(tmp_path):
    done = _module(GSM8K, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kind"] == "prompt" and report["rejected"] == 0 and report["read"] == report["accepted"]
    broken = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "#### 2"}, "{oops"])
    done = _module(broken, "--format", "gsm8k")
    assert done.returncode == 1 and "gsm.jsonl:2" in done.stdout, done.stdout + done.stderr
    done = _module(tmp_path / "missing.jsonl")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def _real_readers(monkeypatch):
    from jaxrl_llm.data.sources import open_source

    monkeypatch.setattr("jaxrl_llm.data.load.open_source", open_source)


def test_deeply_nested_records_are_rejects_not_crashes(tmp_path, capsys, monkeypatch):
    _real_readers(monkeypatch)
    src = tmp_path / "deep.jsonl"
    deep_call = {"name": "f", "arguments": "[" * 100_000}
    lines = [
        json.dumps(chat("a")),
        "[" * 100_000,
        json.dumps({"messages": [{"role": "assistant", "content": None, "tool_calls": [deep_call]}]}),
        json.dumps({"messages": chat("b")["messages"], "tools": "[" * 100_000}),
    ]
    src.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, src, "--json")
    report = json.loads(out)
    assert code == 1 and err == ""
    # The deep arguments string is kept (not JSON) and filtered; the deep line and tools are rejected.
    assert (report["read"], report["accepted"], report["rejected"]) == (4, 1, 2)
    assert report["filtered"] == {"bad_tool_call": 1}


def test_user_errors_are_one_line_messages(tmp_path, capsys, monkeypatch):
    _real_readers(monkeypatch)
    src = write_jsonl(tmp_path / "ok.jsonl", [chat("a")])
    code, out, err = run(capsys, src, "--rejects", tmp_path)  # a directory
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{tmp_path}: cannot write the rejects file" in err and "Traceback" not in err
    info = REPO / "tests" / "data" / "llamafactory" / "dataset_info.json"
    code, out, err = run(capsys, info)
    assert code == 2 and err.count("\n") == 1
    assert (
        "this is a LLaMA-Factory dataset_info.json: pick a dataset with --name" in err
        and "alpaca_en_demo" in err
    )


def test_bad_load_dataset_arguments_name_the_argument(tmp_path):
    from jaxrl_llm.data.load import load_dataset
    from jaxrl_llm.data.records import DataError

    src = write_jsonl(tmp_path / "ok.jsonl", [chat("a")])
    with pytest.raises(DataError, match="renderer='chatml': expected a jaxrl_llm.render.Renderer"):
        load_dataset(src, renderer="chatml")
    with pytest.raises(DataError, match="filters=.*expected a jaxrl_llm.data.filters.FilterConfig"):
        load_dataset(src, filters={"dedup": False})
