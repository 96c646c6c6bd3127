"""The RL stages' parts on their own: the prompt table and its resumable order, the update batch's alignment
with the sampler, dynamic sampling's refill, rollout correction weights, the policy and PPO objectives'
reductions, and the one-iteration learn step (mu = 1 is REINFORCE with a baseline)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.objectives import PolicyLossConfig, policy_objective, ppo_objective, token_logps
from jaxrl_llm.objectives.rl import completion_logps, rollout_is_weights
from jaxrl_llm.render import Renderer, load_tokenizer
from jaxrl_llm.rollout import Rollout, SamplingParams, generate
from jaxrl_llm.train.rl_data import Prompts, PromptTable, prompt_batches
from jaxrl_llm.train.rl_groups import Sampled, Scores, informative, mark_unfilled, refill
from jaxrl_llm.train.rl_step import RLConfig, learn, rl_batch
from jaxrl_llm.train.state import TrainState
from jaxrl_llm.train.step import NO_FROZEN, build_update

ARCH = get_preset("llama-tiny", vocab_size=64, max_seq_len=64)
SFT_MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "models" / "arith-sft"


def _prompts(p: int, width: int = 6, seed: int = 0) -> Prompts:
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, ARCH.vocab_size, (p, width)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    return Prompts(
        ids, mask, np.zeros((p, 2), np.int32), np.zeros((p, 2), bool), np.arange(p, dtype=np.int32)
    )


def _rollout(model, prompts: Prompts, n: int, new: int = 5, temperature: float = 1.0) -> Rollout:
    from flax import nnx

    graphdef, params = nnx.split(model)
    return jax.jit(generate, static_argnums=0, static_argnames=("n", "max_new_tokens", "eos_ids"))(
        graphdef,
        params,
        jnp.asarray(prompts.ids),
        jnp.asarray(prompts.mask),
        jax.random.key(0),
        SamplingParams(temperature=temperature).as_arrays(),
        n=n,
        max_new_tokens=new,
        eos_ids=(3,),
    )


def test_prompt_table_renders_once_left_pads_and_encodes_answers():
    tokenizer = load_tokenizer(SFT_MODEL)
    renderer = Renderer(tokenizer, "chatml")
    records = [
        {"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "ground_truth": "3"},
        {"prompt": [{"role": "user", "content": "What is 10 + 20 + 30?"}], "ground_truth": 60},
        {"prompt": [{"role": "user", "content": "Hi"}]},
    ]
    table = PromptTable(records, renderer, pad_id=0)
    rendered = [renderer.render_prompt(r["prompt"]) for r in records]
    assert table.width >= max(map(len, rendered)) and table.width & (table.width - 1) == 0  # a power of two
    for i, ids in enumerate(rendered):
        np.testing.assert_array_equal(table.ids[i, table.width - len(ids) :], ids)
        assert table.mask[i].sum() == len(ids) and table.mask[i, -1] == 1
    np.testing.assert_array_equal(table.answer_ids[1, :2], tokenizer.encode("60"))
    assert not table.answer_mask[2].any()
    batch = table.batch(np.array([2, 0]))
    np.testing.assert_array_equal(batch.ids, table.ids[[2, 0]])
    assert batch.index.tolist() == [2, 0]


def test_prompt_batches_are_permutations_that_resume_exactly():
    it = iter(prompt_batches(10, 4, seed=3))
    first = [next(it).tolist() for _ in range(2)]
    assert len(set(first[0] + first[1])) == 8  # one epoch: no prompt twice
    state = it.get_state()
    want = [next(it).tolist() for _ in range(3)]
    resumed = iter(prompt_batches(10, 4, seed=3))
    resumed.set_state(state)
    assert [next(resumed).tolist() for _ in range(3)] == want


@pytest.mark.slow
def test_the_update_reads_the_log_probs_the_sampler_drew_with():
    model = create_model(ARCH, seed=1)
    prompts = _prompts(3)
    rolled = _rollout(model, prompts, n=2, temperature=1.7)
    batch = rl_batch(prompts, rolled, jnp.zeros(6), jnp.ones(6, bool), 2)
    mask = np.asarray(rolled.completion_mask)
    # At the rollout temperature the trainer's policy is the distribution the tokens were drawn from ...
    tempered, entropy = completion_logps(model, batch, temperature=1.7)
    np.testing.assert_allclose(np.asarray(tempered)[mask], np.asarray(rolled.logprobs)[mask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(batch["sampler_logps"]), np.asarray(rolled.logprobs))
    assert np.all(np.asarray(entropy) > 0)
    # ... and at temperature 1 the plain model's.
    logps, _ = completion_logps(model, batch)
    np.testing.assert_allclose(np.asarray(logps)[mask], np.asarray(rolled.model_logprobs)[mask], atol=2e-5)
    # Row by row, without padding: the same log-probs from a plain forward over prompt + completion.
    for r in range(6):
        prompt = prompts.ids[r // 2][prompts.mask[r // 2] > 0]
        completion = np.asarray(rolled.tokens[r])[mask[r]]
        seq = jnp.asarray(np.concatenate([prompt, completion])[None])
        want = token_logps(model(seq)[:, :-1], seq[:, 1:])[0, len(prompt) - 1 :]
        np.testing.assert_allclose(np.asarray(logps[r])[mask[r]], np.asarray(want), atol=2e-5)


def _sampled(totals: list[list[float]], p_offset: int = 0) -> Sampled:
    totals_arr = np.asarray(totals, np.float32)
    p, g = totals_arr.shape
    prompts = _prompts(p, seed=p_offset)
    prompts = prompts.replace(index=np.arange(p, dtype=np.int32) + p_offset)
    rows = p * g
    rolled = Rollout(
        tokens=np.tile(np.arange(rows, dtype=np.int32)[:, None] + 100 * p_offset, (1, 3)),
        completion_mask=np.ones((rows, 3), bool),
        logprobs=np.zeros((rows, 3), np.float32),
        model_logprobs=np.zeros((rows, 3), np.float32),
        lengths=np.full(rows, 3, np.int32),
        finish_reason=np.ones(rows, np.int32),
    )
    total = totals_arr.reshape(-1)
    scores = Scores(total, np.ones(rows, bool), {"r": total}, {"r": np.ones(rows, bool)})
    return Sampled(prompts, rolled, scores)


def test_refill_keeps_informative_groups_in_order_and_counts_the_slots():
    first = _sampled([[1, 1], [0, 1], [1, 1], [1, 0]])  # groups 1 and 3 are informative
    assert np.asarray(informative(first.scores, 2)).tolist() == [False, True, False, True]
    buffer, filled = refill(first, 0, first, 2)
    assert int(filled) == 2
    assert np.asarray(buffer.prompts.index)[:2].tolist() == [1, 3]
    second = _sampled([[0, 0], [2, 3], [5, 5], [4, 1]], p_offset=10)  # informative: 11, 13
    buffer, filled = refill(buffer, filled, second, 2)
    assert int(filled) == 4
    assert np.asarray(buffer.prompts.index).tolist() == [1, 3, 11, 13]
    # Rows move with their group: prompt 13's samples are second's rows 6 and 7.
    np.testing.assert_array_equal(np.asarray(buffer.rollout.tokens)[6:, 0], [1006, 1007])
    np.testing.assert_array_equal(np.asarray(buffer.scores.total), [0, 1, 1, 0, 2, 3, 4, 1])
    third = _sampled([[0, 1], [1, 0], [0, 0], [0, 0]], p_offset=20)
    full, filled = refill(buffer, filled, third, 2)  # nothing left to fill
    assert int(filled) == 4
    np.testing.assert_array_equal(np.asarray(full.scores.total), np.asarray(buffer.scores.total))
    partial = mark_unfilled(refill(first, 0, first, 2)[0], 2, 2)
    assert np.asarray(partial.scores.valid).tolist() == [True] * 4 + [False] * 4


def test_rollout_correction_weights_are_truncated_ratios():
    old = jnp.log(jnp.array([[0.5, 0.2, 0.9]]))
    sampler = jnp.log(jnp.array([[0.25, 0.4, 0.1]]))
    mask = jnp.array([[True, True, False]])
    token = rollout_is_weights(old, sampler, mask, "token", 2.0)
    np.testing.assert_allclose(np.asarray(token), [[2.0, 0.5, 0.0]], rtol=1e-6)
    sequence = rollout_is_weights(old, sampler, mask, "sequence", 5.0)
    np.testing.assert_allclose(np.asarray(sequence), [[1.0, 1.0, 0.0]], rtol=1e-6)  # 2 x 0.5


def _policy_batch(rows: int = 4, width: int = 3, new: int = 4, seed: int = 0):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(1, ARCH.vocab_size, (rows, width + new)).astype(np.int32)
    completion = np.ones((rows, new), bool)
    completion[1, 2:] = False
    return {
        "tokens": jnp.asarray(tokens),
        "attention_mask": jnp.asarray(np.concatenate([np.ones((rows, width), bool), completion], 1)),
        "completion_mask": jnp.asarray(completion),
        "advantages": jnp.asarray(rs.randn(rows).astype(np.float32)),
        "sampler_logps": jnp.zeros((rows, new), jnp.float32),
    }


@pytest.mark.slow
def test_one_update_an_iteration_is_reinforce_with_a_baseline():
    """mu = 1: the clipped loss's gradient is -sum_t A * grad log p / normaliser (the ratio is 1)."""
    from flax import nnx

    model = create_model(ARCH, seed=2)
    batch = _policy_batch()
    objective = policy_objective(PolicyLossConfig(loss_agg="token_mean"))
    graphdef, params = nnx.split(model, nnx.Param)

    def clipped(p):
        loss, _ = objective.loss(nnx.merge(graphdef, p), batch, jax.random.key(0))
        return loss / objective.normalizer(batch)

    def reinforce(p):
        logps, _ = completion_logps(nnx.merge(graphdef, p), batch)
        weights = batch["completion_mask"] * batch["advantages"][:, None]
        return -(logps * weights).sum() / batch["completion_mask"].sum()

    for a, b in zip(
        jax.tree.leaves(jax.grad(clipped)(params)), jax.tree.leaves(jax.grad(reinforce)(params)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_ppo_objective_adds_the_weighted_value_loss():
    from flax import nnx

    from jaxrl_llm.models.actor_critic import ActorCritic, critic_like
    from jaxrl_llm.objectives import value_loss
    from jaxrl_llm.objectives.rl import completion_values

    policy = create_model(ARCH, seed=3)
    model = ActorCritic(policy, critic_like(policy))
    nnx.update(model.critic, jax.tree.map(lambda x: x + 0.1, nnx.state(model.critic, nnx.Param)))
    batch = _policy_batch(seed=1)
    batch["advantages"] = jnp.broadcast_to(batch["advantages"][:, None], batch["completion_mask"].shape)
    batch["old_logps"] = completion_logps(policy, batch)[0]
    batch["returns"] = jnp.ones_like(batch["old_logps"])
    batch["old_values"] = jnp.zeros_like(batch["old_logps"])
    cfg = PolicyLossConfig()
    total, sums = ppo_objective(cfg, vf_coef=0.5, value_clip=10.0).loss(model, batch, jax.random.key(0))
    mask = batch["completion_mask"]
    values = completion_values(model.critic, batch)
    want_value = (value_loss(values, batch["old_values"], batch["returns"], mask, clip=10.0)[0]).sum()
    np.testing.assert_allclose(float(sums["value_loss"]), float(want_value), rtol=1e-5)
    want_policy = -(batch["advantages"] * mask).sum()  # ratio 1 at the old policy
    np.testing.assert_allclose(float(sums["policy_loss"]), float(want_policy), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(want_policy + 0.5 * want_value), rtol=1e-5)


@pytest.mark.parametrize("updates", [(1, 1), (2, 2)])
def test_learn_updates_as_many_times_as_configured_and_reports_the_metrics(updates):
    from flax import nnx

    num_iterations, minibatches = updates
    model = create_model(ARCH, seed=4)
    prompts = _prompts(4)
    rolled = _rollout(model, prompts, n=2)
    total = jnp.asarray(np.random.RandomState(0).rand(8).astype(np.float32))
    scores = Scores(total, jnp.ones(8, bool), {"r": total}, {"r": jnp.ones(8, bool)})
    cfg = RLConfig(group_size=2, max_new_tokens=5, num_iterations=num_iterations, minibatches=minibatches)
    tx = optax.sgd(0.1)
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    update = build_update(graphdef, policy_objective(cfg.policy), tx)
    sampled = Sampled(jax.tree.map(jnp.asarray, prompts), rolled, scores)
    new_state, metrics, advantages = jax.jit(
        lambda s, x: learn(update, graphdef, cfg, s, NO_FROZEN, x, jax.random.key(1))
    )(state, sampled)
    assert int(new_state.step) == num_iterations * minibatches
    grouped = np.asarray(advantages).reshape(4, 2)
    np.testing.assert_allclose(grouped.sum(axis=1), 0.0, atol=1e-5)  # group-mean baseline
    assert float(metrics["ratio/mean"]) == pytest.approx(1.0, abs=0.05)
    before = jax.tree.leaves(nnx.state(model, nnx.Param))
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_state.params), before, strict=True)]
    assert any(moved)
