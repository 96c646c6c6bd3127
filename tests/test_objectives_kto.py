"""KTO: the encoder, the pipeline's in-batch mismatched pairs, and the objective against the loss written
out by hand (TRL's formula) on a tiny model's log-probs, filler rows ignored, learning the labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.data.packing import kto_rows
from jaxrl_llm.data.pipeline import make_pipeline
from jaxrl_llm.data.records import DataError
from jaxrl_llm.data.synthetic import arithmetic_unpaired_records
from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.objectives import kto_objective, pair_logps
from jaxrl_llm.render import KTOEncoder, Renderer, load_tokenizer
from jaxrl_llm.train.state import TrainState
from jaxrl_llm.train.step import build_update
from tests.fixtures_tokenizers import make_hf_tokenizer_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(make_hf_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    renderer = Renderer(tok, "chatml")
    records = arithmetic_unpaired_records(6, seed=3)
    batch = next(
        iter(
            make_pipeline(records, KTOEncoder(renderer), batch_size=8, seq_len=64, mode="kto", shuffle=False)
        )
    )
    cfg = get_preset("llama-tiny", vocab_size=tok.vocab_size)
    return renderer, records, batch, cfg


def test_encoder_marks_the_completion_and_keeps_the_label(setup):
    renderer, records, _, _ = setup
    for record in records:
        out = KTOEncoder(renderer)(record)
        prompt = renderer.render_prompt(record["prompt"])
        assert out["prompt_len"] == len(prompt)
        np.testing.assert_array_equal(out["ids"][: len(prompt)], prompt)
        assert not out["loss_mask"][: len(prompt)].any() and out["loss_mask"][len(prompt) :].any()
        assert out["desirable"] == record["label"]
    with pytest.raises(Exception, match="prompt/completion/label"):
        KTOEncoder(renderer)({"prompt": records[0]["prompt"], "chosen": [], "rejected": []})


def test_each_row_pairs_its_prompt_with_the_previous_completion_of_the_batch(setup):
    renderer, records, batch, _ = setup
    encoded = [KTOEncoder(renderer)(r) for r in records]
    assert batch["tokens"].shape[0] == 8 and batch["desirable"].tolist() == [1, 0, 1, 0, 1, 0, 0, 0]
    for i, ex in enumerate(encoded):
        n, p = len(ex["ids"]), ex["prompt_len"]
        prev = encoded[i - 1]
        other = prev["ids"][prev["prompt_len"] :]
        # prompt | its completion | the previous example's completion
        np.testing.assert_array_equal(batch["tokens"][i, :n], ex["ids"])
        np.testing.assert_array_equal(batch["tokens"][i, n : n + len(other)], other)
        np.testing.assert_array_equal(batch["positions"][i, n : n + len(other)], np.arange(p, p + len(other)))
        seg = batch["segment_ids"][i]
        assert (seg == 1).sum() == p and (seg == 2).sum() == n - p and (seg == 3).sum() == len(other)
        assert batch["loss_mask"][i][seg == 3].sum() == prev["loss_mask"].sum()  # the other's targets
    assert not batch["loss_mask"][6:].any()  # filler rows


def test_mismatched_completions_are_cut_to_the_side_limit():
    short = {"ids": np.arange(1, 5, dtype=np.int32), "loss_mask": np.array([0, 0, 1, 1], bool)}
    long = {"ids": np.arange(11, 19, dtype=np.int32), "loss_mask": np.array([0] * 2 + [1] * 6, bool)}
    rows = kto_rows([short, long], [2, 2], (8, 16), max_side=8)
    assert len(rows[0]["tokens"]) == 16  # one bucket for the batch: that of its longest row
    # short's prompt and completion, then long's completion (6 tokens fit a side of 8)
    assert rows[0]["tokens"][:10].tolist() == [1, 2, 3, 4, 13, 14, 15, 16, 17, 18]
    assert rows[1]["tokens"][:10].tolist() == [11, 12, 13, 14, 15, 16, 17, 18, 3, 4]
    rows = kto_rows([long, long], [6, 6], (8, 16), max_side=8)
    assert (rows[0]["segment_ids"] == 3).sum() == 2  # 6 prompt tokens leave room for 2


def test_kto_mode_needs_an_encoder_with_prompt_len(setup):
    renderer, records, _, _ = setup
    from jaxrl_llm.render import SFTEncoder

    convs = [{"messages": r["prompt"] + r["completion"]} for r in records]
    with pytest.raises(DataError, match="prompt_len"):
        next(iter(make_pipeline(convs, SFTEncoder(renderer), batch_size=2, seq_len=64, mode="kto")))


def _by_hand(logps, ref, desirable, real, beta, wd, wu):
    """TRL's KTO loss over the real rows, from log-probs (float64 numpy)."""
    has_kl = real
    z = max(0.0, float(((logps[:, 1] - ref[:, 1]) * has_kl).sum() / has_kl.sum()))
    ratio = logps[:, 0] - ref[:, 0]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    losses = np.where(desirable, wd * (1 - sig(beta * (ratio - z))), wu * (1 - sig(beta * (z - ratio))))
    return (losses * real).sum() / real.sum(), z, beta * ratio


@pytest.mark.slow
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_objective_is_trls_kto_loss_over_the_real_rows(setup, weights):
    _, _, batch, cfg = setup
    policy, reference = create_model(cfg, seed=0), create_model(cfg, seed=1)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    ref = np.asarray(pair_logps(reference, jbatch)[0], np.float64)
    logps = np.asarray(pair_logps(policy, jbatch)[0], np.float64)
    real = (batch["loss_mask"] & (batch["segment_ids"] == 2)).any(-1)
    desirable = batch["desirable"].astype(bool)
    beta = 0.5
    objective = kto_objective(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    jbatch["ref_logps"] = jnp.asarray(ref, jnp.float32)
    loss_sum, sums = objective.loss(policy, jbatch, jax.random.key(0))
    norm = objective.normalizer(jbatch)
    metrics = objective.summarize(sums, norm)
    expected, z, rewards = _by_hand(logps, ref, desirable, real, beta, *weights)
    assert float(norm) == real.sum() == 6
    assert float(loss_sum / norm) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(z, rel=1e-5, abs=1e-6)
    assert float(metrics["rewards/chosen"]) == pytest.approx(rewards[real & desirable].mean(), rel=1e-5)
    assert float(metrics["rewards/rejected"]) == pytest.approx(rewards[real & ~desirable].mean(), rel=1e-5)
    assert float(metrics["count/desirable"]) == 3 and float(metrics["count/undesirable"]) == 3


@pytest.mark.slow
def test_kto_steps_raise_desirable_and_lower_undesirable_rewards(setup):
    _, _, batch, cfg = setup
    model = create_model(cfg, seed=0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    jbatch["ref_logps"] = pair_logps(model, jbatch)[0]
    tx = optax.adam(3e-3)
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    step = jax.jit(build_update(graphdef, kto_objective(beta=0.5), tx))
    first = None
    for _ in range(15):
        state, metrics = step(state, jbatch, jax.random.key(0))
        first = first or {k: float(v) for k, v in metrics.items()}
    assert first["loss"] == pytest.approx(0.5, abs=1e-4)  # 1 - sigmoid(0) for every row at the reference
    assert float(metrics["loss"]) < 0.3
    assert float(metrics["rewards/chosen"]) > 0 > float(metrics["rewards/rejected"])
    assert float(metrics["rewards/accuracies"]) == 1.0
