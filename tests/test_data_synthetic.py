"""Synthetic datasets (``synthetic:arithmetic?...``) through the data layer, and the digit-splitting tokenizer."""

from __future__ import annotations

import json
import re

import pytest

from jaxrl_llm.config import apply_overrides, base_config
from jaxrl_llm.data.__main__ import main as data_main
from jaxrl_llm.data.load import load_dataset, load_from_config
from jaxrl_llm.data.manifest import MANIFEST_NAME, content_hash
from jaxrl_llm.data.records import DataError
from jaxrl_llm.data.schema import validate_record
from jaxrl_llm.data.sources import SyntheticSource, open_source
from jaxrl_llm.data.synthetic import SYNTHETIC, arithmetic_records, parse_synthetic, synthetic_records

QUESTION = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")


def solve(record: dict) -> tuple[int, int, str, int, str]:
    """(a, b, op, the true result, the assistant's answer) of one arithmetic record."""
    user, assistant = record["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    a, op, b = QUESTION.fullmatch(user["content"]).groups()
    true = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return int(a), int(b), op, true, assistant["content"]


def test_deterministic_by_seed_and_distinct():
    assert arithmetic_records(200, seed=3) == arithmetic_records(200, seed=3)
    assert arithmetic_records(200, seed=3) != arithmetic_records(200, seed=4)
    records = arithmetic_records(2000, ops="+-*")
    assert len({json.dumps(r) for r in records}) == 2000
    # the whole space of one-digit sums, each once
    assert len({json.dumps(r) for r in arithmetic_records(100, digits=1)}) == 100


@pytest.mark.parametrize(("digits", "ops"), [(1, "+"), (2, "+-*"), (3, "-"), (9, "*")])
def test_answers_are_correct_and_operands_in_range(digits, ops):
    records = arithmetic_records(300 if digits > 1 else 100, digits=digits, ops=ops, seed=1)
    seen_ops = set()
    for record in records:
        assert validate_record("conversation", record) == record
        a, b, op, true, answer = solve(record)
        assert 0 <= a < 10**digits and 0 <= b < 10**digits
        assert answer == str(true)
        seen_ops.add(op)
    assert seen_ops == set(ops)
    if digits >= 2:  # both ends of the range are reachable, and the largest operands appear
        assert max(max(solve(r)[:2]) for r in records) >= 10 ** (digits - 1)


def test_subtraction_may_be_negative():
    answers = [solve(r)[4] for r in arithmetic_records(200, ops="-")]
    assert any(x.startswith("-") for x in answers) and any(not x.startswith("-") for x in answers)


def test_parse_defaults_and_plus_is_kept():
    assert parse_synthetic("synthetic:arithmetic") == (
        "arithmetic",
        {"n": 2000, "digits": 2, "ops": "+", "seed": 0},
    )
    name, params = parse_synthetic("synthetic:arithmetic?n=40&digits=3&ops=+-&seed=7&")
    assert (name, params) == ("arithmetic", {"n": 40, "digits": 3, "ops": "+-", "seed": 7})
    assert synthetic_records("synthetic:arithmetic?n=40&digits=3&ops=+-&seed=7") == arithmetic_records(
        40, digits=3, ops="+-", seed=7
    )
    assert set(SYNTHETIC) == {"arithmetic", "arithmetic_pref", "arithmetic_kto", "arithmetic_rl"}


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("synthetic:arith?n=5", ["unknown synthetic dataset 'arith'", "valid: arithmetic"]),
        ("synthetic:arithmetic?size=5", ["unknown parameter 'size'", "valid: n, digits, ops, seed"]),
        ("synthetic:arithmetic?n=5x", ["n='5x'", "expected an integer"]),
        ("synthetic:arithmetic?digits=two", ["digits='two'", "expected an integer"]),
        ("synthetic:arithmetic?seed=1.5", ["seed='1.5'", "expected an integer"]),
        ("synthetic:arithmetic?n=0", ["n=0", "expected an integer >= 1"]),
        ("synthetic:arithmetic?digits=0", ["digits=0", "1..9"]),
        ("synthetic:arithmetic?digits=10", ["digits=10", "1..9"]),
        ("synthetic:arithmetic?ops=/", ["ops='/'", "'+-*'"]),
        ("synthetic:arithmetic?ops= ", ["ops=' '", "'+-*'"]),  # '+' decoded as a space by a URL parser
        ("synthetic:arithmetic?ops=", ["ops=''", "'+-*'"]),
        ("synthetic:arithmetic?ops=++", ["ops='++'", "distinct"]),
        ("synthetic:arithmetic?n", ["'n' has no value"]),
        ("synthetic:arithmetic?n=5&n=6", ["'n' is given twice"]),
        ("synthetic:arithmetic?digits=1&n=101", ["n=101", "100 distinct problems"]),
    ],
)
def test_bad_paths_name_the_problem(path, says):
    with pytest.raises(DataError) as err:
        parse_synthetic(path)
    assert str(err.value).startswith(f"{path}: ")
    for text in says:
        assert text in str(err.value)
    with pytest.raises(DataError, match=re.escape(says[0])):  # also when opened through the data layer
        load_dataset(path)


def test_arithmetic_records_rejects_bad_arguments():
    for kwargs in ({"n": 0}, {"n": 5, "digits": 0}, {"n": 5, "ops": "x"}):
        with pytest.raises(ValueError):
            arithmetic_records(**kwargs)


