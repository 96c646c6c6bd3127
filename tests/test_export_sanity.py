"""Exports HF transformers can use on its own (stop and pad ids, generation_config.json, the run's chat
template), ``python -m jaxrl_llm.export`` for any checkpoint of a run, and ``python -m jaxrl_llm.sanity``
against HF transformers: a good export passes, the vendored arith-sft (exported before exports carried an
EOS id) fails its generation checks with the reason, and a reward model's batched scoring needs a pad id."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_llm.export.__main__ import main as export_main
from jaxrl_llm.models import TokenIds, create_model, get_preset, load_hf, save_hf
from jaxrl_llm.render import Renderer, load_tokenizer
from jaxrl_llm.rollout import ChatSampler, SamplingParams, end_of_turn_ids
from jaxrl_llm.sanity.__main__ import main as sanity_main
from jaxrl_llm.train.setup import export_token_ids, save_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARITH_SFT = Path(__file__).parent / "data" / "models" / "arith-sft"
QUESTIONS = ["What is 12 + 30?", "What is 7 + 5?"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def run(tiny_sft_run) -> Path:
    """The session's finished tiny SFT run (checkpoints at steps 3 and 6, chatml template): read only."""
    return tiny_sft_run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> tuple[Path, str]:
    """``python -m jaxrl_llm.export RUN --out DIR`` (the last checkpoint) and what it printed."""
    out = tmp_path_factory.mktemp("export") / "latest"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export_main([str(run), "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_a_runs_final_export_declares_the_end_of_turn_and_pad_ids(run):
    final = run / "final"
    renderer = Renderer(load_tokenizer(final))
    eot = list(end_of_turn_ids(renderer))
    config, generation = _json(final / "config.json"), _json(final / "generation_config.json")
    assert eot and renderer.tokenizer.decode(eot) == "<|im_end|>"
    assert config["eos_token_id"] == generation["eos_token_id"] == eot[0]
    assert renderer.tokenizer.pad_id is not None
    assert config["pad_token_id"] == generation["pad_token_id"] == renderer.tokenizer.pad_id
    assert config["bos_token_id"] == generation["bos_token_id"] == renderer.tokenizer.bos_id
    # Greedy-neutral: ids only, nothing that changes how HF samples.
    assert set(generation) == {"bos_token_id", "eos_token_id", "pad_token_id"}
    loaded = transformers.GenerationConfig.from_pretrained(final)
    assert loaded.eos_token_id == eot[0] and not loaded.do_sample


def test_the_export_holds_the_last_checkpoint_and_the_runs_chat_template(run, exported):
    out, printed = exported
    assert "exported step 6 of" in printed
    assert "the same parameters as the run's final export" in printed
    assert "generation_config.json: eos_token_id 2, pad_token_id 0" in printed
    assert _json(out / "generation_config.json") == _json(run / "final" / "generation_config.json")
    # The run trained with the built-in chatml template, which the export carries as the tokenizer's own.
    assert (
        Renderer(load_tokenizer(out)).template_sha256
        == Renderer(load_tokenizer(out), "chatml").template_sha256
    )


def test_hf_generate_on_the_export_stops_at_the_end_of_the_turn_as_our_sampler_does(exported):
    out, _ = exported
    renderer = Renderer(load_tokenizer(out))
    ours = ChatSampler(load_hf(out), renderer, batch_size=len(QUESTIONS)).generate(
        [[{"role": "user", "content": q}] for q in QUESTIONS],
        key=jax.random.key(0),
        max_new_tokens=8,
        sampling=SamplingParams.greedy(),
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    eot = end_of_turn_ids(renderer)
    for question, (completion,) in zip(QUESTIONS, ours, strict=True):
        messages = [{"role": "user", "content": question}]
        prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
        assert ids == renderer.render_prompt(messages).tolist()  # HF renders what training rendered
        with torch.no_grad():  # no eos or pad argument: the export's generation_config.json decides
            got = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)[0, len(ids) :].tolist()
        assert completion.finish_reason == "eos" and completion.token_ids[-1] in eot
        assert got == completion.token_ids  # the same answer, ending at the end-of-turn id


def test_export_of_an_intermediate_step(run, tmp_path, capsys):
    assert export_main([str(run), "--step", "3", "--out", str(tmp_path / "step3")]) == 0
    printed = capsys.readouterr().out
    assert "exported step 3 of" in printed and "final export" not in printed
    config = _json(tmp_path / "step3" / "config.json")
    assert config["eos_token_id"] == 2 and config["pad_token_id"] == 0
    assert (tmp_path / "step3" / "generation_config.json").is_file()
    assert (tmp_path / "step3" / "tokenizer.json").is_file()
    early, final = load_hf(tmp_path / "step3"), load_hf(run / "final")
    assert not np.allclose(np.asarray(early.embed.embedding[...]), np.asarray(final.embed.embedding[...]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["RUN", "--step", "4", "--out", "OUT"], "no checkpoint of step 4 (available: 3, 6)"),
        (["NOT_A_RUN", "--out", "OUT"], "not a run directory"),
        (["MISSING", "--out", "OUT"], "no such run directory"),
        (["RUN", "--out", "A_FILE"], "exists and is not a folder"),
    ],
)
def test_export_user_errors_are_one_line_and_exit_2(run, tmp_path, capsys, argv, message):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "a_file").write_text("x")
    names = {
        "RUN": str(run),
        "NOT_A_RUN": str(tmp_path / "not_a_run"),
        "MISSING": str(tmp_path / "missing"),
        "OUT": str(tmp_path / "out"),
        "A_FILE": str(tmp_path / "a_file"),
    }
    assert export_main([names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxrl_llm.export: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_export_needs_out(run, capsys):
    with pytest.raises(SystemExit) as stop:
        export_main([str(run)])
    assert stop.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_sanity_passes_on_a_good_export(exported, tmp_path, capsys):
    out, _ = exported
    report = tmp_path / "sanity.json"
    assert sanity_main([str(out), "--max-new-tokens", "8", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "max |Δlogit|" in printed and "first diverging token" in printed
    assert "all 11 checks passed" in printed
    results = _json(report)
    assert results["passed"] and results["head"] == "lm"
    names = [c["name"] for c in results["checks"]]
    assert names[:3] == ["chat template", "stop ids", "pad id"] and names.count("greedy p0") == 1
    assert all(c["max_delta"] < 1e-4 for c in results["checks"] if c["name"].startswith("logits"))


@pytest.mark.slow
def test_sanity_fails_the_vendored_checkpoint_without_an_eos_id(tmp_path, capsys):
    """arith-sft predates exports with stop ids: HF generate answers '42' as we do, then runs on."""
    report = tmp_path / "sanity.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    argv = [str(ARITH_SFT), "--prompts", str(prompts), "--max-new-tokens", "6", "--json", str(report)]
    assert sanity_main(argv) == 1
    printed = capsys.readouterr().out
    assert "config.json has no eos_token_id: HF generate will not stop at the end of the turn" in printed
    checks = {c["name"]: c for c in _json(report)["checks"]}
    assert checks["stop ids"]["verdict"] == "FAIL"
    assert checks["logits p0"]["verdict"] == "pass"  # the weights are sound: only the stop id is missing
    greedy = checks["greedy p0"]
    assert greedy["verdict"] == "FAIL" and greedy["diverge"] == "3: <end> vs '\\n'"
    assert "HF generate ran past the end of the turn: ours '42<|im_end|>'" in greedy["note"]


@pytest.mark.slow
def test_sanity_fails_a_tokenizer_template_unlike_the_one_trained_with(tmp_path, capsys):
    """HF users render prompts with the checkpoint's own template: it must give the ids training saw."""
    copy = shutil.copytree(ARITH_SFT, tmp_path / "model")
    system = "{{- '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"
    (copy / "chat_template.jinja").write_text(system + (ARITH_SFT / "chat_template.jinja").read_text())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(QUESTIONS[0]) + "\n")
    report = tmp_path / "sanity.json"
    argv = [str(copy), "--template", "chatml", "--prompts", str(prompts), "--max-new-tokens", "1"]
    assert sanity_main([*argv, "--json", str(report)]) == 1
    capsys.readouterr()
    template = _json(report)["checks"][0]
    assert template["name"] == "chat template" and template["verdict"] == "FAIL"
    assert template["diverge"].startswith("1: ") and "unlike the chatml template" in template["note"]


@pytest.fixture(scope="module")
def reward_models(run, tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised score head saved with the tokenizer: with the export's ids and without any."""
    tokenizer = load_tokenizer(run / "final")
    renderer = Renderer(tokenizer)
    model = create_model(
        get_preset("llama-tiny").replace(vocab_size=tokenizer.vocab_size), head="score", seed=3
    )
    root = tmp_path_factory.mktemp("rm")
    ids = export_token_ids(renderer)
    out = {}
    for name, token_ids in (("with_ids", ids), ("no_pad", TokenIds(eos=ids.eos))):
        out[name] = save_hf(model, root / name, token_ids=token_ids)
        save_tokenizer(tokenizer, out[name])
    return out


def test_a_score_head_export_declares_its_pad_id(reward_models):
    config = _json(reward_models["with_ids"] / "config.json")
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert _json(reward_models["no_pad"] / "config.json")["pad_token_id"] is None


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("with_ids", 0), ("no_pad", 1)])
def test_sanity_scores_a_reward_model_in_batches_only_with_a_pad_id(
    reward_models, name, code, tmp_path, capsys
):
    report = tmp_path / "sanity.json"
    assert sanity_main([str(reward_models[name]), "--json", str(report)]) == code
    capsys.readouterr()
    results = _json(report)
    assert results["head"] == "score"
    checks = {c["name"].split(" (")[0]: c for c in results["checks"]}
    assert all(checks[f"score p{i}"]["verdict"] == "pass" for i in range(4))  # one row needs no padding
    batched = checks["batched scores"]
    if code == 0:
        assert batched["verdict"] == "pass" and batched["max_delta"] < 1e-4
    else:
        assert checks["pad id"]["verdict"] == "FAIL"
        assert batched["verdict"] == "FAIL" and "Cannot handle batch sizes > 1" in batched["note"]


def test_sanity_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    assert sanity_main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sanity_main([str(ARITH_SFT), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert sanity_main([str(ARITH_SFT), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch", None)  # as without the test extra
    assert sanity_main([str(ARITH_SFT)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("jaxrl_llm.sanity: ") and "pip install torch==2.13.0" in err and err.count("\n") == 1
    )


def test_save_hf_writes_several_stop_ids_as_a_list_and_no_generation_config_without_one(tmp_path):
    model = create_model(get_preset("llama-tiny"))
    path = save_hf(model, tmp_path / "several", token_ids=TokenIds(bos=1, eos=(2, 5, 2), pad=0))
    config, generation = _json(path / "config.json"), _json(path / "generation_config.json")
    assert config["eos_token_id"] == generation["eos_token_id"] == [2, 5]
    assert transformers.GenerationConfig.from_pretrained(path).eos_token_id == [2, 5]
    assert load_hf(path).cfg.eos_token_id == (2, 5)  # and read back by our loader
    bare = save_hf(model, tmp_path / "bare")
    assert _json(bare / "config.json")["eos_token_id"] is None
    assert not (bare / "generation_config.json").exists()
    with pytest.raises(ValueError, match="TokenIds.eos"):
        TokenIds(eos=(-1,))
