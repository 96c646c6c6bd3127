"""Evaluation: the pass@k / maj@k formulas against hand computations, perplexity against the SFT loss of the
same records, pairwise preference accuracy against scores computed by hand, the offline command
(``python -m jaxrl_llm.eval``) on the vendored SFT model and its errors, and ``eval.sets`` in training."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.eval.__main__ import main as eval_main
from jaxrl_llm.train.eval_metrics import maj_at_k, majority_correct, pass_at_k, sample_ks, vote_key
from jaxrl_llm.train.eval_sets import parse_eval_sets

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"


# ------------------------------------------------------------------------------------------ formulas


def test_pass_at_k_is_chen_et_al_unbiased_estimator():
    # n=5 samples, c=2 correct: 1 - C(3, k) / C(5, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c = 3 < k: every draw of 4 holds a correct one
    for n, c, k in [(10, 3, 4), (16, 5, 8), (8, 1, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert [pass_at_k(4, 0, k) for k in (1, 2, 4)] == [0.0, 0.0, 0.0]  # c = 0
    assert [pass_at_k(4, 4, k) for k in (1, 2, 4)] == [1.0, 1.0, 1.0]  # c = n
    for bad in [(4, 5, 1), (4, 1, 5), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_sample_ks_are_powers_of_two_and_n():
    assert sample_ks(1) == (1,)
    assert sample_ks(8) == (1, 2, 4, 8)
    assert sample_ks(6) == (1, 2, 4, 6)


def test_majority_vote_by_hand():
    votes, right = ["5", "7", "7", "5"], [True, False, False, True]
    assert maj_at_k(votes, right, 4) == 1.0  # 2 against 2: the answer given first wins
    assert maj_at_k(votes, right, 2) == 0.5  # runs [5, 7] -> 5 (right), [7, 5] -> 7 (wrong)
    assert maj_at_k(votes, right, 1) == 0.5 == pass_at_k(4, 2, 1)  # maj@1 is pass@1
    assert maj_at_k(["3", "9", "9"], [True, False, False], 3) == 0.0
    assert not majority_correct([None, None], [True, True])  # no answer, no vote
    assert maj_at_k([None, "4", None], [False, True, False], 3) == 1.0


def test_votes_use_the_verifiers_answer_extraction():
    same = {vote_key(t, "math_verify") for t in ("The answer is 85.", "#### 85.0", r"so \boxed{85}", "$85")}
    assert len(same) == 1 and None not in same
    assert vote_key("no number here", "math_verify") is None
    assert vote_key(" 85 \n", "answer_match") == "85" and vote_key("  ", None) is None


def test_eval_sets_are_validated_naming_the_entry():
    sets = parse_eval_sets(
        [
            {"name": "gsm8k", "path": "t.jsonl", "format": "gsm8k", "limit": 64},
            {"name": "rl", "path": "x", "n": 8, "temperature": 1.0, "verifiers": [{"name": "math_verify"}]},
        ]
    )
    assert [s.name for s in sets] == ["gsm8k", "rl"] and sets[0].limit == 64 and sets[1].n == 8
    assert parse_eval_sets([]) == []
    for items, message in [
        ({"name": "a"}, "expected a list"),
        ([{"path": "x"}], "eval.sets[0]: 'name' must be a non-empty string"),
        ([{"name": "a", "path": "x", "size": 3}], "unknown key(s) size"),
        ([{"name": "a b", "path": "x"}], "eval.sets[0].name='a b'"),
        ([{"name": "a", "path": "x"}, {"name": "a", "path": "y"}], "listed twice"),
        ([{"name": "a", "path": "x", "n": 0}], "eval.sets[0].n=0"),
        ([{"name": "a", "path": "x", "n": 4, "temperature": 0}], "temperature 0"),
        (
            [{"name": "a", "path": "x"}, {"name": "b", "path": "y", "verifiers": [{"name": "nope"}]}],
            "eval.sets[1]",
        ),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            parse_eval_sets(items)


# ------------------------------------------------------------------------------------------ the core


@pytest.fixture(scope="module")
def tiny():
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.parallel import make_mesh
    from jaxrl_llm.render import Renderer, load_tokenizer

    renderer = Renderer(load_tokenizer(SFT_MODEL), "chatml")
    return load_hf(SFT_MODEL), renderer, make_mesh()


def test_perplexity_is_exp_of_the_sft_loss_of_the_same_records(tiny):
    from jaxrl_llm.data.synthetic import arithmetic_records
    from jaxrl_llm.objectives.sft import sft_loss, sft_normalizer
    from jaxrl_llm.render.records import SFTEncoder
    from jaxrl_llm.train.eval_run import EvalSettings, RecordEvaluator

    model, renderer, mesh = tiny
    records = arithmetic_records(6, seed=11)
    graphdef, params = nnx.split(model, nnx.Param)
    settings = EvalSettings(batch_size=4, seq_len=128)  # several records packed into each row
    metrics = RecordEvaluator(graphdef, renderer, records, "conversation", settings, mesh=mesh)(
        params
    ).metrics
    loss = jax.jit(
        lambda p, b: (sft_loss(nnx.merge(graphdef, p), b, jax.random.key(0))[0], sft_normalizer(b))
    )
    nll, count = 0.0, 0.0
    for record in records:  # one unpacked row each (padded to 64 tokens), by the objective itself
        row, width = SFTEncoder(renderer)(record), 64
        real = len(row["ids"])
        batch = {
            "tokens": np.pad(row["ids"], (0, width - real))[None],
            "loss_mask": np.pad(row["loss_mask"], (0, width - real))[None],
            "segment_ids": (np.arange(width) < real).astype(np.int32)[None],
            "positions": np.arange(width)[None],
        }
        row_nll, row_count = loss(params, batch)
        nll, count = nll + float(row_nll), count + float(row_count)
    assert metrics["target_tokens"] == count
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_pairwise_accuracy_of_a_reward_model_and_of_log_probs(tiny):
    from jaxrl_llm.data.synthetic import arithmetic_preference_records
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.objectives.sft import token_logps
    from jaxrl_llm.train.eval_run import EvalSettings, RecordEvaluator

    lm, renderer, mesh = tiny
    records = arithmetic_preference_records(6, seed=4)
    settings = EvalSettings(batch_size=4, seq_len=64)
    scorer = load_hf(SFT_MODEL, head="score")  # a random score head: some pairs right, some wrong
    for model, head in ((scorer, "score"), (lm, "lm")):
        graphdef, params = nnx.split(model, nnx.Param)
        metrics = RecordEvaluator(graphdef, renderer, records, "preference", settings, mesh=mesh, head=head)(
            params
        )
        metrics = metrics.metrics
        forward = jax.jit(lambda p, ids, g=graphdef: nnx.merge(g, p)(ids))  # right-padded: causal, unchanged
        wins, margins = [], []
        for r in records:
            values = []
            for side in ("chosen", "rejected"):
                rendered = renderer.render(r["prompt"] + r[side])  # prompt + answer, one unpacked row
                real = len(rendered.ids)
                ids = jnp.asarray(np.pad(rendered.ids, (0, 64 - real)))[None]
                if head == "score":  # the score at the answer's last token
                    values.append(float(forward(params, ids)[0, real - 1]))
                else:  # the summed log-prob of the answer's target tokens
                    logps = token_logps(forward(params, ids)[:, : real - 1], ids[:, 1:real])[0]
                    values.append(float((logps * jnp.asarray(rendered.loss_mask[1:])).sum()))
            wins.append(values[0] > values[1])
            margins.append(values[0] - values[1])
        name = "pairwise_accuracy" if head == "score" else "logp_pairwise_accuracy"
        assert metrics[name] == pytest.approx(np.mean(wins)) and metrics["pairs"] == len(records)
        margin = metrics["score_margin" if head == "score" else "logp_margin"]
        assert margin == pytest.approx(np.mean(margins), rel=1e-3, abs=1e-4)
    assert metrics["logp_pairwise_accuracy"] >= 0.8  # the SFT model prefers the right sums


# ------------------------------------------------------------------------------------------ the command


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = eval_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model", "--data", "x.jsonl"], "not a directory"),
        (["{tmp}", "--data", "x.jsonl"], "neither an HF checkpoint"),
        (["{model}", "--data", "x.jsonl", "--n", "0"], "--n must be >= 1"),
        (["{model}", "--data", "x.jsonl", "--n", "4", "--temperature", "0"], "are all the greedy answer"),
        (["{model}", "--data", "{tmp}/none.jsonl"], "none.jsonl"),
        (
            ["{model}", "--data", "synthetic:arithmetic_rl?n=4", "--verifier", "nope"],
            "--verifier[0]: unknown reward",
        ),
        (["{model}", "--data", "synthetic:arithmetic_rl?n=4", "--verifier", "{{bad"], "not JSON"),
        (["{run}", "--data", "synthetic:arithmetic_rl?n=4"], "has not finished"),
    ],
)
def test_command_errors_are_one_line_and_exit_2(capsys, tmp_path, args, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text("{}")
    args = [a.format(tmp=tmp_path, model=SFT_MODEL, run=run) for a in args]
    code, out, err = _run(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_command_on_the_tiny_model_prints_a_table_and_writes_json(capsys, tmp_path):
    out_file = tmp_path / "out" / "arith.json"
    data = "synthetic:arithmetic_rl?n=8&digits=2&seed=5"
    code, out, err = _run(
        capsys, SFT_MODEL, "--data", data, "--template", "chatml", "--n", "4", "--max-new-tokens", "6",
        "--out", out_file,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out_file.read_text())
    m = results["metrics"]
    assert (
        results["kind"] == "prompt"
        and results["records"] == 8
        and results["verifiers"] == [{"name": "math_verify"}]
    )
    assert m["accuracy"] >= 0.6 and m["prompts"] == 8  # the vendored model adds two-digit numbers well
    assert set(m) >= {"pass_at_1", "pass_at_2", "pass_at_4", "maj_at_1", "maj_at_4", "reward/math_verify"}
    assert m["pass_at_1"] <= m["pass_at_2"] <= m["pass_at_4"] and m["maj_at_1"] == pytest.approx(
        m["pass_at_1"]
    )
    assert "accuracy" in out and "pass_at_4" in out and str(out_file) in out
    # A device verifier (token match), greedy only.
    spec = '{"name": "answer_match", "params": {"ignore_ids": ["<|im_end|>"]}}'
    code, out, err = _run(
        capsys, SFT_MODEL, "--data", data, "--template", "chatml", "--verifier", spec, "--max-new-tokens", "6",
        "--out", out_file,
    )  # fmt: skip
    device = json.loads(out_file.read_text())["metrics"]
    assert code == 0, err
    assert device["accuracy"] == pytest.approx(m["accuracy"]) and "reward/answer_match" in device


# ------------------------------------------------------------------------------------------ in training


@pytest.mark.slow
def test_eval_sets_are_logged_per_set_during_training_and_a_run_dir_is_a_target(capsys, tmp_path):
    from jaxrl_llm.train import __main__ as train_main

    sets = [
        {"name": "arith", "path": "synthetic:arithmetic?n=4&digits=2&seed=7"},
        {"name": "rl", "path": "synthetic:arithmetic_rl?n=4&digits=2&seed=9", "n": 2, "max_new_tokens": 6},
    ]
    run_dir = tmp_path / "run"
    code = train_main.main(
        [
            "--config.stage=sft",
            f"--config.model.path={SFT_MODEL}",
            "--config.data.path=synthetic:arithmetic?n=64&digits=2",
            "--config.render.template=chatml",
            "--config.train.steps=2",
            "--config.optimizer.warmup_steps=0",
            "--config.optimizer.lr=1e-5",
            "--config.train.batch_size=4",
            "--config.train.seq_len=64",
            "--config.train.eval_every=2",
            "--config.train.save_every=2",
            "--config.train.eval_max_new_tokens=6",
            f"--config.eval.sets={json.dumps(sets)}",
            f"--config.run_dir={run_dir}",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (evaluated,) = [x for x in lines if x["split"] == "eval"]  # logged as eval/<set>/<metric>
    assert {
        "arith/perplexity",
        "arith/loss",
        "arith/accuracy",
        "rl/accuracy",
        "rl/pass_at_2",
        "rl/maj_at_2",
    } <= set(evaluated)
    assert evaluated["rl/accuracy"] >= 0.5 and evaluated["arith/perplexity"] < 2.0
    capsys.readouterr()
    code, out, err = _run(
        capsys, run_dir, "--data", "synthetic:arithmetic?n=4&digits=2&seed=7", "--max-new-tokens", "6"
    )
    assert code == 0, err
    written = json.loads((run_dir / "eval" / "arithmetic.json").read_text())
    assert written["template"] == "chatml" and written["metrics"]["perplexity"] == pytest.approx(
        evaluated["arith/perplexity"], rel=1e-4
    )