def test_open_source_arguments():
    source = open_source("synthetic:arithmetic?n=3", format="canonical")
    assert isinstance(source, SyntheticSource)
    assert (source.format, source.kind, source.reader) == ("canonical", "conversation", "synthetic")
    with pytest.raises(DataError, match="--format .data.format in a training config. to auto or canonical"):
        open_source("synthetic:arithmetic", format="jsonl")
    with pytest.raises(DataError, match="takes no --name"):
        open_source("synthetic:arithmetic", name="x")
    with pytest.raises(DataError, match="holds conversation records"):
        load_dataset("synthetic:arithmetic?n=3", kind="prompt")


def test_load_dataset_validates_and_records_the_source():
    path = "synthetic:arithmetic?n=100&digits=3"
    ds = load_dataset(path, format="auto")
    assert ds.kind == "conversation" and ds.records == synthetic_records(path)
    assert ds.counts.as_dict() == {"read": 100, "accepted": 100, "rejected": 0, "filtered": {}}
    assert [str(loc) for loc in ds.locations[:2]] == [f"{path}[0]", f"{path}[1]"]
    assert ds.manifest["sources"] == [{"path": path, "format": "canonical", "sha256": None}]
    assert ds.content_hash == content_hash(ds.records) == load_dataset(path).content_hash
    assert load_dataset(path.replace("n=100", "n=100&seed=1")).content_hash != ds.content_hash


def test_load_from_config_writes_the_manifest(tmp_path):
    path = "synthetic:arithmetic?n=50&ops=+-*"
    cfg = apply_overrides(base_config(), {"data.path": path, "run_dir": str(tmp_path / "run")})
    ds = load_from_config(cfg)
    assert ds.counts.accepted == 50
    manifest = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert manifest["sources"][0]["path"] == path and manifest["content_hash"] == ds.content_hash


def test_validate_command_line(capsys):
    assert data_main(["validate", "synthetic:arithmetic?n=50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["source"], report["accepted"], report["format"]) == (
        "synthetic:arithmetic?n=50",
        50,
        "canonical",
    )
    assert data_main(["validate", "synthetic:arithmetic?n=0"]) == 2
    assert "n=0: expected an integer >= 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def digit_tokenizer():
    from jaxrl_llm.render.train_tokenizer import train_byte_level_bpe

    texts = [m["content"] for r in arithmetic_records(1000, digits=3, ops="+-*") for m in r["messages"]]
    return train_byte_level_bpe(texts, vocab_size=400, split_digits=True)


ROUND_TRIP = ["What is 12 + 345? 357", "  007 -9 x1000y\n\t ünï 42.5", "1234567890"]


def test_split_digits_has_no_multi_digit_token(digit_tokenizer):
    from jaxrl_llm.render.train_tokenizer import train_byte_level_bpe

    assert not [t for t in digit_tokenizer.get_vocab() if sum(c.isdigit() for c in t) >= 2]
    for text in ROUND_TRIP:
        encoding = digit_tokenizer.encode(text, add_special_tokens=False)
        assert all(sum(c.isdigit() for c in t) <= 1 for t in encoding.tokens)
        assert digit_tokenizer.decode(encoding.ids) == text
    # without it, the same corpus does merge digits
    texts = [m["content"] for r in arithmetic_records(1000, digits=3, ops="+-*") for m in r["messages"]]
    merged = train_byte_level_bpe(texts, vocab_size=400).get_vocab()
    assert [t for t in merged if sum(c.isdigit() for c in t) >= 2]


def test_split_digits_saves_and_loads(digit_tokenizer, tmp_path):
    from jaxrl_llm.render import load_tokenizer
    from jaxrl_llm.render.train_tokenizer import save_hf_tokenizer

    tok = load_tokenizer(save_hf_tokenizer(digit_tokenizer, tmp_path / "tok"))
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == digit_tokenizer.encode(text, add_special_tokens=False).ids
    chat = arithmetic_records(1, seed=5)[0]["messages"]
    rendered = tok.apply_chat_template(chat)
    assert tok.decode(tok.encode(rendered)) == rendered


@pytest.mark.parametrize(
    ("name", "kind"),
    [("arithmetic_pref", "preference"), ("arithmetic_kto", "unpaired"), ("arithmetic_rl", "prompt")],
)
def test_the_same_problems_as_preference_unpaired_and_prompt_records(name, kind):
    path = f"synthetic:{name}?n=40&digits=2&ops=+-&seed=3"
    ds = load_dataset(path)
    assert ds.kind == kind and ds.counts.as_dict()["accepted"] == 40  # valid canonical records, none dropped
    conversations = arithmetic_records(40, digits=2, ops="+-", seed=3)
    for record, conversation in zip(ds.records, conversations, strict=True):
        user, answer = conversation["messages"]
        assert record["prompt"] == [user]
        if kind == "preference":
            assert record["chosen"][0]["content"] == answer["content"]
            wrong = int(record["rejected"][0]["content"]) - int(answer["content"])
            assert wrong != 0 and abs(wrong) <= 10
        elif kind == "unpaired":
            right = record["completion"][0]["content"] == answer["content"]
            assert right == record["label"]
        else:
            assert record["ground_truth"] == answer["content"]
    if kind == "unpaired":
        assert sum(r["label"] for r in ds.records) == 20
    assert load_dataset(path).content_hash == ds.content_hash  # deterministic
