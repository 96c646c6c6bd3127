"""Pairwise objectives: pair rows and encoding, log-probs against per-sequence forwards, each objective's
loss against its pure loss on those log-probs, filler pairs ignored, accumulation, and DPO learning to
prefer the chosen answers of its batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_llm.data.packing import pad_pair
from jaxrl_llm.data.synthetic import arithmetic_preference_records
from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.objectives import (
    bradley_terry_loss,
    dpo_loss,
    dpo_objective,
    orpo_loss,
    orpo_objective,
    pair_logps,
    reference_logps,
    rm_objective,
    simpo_loss,
    simpo_objective,
)
from jaxrl_llm.render import PairEncoder, Renderer, load_tokenizer
from jaxrl_llm.train.state import TrainState
from jaxrl_llm.train.step import build_update
from tests.fixtures_tokenizers import make_hf_tokenizer_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(make_hf_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    renderer = Renderer(tok, "chatml")
    records = arithmetic_preference_records(6, seed=1)
    encoder = PairEncoder(renderer)
    pairs = [encoder(r) for r in records]
    rows = [
        pad_pair(p["chosen"], p["rejected"], (128,), prompt_len=p["prompt_len"], max_side=64) for p in pairs
    ]
    filler = {k: np.zeros_like(v) for k, v in rows[0].items()}  # what the batcher pads a batch with
    batch = {k: np.stack([r[k] for r in [*rows, filler]]) for k in rows[0]}
    cfg = get_preset("llama-tiny", vocab_size=tok.vocab_size)
    return renderer, records, pairs, batch, cfg


def test_pair_encoder_trains_only_on_the_answer(setup):
    renderer, records, pairs, batch, _ = setup
    for record, pair in zip(records, pairs, strict=True):
        start = len(renderer.render_prompt(record["prompt"]))
        for side in ("chosen", "rejected"):
            ids, mask = pair[side]["ids"], pair[side]["loss_mask"]
            assert not mask[:start].any() and mask[start:].any()
            answer = renderer.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            assert answer.strip() == record[side][0]["content"]  # plus the end-of-turn the template writes
    assert batch["tokens"].shape == (7, 128)
    # prompt | chosen | rejected: the prompt once, each answer positioned right after it
    pair, p = pairs[0], pairs[0]["prompt_len"]
    a, r = len(pair["chosen"]["ids"]) - p, len(pair["rejected"]["ids"]) - p
    np.testing.assert_array_equal(batch["segment_ids"][0, : p + a + r], [1] * p + [2] * a + [3] * r)
    np.testing.assert_array_equal(batch["tokens"][0, : p + a], pair["chosen"]["ids"])
    np.testing.assert_array_equal(batch["tokens"][0, p + a : p + a + r], pair["rejected"]["ids"][p:])
    np.testing.assert_array_equal(batch["positions"][0, p + a : p + a + r], np.arange(p, p + r))
    assert batch["shared"][0].sum() == p and not batch["segment_ids"][0, p + a + r :].any()


def manual_logps(model, pair):
    """Summed and mean answer log-probs of both sides, each from its own unpadded forward."""
    out = []
    for side in ("chosen", "rejected"):
        ids, mask = pair[side]["ids"], pair[side]["loss_mask"]
        logp = jax.nn.log_softmax(np.asarray(model(jnp.asarray(ids)[None]))[0, :-1], axis=-1)
        picked = logp[np.arange(len(ids) - 1), ids[1:]] * mask[1:]
        out.append((float(picked.sum()), float(picked.sum() / mask[1:].sum())))
    return out


@pytest.mark.slow
def test_pair_logps_equal_per_sequence_forwards(setup):
    _, _, pairs, batch, cfg = setup
    model = create_model(cfg, seed=0)
    logps, counts, _ = pair_logps(model, {k: jnp.asarray(v) for k, v in batch.items()})
    for i, pair in enumerate(pairs):
        (c, _), (r, _) = manual_logps(model, pair)
        np.testing.assert_allclose(np.asarray(logps[i]), [c, r], atol=1e-4)
        assert counts[i, 0] == pair["chosen"]["loss_mask"][1:].sum()
    assert float(logps[-1].sum()) == 0.0  # the filler pair


def run_loss(objective, model, batch):
    loss_sum, sums = objective.loss(model, batch, jax.random.key(0))
    pairs = objective.normalizer(batch)
    return float(loss_sum / pairs), objective.summarize(sums, pairs)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_objective_is_dpo_loss_on_the_pairs(setup, loss_type):
    _, _, pairs, batch, cfg = setup
    policy, reference = create_model(cfg, seed=0), create_model(cfg, seed=1)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["ref_logps"] = jax.jit(lambda b: reference_logps(reference, b))(batch)
    loss, metrics = run_loss(dpo_objective(beta=0.2, loss_type=loss_type), policy, batch)
    mine = [manual_logps(policy, p) for p in pairs]
    ref = [manual_logps(reference, p) for p in pairs]
    pick = 1 if loss_type == "ipo" else 0  # ipo: length-averaged log-probs
    args = [np.array([m[side][pick] for m in rows]) for rows in (mine, ref) for side in (0, 1)]
    want, chosen_r, rejected_r = dpo_loss(*args, beta=0.2, loss_type=loss_type)
    assert loss == pytest.approx(float(want.mean()), rel=1e-4, abs=1e-5)  # the filler pair counts for nothing
    assert float(metrics["pairs"]) == len(pairs)
    assert float(metrics["rewards/margins"]) == pytest.approx(float((chosen_r - rejected_r).mean()), abs=1e-4)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(float((chosen_r > rejected_r).mean()))


@pytest.mark.slow  # ~24 s
def test_simpo_orpo_and_rm_objectives(setup):
    _, _, pairs, batch, cfg = setup
    model = create_model(cfg, seed=0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    mine = [manual_logps(model, p) for p in pairs]
    chosen_mean = np.array([m[0][1] for m in mine])
    rejected_mean = np.array([m[1][1] for m in mine])
    loss, _ = run_loss(simpo_objective(beta=2.0, gamma=0.5), model, jbatch)
    want = simpo_loss(chosen_mean, rejected_mean, beta=2.0, gamma=0.5)
    assert loss == pytest.approx(float(want.mean()), rel=1e-4)
    loss, metrics = run_loss(orpo_objective(beta=0.1), model, jbatch)
    ratio, _ = orpo_loss(chosen_mean, rejected_mean, beta=0.1)
    assert loss == pytest.approx(float((-chosen_mean + ratio).mean()), rel=1e-4)
    assert float(metrics["nll"]) == pytest.approx(float(-chosen_mean.mean()), rel=1e-4)

    scorer = create_model(cfg, seed=2, head="score")
    loss, metrics = run_loss(rm_objective(center_coef=0.01), scorer, jbatch)
    scores = []
    for pair in pairs:
        scores.append(
            [
                float(np.asarray(scorer(jnp.asarray(pair[s]["ids"])[None]))[0, -1])
                for s in ("chosen", "rejected")
            ]
        )
    scores = np.array(scores)
    want = bradley_terry_loss(scores[:, 0], scores[:, 1], center_coef=0.01)
    assert loss == pytest.approx(float(want.mean()), rel=1e-4)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(float((scores[:, 0] > scores[:, 1]).mean()))


@pytest.mark.slow
def test_accumulation_keeps_pairs_whole_and_equals_one_batch(setup):
    _, _, _, batch, cfg = setup
    model = create_model(cfg, seed=0)
    reference = create_model(cfg, seed=1)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "num_truncated"}
    batch = {k: jnp.concatenate([v, v[:1]]) for k, v in batch.items()}  # 8 pairs: divisible by 2 and 4
    batch["ref_logps"] = reference_logps(reference, batch)
    tx = optax.sgd(0.1)
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    results = []
    for accum in (1, 2, 4):
        step = jax.jit(build_update(graphdef, dpo_objective(beta=0.1), tx, accum_steps=accum))
        new_state, metrics = step(state, batch, jax.random.key(1))
        results.append((new_state.params, float(metrics["loss"])))
    for params_k, loss_k in results[1:]:
        assert loss_k == pytest.approx(results[0][1], rel=1e-5)
        for a, b in zip(jax.tree.leaves(params_k), jax.tree.leaves(results[0][0]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_dpo_steps_widen_the_margin(setup):
    _, _, _, batch, cfg = setup
    model = create_model(cfg, seed=0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["ref_logps"] = reference_logps(model, batch)  # the initial policy is the reference
    objective = dpo_objective(beta=0.1)
    graphdef, state = nnx.split(model)
    tx = optax.adam(1e-3)
    opt = tx.init(state)

    @jax.jit
    def step(state, opt):
        def loss_fn(s):
            loss_sum, sums = objective.loss(nnx.merge(graphdef, s), batch, jax.random.key(0))
            return loss_sum / objective.normalizer(batch), sums

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        updates, opt = tx.update(grads, opt, state)
        return (
            optax.apply_updates(state, updates),
            opt,
            objective.summarize(sums, objective.normalizer(batch)),
        )

    first = None
    for _ in range(30):
        state, opt, metrics = step(state, opt)
        first = first or {k: float(v) for k, v in metrics.items()}
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert float(metrics["rewards/margins"]) > 1.0
    assert float(metrics["rewards/accuracies"]) == 1.0
    assert float(metrics["loss"]) < 0.5 * first["loss"]
