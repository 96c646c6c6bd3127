"""Rendering in the data layer: the token-length filter, unrenderable records, the parity check at load
time, the ``validate --tokenizer DIR --template NAME`` command line, and the ``render.*`` config keys."""

from __future__ import annotations

import json

import pytest

from jaxrl_llm.config import ConfigError, apply_overrides, base_config, validate
from jaxrl_llm.data.__main__ import main
from jaxrl_llm.data.filters import REASONS, FilterConfig, Filters, UnrenderableRecord, token_bounds
from jaxrl_llm.data.load import load_from_config
from jaxrl_llm.data.records import DataError
from jaxrl_llm.render import MASK_MODES, TEMPLATES, Renderer, RenderError, load_tokenizer
from tests.fixtures_tokenizers import make_hf_tokenizer_dir
from tests.test_data_load import chat, fake_open_source, load, write_jsonl
from tests.test_render import TOOL_CALLING, TOOLS, WITH_REASONING
from tests.test_render_real import QWEN25

LONG = chat(
    "Tell me about the quick brown fox and the lazy dog, step by step.", "It jumps over the lazy dog."
)
SHORT = chat("Hi", "Yo")
MEDIUM = chat("What is 12 + 30?", "The answer is 42.")
TOOL_RECORD = {"messages": TOOL_CALLING, "tools": TOOLS}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_hf_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def renderer(tok_dir):
    return Renderer(load_tokenizer(tok_dir))


def _length(renderer, record) -> int:
    return len(renderer.render_ids(record["messages"], record.get("tools")))


# ------------------------------------------------------------------------------------- token-length filter


def test_token_bounds():
    assert token_bounds([5, 9], None, 8) == "too_long" and token_bounds([5, 9], 6, None) == "too_short"
    assert token_bounds([5, 9], 5, 9) is None and token_bounds([5, 9], 6, 8) == "too_long"
    assert REASONS.index("too_many_turns") < REASONS.index("too_long") < REASONS.index("duplicate")


def test_length_filter_counts_too_long_and_too_short(tmp_path, renderer):
    lo, hi = _length(renderer, SHORT) + 1, _length(renderer, LONG) - 1
    assert lo <= _length(renderer, MEDIUM) <= hi
    src = write_jsonl(tmp_path / "d.jsonl", [LONG, SHORT, MEDIUM, MEDIUM])
    ds = load(src, filters=FilterConfig(min_tokens=lo, max_tokens=hi), renderer=renderer)
    assert ds.counts.as_dict() == {
        "read": 4,
        "accepted": 1,
        "rejected": 0,
        "filtered": {"duplicate": 1, "too_long": 1, "too_short": 1},
    }
    assert ds.manifest["filters"]["min_tokens"] == lo and ds.manifest["filters"]["max_tokens"] == hi
    assert ds.manifest["render"] == renderer.identity() and [loc.line for loc in ds.locations] == [3]
    # Without bounds the manifest's filter settings are what they were before token counting existed.
    assert "max_tokens" not in load(src).manifest["filters"] and "render" not in load(src).manifest


def test_length_filter_needs_a_renderer(tmp_path):
    with pytest.raises(DataError, match="max_tokens=8: token-length bounds need a tokenizer"):
        Filters(FilterConfig(max_tokens=8))
    with pytest.raises(DataError, match="need a tokenizer"):
        load(write_jsonl(tmp_path / "d.jsonl", [MEDIUM]), filters=FilterConfig(min_tokens=2))


def test_unrenderable_record_is_rejected_with_the_template_error(tmp_path, tok_dir):
    chatml = Renderer(load_tokenizer(tok_dir), "chatml")
    src = write_jsonl(tmp_path / "d.jsonl", [MEDIUM, TOOL_RECORD])
    rejects = tmp_path / "rejects.jsonl"
    bounds = FilterConfig(max_tokens=10_000)
    ds = load(src, on_error="skip", rejects_path=rejects, filters=bounds, renderer=chatml)
    assert (ds.counts.accepted, ds.counts.rejected) == (1, 1)
    assert ds.errors[0].startswith(f"{src}:2: cannot render: messages: the built-in chatml chat template ")
    assert "does not render tools" in ds.errors[0]
    entry = json.loads(rejects.read_text())
    assert entry["location"] == f"{src}:2" and entry["reason"].startswith("cannot render: messages: ")
    with pytest.raises(UnrenderableRecord, match=f"^{src}:2: cannot render: ") as info:
        load(src, filters=bounds, renderer=chatml)
    assert info.value.location.line == 2
    qwen = Renderer(load_tokenizer(tok_dir), "qwen")
    assert load(src, filters=bounds, renderer=qwen).counts.accepted == 2


# ------------------------------------------------------------------------------------- load from config


def _config(tmp_path, src, **overrides):
    cfg = apply_overrides(
        base_config(), {"data.path": str(src), "run_dir": str(tmp_path / "run"), **overrides}
    )
    validate(cfg)
    return cfg


@pytest.fixture
def own_reader(monkeypatch):
    monkeypatch.setattr("jaxrl_llm.data.load.open_source", fake_open_source)


def test_load_from_config_filters_and_checks_parity(tmp_path, tok_dir, own_reader):
    tok = load_tokenizer(tok_dir)
    src = write_jsonl(tmp_path / "d.jsonl", [MEDIUM, {"messages": WITH_REASONING}, LONG])
    cfg = _config(tmp_path, src, **{"data.max_tokens": _length(Renderer(tok), LONG) - 1})
    # The tokenizer's ChatML template leaves reasoning out: the check stops the run at that record.
    with pytest.raises(
        RenderError, match=f"^{src}:2: parity check failed with template tokenizer: messages: "
    ):
        load_from_config(cfg, renderer=Renderer.from_config(cfg, tok))
    cfg = _config(tmp_path, src, **{"render.template": "chatml", "data.max_tokens": 10_000})
    renderer = Renderer.from_config(cfg, tok)
    assert (
        renderer.template_name == "chatml" and load_from_config(cfg, renderer=renderer).counts.accepted == 3
    )
    cfg = _config(tmp_path, src, **{"render.parity_sample": 0})
    assert load_from_config(cfg, renderer=Renderer(tok)).counts.accepted == 3  # no check


# ------------------------------------------------------------------------------------- command line


def run(capsys, *argv):
    code = main(["validate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_filters_by_rendered_length_and_checks_parity(tmp_path, capsys, renderer, tok_dir, own_reader):
    src = write_jsonl(tmp_path / "d.jsonl", [LONG, SHORT, MEDIUM])
    hi = _length(renderer, LONG) - 1
    code, out, err = run(capsys, src, "--tokenizer", tok_dir, "--max-tokens", hi, "--min-tokens", 2, "--json")
    report = json.loads(out)
    assert code == 0 and err == "" and report["filtered"] == {"too_long": 1}
    assert report["render"] == renderer.identity() and report["parity"] == {
        "checked": 2,
        "failed": 0,
        "errors": [],
    }
    code, out, _ = run(capsys, src, "--tokenizer", tok_dir, "--template", "plain", "--parity-sample", 1)
    assert (
        code == 0 and "template:     plain (sha256 " in out and "parity:       ok (1 records checked)" in out
    )


def test_cli_parity_failure_exits_1_and_names_the_record(tmp_path, capsys, tok_dir, own_reader):
    src = write_jsonl(tmp_path / "d.jsonl", [MEDIUM, {"messages": WITH_REASONING}])
    code, out, _ = run(capsys, src, "--tokenizer", tok_dir)
    assert code == 1 and "parity:       1 failed (2 records checked)" in out
    assert (
        f"  {src}:2: messages: assistant turn 0 (messages[1]): the tokenizer's own chat template leaves"
        in out
    )
    assert run(capsys, src, "--tokenizer", tok_dir, "--template", "qwen")[0] == 0
    assert run(capsys, src, "--tokenizer", tok_dir, "--parity-sample", 0)[0] == 0


def test_cli_unrenderable_records_are_rejected(tmp_path, capsys, tok_dir, own_reader):
    src = write_jsonl(tmp_path / "d.jsonl", [MEDIUM, TOOL_RECORD])
    code, out, _ = run(capsys, src, "--tokenizer", tok_dir, "--template", "gemma", "--max-tokens", 10_000)
    assert (
        code == 1
        and "rejected:     1" in out
        and f"{src}:2: cannot render: messages: the built-in gemma" in out
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--template", "chatm"], "unknown chat template 'chatm': the built-ins are 'chatml', 'llama3'"),
        (["--max-tokens", "3", "--min-tokens", "5"], "--min-tokens 5 exceeds --max-tokens 3"),
    ],
)
def test_cli_usage_problems_exit_2(tmp_path, capsys, tok_dir, own_reader, argv, expected):
    src = write_jsonl(tmp_path / "d.jsonl", [MEDIUM])
    code, out, err = run(capsys, src, "--tokenizer", tok_dir, *argv)
    assert code == 2 and out == "" and expected in err and err.count("\n") == 1


def test_cli_tokenizer_without_template_exits_2(tmp_path, capsys, own_reader):
    bare = make_hf_tokenizer_dir(tmp_path, chat_template=None)
    src = write_jsonl(tmp_path / "d.jsonl", [MEDIUM])
    code, _, err = run(capsys, src, "--tokenizer", bare)
    assert code == 2 and "has no chat template: pick a built-in one of 'chatml'" in err
    assert run(capsys, src, "--tokenizer", bare, "--template", "chatml")[0] == 0


def test_cli_on_a_real_tool_calling_dataset(capsys):
    # LLaMA-Factory's glaive tool-calling demo through Qwen2.5's own template: every sampled record passes.
    info = QWEN25.parents[1] / "llamafactory" / "dataset_info.json"
    argv = ["--dataset-info", info, "--name", "glaive_toolcall_en_demo", "--tokenizer", QWEN25, "--json"]
    code, out, err = run(capsys, *argv, "--parity-sample", 20)
    report = json.loads(out)
    assert code == 0, err
    assert report["parity"] == {"checked": 20, "failed": 0, "errors": []} and report["rejected"] == 0


# ------------------------------------------------------------------------------------- config keys


def test_config_mirrors_the_render_layer():
    from jaxrl_llm.config.schema import RENDER_MASKS, RENDER_TEMPLATES

    assert RENDER_TEMPLATES == ("", *TEMPLATES) and RENDER_MASKS == MASK_MODES


def test_config_token_bounds():
    cfg = apply_overrides(base_config(), {"data.min_tokens": 9, "data.max_tokens": 4})
    with pytest.raises(
        ConfigError, match="data.min_tokens=9, data.max_tokens=4: data.min_tokens must not exceed"
    ):
        validate(cfg)
    cfg = apply_overrides(base_config(), {"data.min_tokens": 2, "data.max_tokens": 4})
    assert FilterConfig.from_config(cfg) == FilterConfig(min_tokens=2, max_tokens=4)
    with pytest.raises(ConfigError, match="render.template='chatm'.*did you mean 'chatml'"):
        validate(apply_overrides(base_config(), {"render.template": "chatm"}))
