"""One RL iteration as pure functions: sample, score, compute advantages, update (mu epochs x minibatches).

    rollout(params, prompts, key, sampling)         -> Rollout            G samples per prompt (generate)
    device_scores(prompts, rollout)                 -> Scores             device rewards, weighted
    learn(state, frozen, sampled, key)              -> (state, metrics)   advantages, old/ref log-probs,
                                                                          the policy updates
    iteration(state, frozen, prompts, key, sampling) -> (state, metrics, IterationLog)

``iteration`` composes the three into one compiled program (only device rewards: no host round trip), with
DAPO's dynamic sampling (``rl_groups``) as a ``while_loop`` of further rollout rounds when enabled.
With host rewards the stage compiles ``rollout`` and ``learn`` separately and scores the decoded text on
the host in between, one device -> host -> device trip an iteration (``grpo.RLIteration``); both paths run
the same ``learn``.

``learn``: row ``i * G + j`` is sample ``j`` of prompt ``i``. Advantages come from ``group_advantages``
over the samples that count (``Scores.valid``: not excluded by a failing reward; with ``mask_truncated``
not cut at ``max_new_tokens``). The policy's log-probs before the updates (``old_logps``) are computed once
in a no-gradient pass when there is more than one update an iteration, and the reference's
(``ref_logps``) when ``beta > 0``, both in micro-batches of the training size. Then ``num_iterations``
epochs, each a fresh permutation of the rows split into ``minibatches``, each minibatch one optimizer
update through the step factory's ``update`` (same optimizer, accumulation, shardings) under
``lax.scan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrl_llm.objectives import group_advantages
from jaxrl_llm.objectives.rl import PolicyLossConfig, completion_logps
from jaxrl_llm.parallel import constrain
from jaxrl_llm.reward.device import SampleArrays
from jaxrl_llm.rollout import Rollout, SamplingParams, generate

from .rl_data import Prompts
from .rl_groups import Sampled, Scores, sample_groups
from .state import Frozen, TrainState
from .step import NO_FROZEN, UpdateFn, micro_batches

_f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """What an RL iteration does (``rl.*`` and ``rollout.*`` keys, resolved; see ``grpo.rl_config``)."""

    group_size: int
    max_new_tokens: int
    num_iterations: int = 1
    minibatches: int = 1
    accum_steps: int = 1
    baseline: str = "group_mean"
    scale: str = "group_std"
    advantage_eps: float = 1e-4
    mask_truncated: bool = False
    eos_ids: tuple[int, ...] = ()
    stops: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0
    policy: PolicyLossConfig = PolicyLossConfig()
    dynamic_sampling: bool = False
    extra_rounds: int = 0  # with dynamic_sampling: rollouts an iteration may add to refill flat groups

    @property
    def rounds(self) -> int:
        """Prompt batches an iteration draws (one per possible rollout round)."""
        return 1 + self.extra_rounds if self.dynamic_sampling else 1

    @property
    def updates(self) -> int:
        """Optimizer updates an iteration."""
        return self.num_iterations * self.minibatches

    @property
    def recompute_old(self) -> bool:
        """Whether ``old_logps`` need their own pass (more than one update an iteration)."""
        return self.updates > 1


@struct.dataclass
class IterationLog:
    """What an iteration keeps for its logged samples and histograms (rows ``R``; left on the device until a
    log step fetches it)."""

    index: jax.Array  # int32[P] the prompts' records
    tokens: jax.Array  # int32[R, N]
    lengths: jax.Array  # int32[R]
    finish_reason: jax.Array  # int32[R]
    rewards: jax.Array  # float32[R]
    advantages: jax.Array  # float32[R]
    valid: jax.Array  # bool[R] Scores.valid: the reward counts
    components: dict[str, jax.Array]  # float32[R] each reward component, unweighted
    applies: dict[str, jax.Array]  # bool[R] where each component applies

    @classmethod
    def of(cls, sampled: Sampled, advantages: jax.Array) -> IterationLog:
        rolled, scores = sampled.rollout, sampled.scores
        return cls(
            sampled.prompts.index,
            rolled.tokens,
            rolled.lengths,
            rolled.finish_reason,
            scores.total,
            advantages,
            scores.valid,
            dict(scores.components),
            dict(scores.applies),
        )


def repeat_rows(x: jax.Array, n: int) -> jax.Array:
    """Each row ``n`` times (row ``i`` -> rows ``i*n .. i*n+n-1``), kept split over the data axes."""
    return constrain(jnp.repeat(x, n, axis=0), ("batch",) + (None,) * (x.ndim - 1))


def rollout(
    graphdef: nnx.GraphDef,
    params: Any,
    prompts: Prompts,
    key: jax.Array,
    sampling: SamplingParams,
    cfg: RLConfig,
) -> Rollout:
    """``group_size`` completions per prompt (``rollout.generate``)."""
    return generate(
        graphdef,
        params,
        prompts.ids,
        prompts.mask,
        key,
        sampling,
        n=cfg.group_size,
        max_new_tokens=cfg.max_new_tokens,
        eos_ids=cfg.eos_ids,
        stops=cfg.stops,
        pad_id=cfg.pad_id,
    )


def sample_arrays(prompts: Prompts, rollout: Rollout, group_size: int) -> SampleArrays:
    """What device rewards see, one row per sample (the prompt and its answer repeated for its group)."""
    return SampleArrays(
        prompt_ids=repeat_rows(prompts.ids, group_size),
        prompt_mask=repeat_rows(prompts.mask, group_size).astype(bool),
        completion_ids=rollout.tokens,
        completion_mask=rollout.completion_mask,
        answer_ids=repeat_rows(prompts.answer_ids, group_size),
        answer_mask=repeat_rows(prompts.answer_mask, group_size),
    )


def device_scores(
    components_fn: Callable[[SampleArrays], dict[str, jax.Array]],
    weights: Mapping[str, float],
    prompts: Prompts,
    rollout: Rollout,
    group_size: int,
) -> Scores:
    """Every device reward of every sample, and their weighted total (all samples count)."""
    components = components_fn(sample_arrays(prompts, rollout, group_size))
    total = sum(jnp.float32(weights[k]) * v for k, v in components.items())
    applies = {k: jnp.ones(v.shape, bool) for k, v in components.items()}
    return Scores(jnp.asarray(total, _f32), jnp.ones(rollout.lengths.shape, bool), components, applies)


def _group_stats(prefix: str, values, applies, group_size: int) -> dict[str, jax.Array]:
    """Mean/std/min/max over the samples a value applies to, and the groups' spread (``RewardResult.metrics``
    names, plus ``group_std``: the mean within-group standard deviation)."""
    count = applies.sum(dtype=_f32)
    mean = jnp.where(applies, values, 0.0).sum() / jnp.maximum(count, 1.0)
    var = jnp.where(applies, jnp.square(values - mean), 0.0).sum() / jnp.maximum(count, 1.0)
    groups = values.reshape(-1, group_size)
    group_std = groups.std(axis=1)
    return {
        f"{prefix}/mean": mean,
        f"{prefix}/std": jnp.sqrt(var),
        f"{prefix}/min": jnp.where(applies, values, jnp.inf).min(),
        f"{prefix}/max": jnp.where(applies, values, -jnp.inf).max(),
        f"{prefix}/applies": count / values.shape[0],
        f"{prefix}/group_std": group_std.mean(),
        f"{prefix}/zero_std_groups": (group_std == 0).mean(),
    }


def reward_metrics(scores: Scores, group_size: int) -> dict[str, jax.Array]:
    out = {}
    for key, values in scores.components.items():
        out |= _group_stats(f"reward/{key}", values, scores.applies[key], group_size)
    return out | _group_stats("reward/total", scores.total, scores.valid, group_size)


def advantage_metrics(rewards, advantages, valid, group_size: int) -> dict[str, jax.Array]:
    """Advantage statistics over the samples that count, and the baseline bias: the mean gap between the
    group-mean baseline (which includes the sample's own reward) and the leave-one-out one."""
    count = jnp.maximum(valid.sum(dtype=_f32), 1.0)
    on = lambda x: jnp.where(valid, x, 0.0)
    mean = on(advantages).sum() / count
    groups = rewards.reshape(-1, group_size)
    group_mean = jnp.repeat(groups.mean(axis=1), group_size)
    loo = (jnp.repeat(groups.sum(axis=1), group_size) - rewards) / max(group_size - 1, 1)
    return {
        "advantage/mean": mean,
        "advantage/std": jnp.sqrt(on(jnp.square(advantages - mean)).sum() / count),
        "advantage/min": jnp.where(valid, advantages, jnp.inf).min(),
        "advantage/max": jnp.where(valid, advantages, -jnp.inf).max(),
        "advantage/zero": on(advantages == 0).sum() / count,
        "advantage/baseline_bias": jnp.abs(group_mean - loo).mean()
        if group_size > 1
        else jnp.zeros((), _f32),
    }


def completion_metrics(rollout: Rollout) -> dict[str, jax.Array]:
    lengths = rollout.lengths.astype(_f32)
    return {
        "completion/length_mean": lengths.mean(),
        "completion/length_max": lengths.max(),
        "completion/truncated": (rollout.finish_reason == 0).mean(dtype=_f32),
        "completion/tokens": lengths.sum(),
    }


def rl_batch(
    prompts: Prompts, rollout: Rollout, advantages, loss_rows, group_size: int
) -> dict[str, jax.Array]:
    """The update's batch (``objectives.rl``): rows ``prompt | completion``."""
    ids, mask = repeat_rows(prompts.ids, group_size), repeat_rows(prompts.mask, group_size)
    return {
        "tokens": jnp.concatenate([ids, rollout.tokens], axis=1),
        "attention_mask": jnp.concatenate([mask.astype(bool), rollout.completion_mask], axis=1),
        "completion_mask": rollout.completion_mask & loss_rows[:, None],
        "advantages": advantages,
        "sampler_logps": rollout.logprobs,
    }


def no_grad_pass(
    fn: Callable[[dict[str, jax.Array]], jax.Array], batch: Mapping[str, jax.Array], chunks: int
):
    """``fn(rows) -> [rows, N]`` over the batch's ``prompt | completion`` rows with no gradient, in ``chunks``
    micro-batches (strided, as the step factory splits, so each spreads over the devices)."""
    keys = ("tokens", "attention_mask", "completion_mask")
    rows = batch["tokens"].shape[0]
    micro = micro_batches({k: batch[k] for k in keys}, chunks)
    out = jax.lax.map(lambda mb: jax.lax.stop_gradient(fn(mb)), micro)
    return out.swapaxes(0, 1).reshape(rows, -1)


def logps_pass(
    model_fn: Callable[[], Any], batch: Mapping[str, jax.Array], chunks: int, temperature: float = 1.0
) -> jax.Array:
    """float32[R, N] completion log-probs under ``model_fn()`` at ``temperature``, no gradient, in ``chunks``
    micro-batches."""
    return no_grad_pass(lambda mb: completion_logps(model_fn(), mb, temperature)[0], batch, chunks)


def epochs(update: UpdateFn, cfg: RLConfig, state: TrainState, batch, key) -> tuple[TrainState, dict]:
    """``num_iterations`` epochs of ``minibatches`` updates: ``lax.scan`` over the updates, each on a
    minibatch gathered by a fresh permutation of the rows every epoch."""
    if cfg.updates == 1:
        return update(state, batch, key, NO_FROZEN)
    rows = batch["tokens"].shape[0]
    size = rows // cfg.minibatches
    epoch_keys = jax.random.split(jax.random.fold_in(key, 1), cfg.num_iterations)
    order = jax.vmap(lambda k: jax.random.permutation(k, rows))(epoch_keys)
    index = order.reshape(cfg.updates, size)
    keys = jax.random.split(key, cfg.updates)

    def body(state, xs):
        rows_, k = xs
        minibatch = {n: constrain(v[rows_], ("batch",) + (None,) * (v.ndim - 1)) for n, v in batch.items()}
        return update(state, minibatch, k, NO_FROZEN)

    state, stacked = jax.lax.scan(body, state, (index, keys))
    metrics = {k: v.mean() for k, v in stacked.items()}
    if "learning_rate" in stacked:
        metrics["learning_rate"] = stacked["learning_rate"][-1]
    return state, metrics


def counted(sampled: Sampled, cfg: RLConfig) -> jax.Array:
    """bool[R]: the samples the loss counts (valid rewards; with ``mask_truncated``, not cut at the budget)."""
    valid = sampled.scores.valid
    return valid & (sampled.rollout.finish_reason != 0) if cfg.mask_truncated else valid


def sample_metrics(sampled: Sampled, advantages, valid, group_size: int) -> dict[str, jax.Array]:
    """Rewards, advantages (per row) and completions of an iteration, and how many samples counted."""
    return {
        **reward_metrics(sampled.scores, group_size),
        **advantage_metrics(sampled.scores.total, advantages, valid, group_size),
        **completion_metrics(sampled.rollout),
        "samples/counted": valid.mean(dtype=_f32),
        "tokens": sampled.rollout.lengths.sum(dtype=_f32),
    }


def reference_logps_of(
    frozen: Frozen, params: Any, sampled: Sampled, batch: Mapping[str, jax.Array], chunks: int, temperature
) -> jax.Array:
    """The reference's completion log-probs: those computed on its own mesh (``sampled.ref_logps``), else a
    pass of the frozen ``reference`` here (a LoRA reference is the policy's own weights, adapters off)."""
    if sampled.ref_logps is not None:
        return sampled.ref_logps
    bound = frozen.bind(params)
    return logps_pass(lambda: bound.models()["reference"], batch, chunks, temperature)


def reference_logps(cfg: RLConfig, frozen: Frozen, sampled: Sampled) -> jax.Array:
    """float32[R, N]: the reference's log-probs of an iteration's samples as the update would compute them
    (the same rows, masks and micro-batches), run where the reference has a mesh of its own."""
    batch = rl_batch(
        sampled.prompts,
        sampled.rollout,
        jnp.zeros_like(sampled.scores.total),
        counted(sampled, cfg),
        cfg.group_size,
    )
    model = lambda: frozen.models()["reference"]
    return logps_pass(model, batch, cfg.minibatches * cfg.accum_steps, cfg.policy.temperature)


def learn(
    update: UpdateFn,
    graphdef: nnx.GraphDef,
    cfg: RLConfig,
    state: TrainState,
    frozen: Frozen,
    sampled: Sampled,
    key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """Advantages, old/reference log-probs and the updates (module docstring); also returns the advantages."""
    g, prompts, rolled, scores = cfg.group_size, sampled.prompts, sampled.rollout, sampled.scores
    valid = counted(sampled, cfg)
    advantages = group_advantages(
        scores.total, g, baseline=cfg.baseline, scale=cfg.scale, eps=cfg.advantage_eps, valid=valid
    )
    batch = rl_batch(prompts, rolled, advantages, valid, g)
    chunks, temperature = cfg.minibatches * cfg.accum_steps, cfg.policy.temperature
    if cfg.recompute_old:
        batch["old_logps"] = logps_pass(lambda: nnx.merge(graphdef, state.params), batch, chunks, temperature)
    if cfg.policy.beta > 0:
        batch["ref_logps"] = reference_logps_of(frozen, state.params, sampled, batch, chunks, temperature)
    state, metrics = epochs(update, cfg, state, batch, key)
    return state, {**metrics, **sample_metrics(sampled, advantages, valid, g)}, advantages


def iteration(
    learn_fn: Callable[..., tuple[TrainState, dict[str, jax.Array], jax.Array]],
    rollout_graphdef: nnx.GraphDef,
    policy_of: Callable[[Any], Any],
    cfg: RLConfig,
    components_fn: Callable[[SampleArrays], dict[str, jax.Array]],
    weights: Mapping[str, float],
    state: TrainState,
    frozen: Frozen,
    prompts: Prompts,
    key: jax.Array,
    sampling: SamplingParams,
) -> tuple[TrainState, dict[str, jax.Array], IterationLog]:
    """A whole iteration with device rewards only: one program, no host round trip. ``prompts`` holds
    ``cfg.rounds`` batches (dynamic sampling's refills); ``learn_fn(state, frozen, sampled, key)`` is the
    stage's (``learn`` here, or PPO's); ``policy_of(params)`` picks the policy out of the trained parameters."""
    sample_key, learn_key = jax.random.split(key)

    def sample_round(round_prompts: Prompts, round_key: jax.Array) -> Sampled:
        rolled = rollout(rollout_graphdef, policy_of(state.params), round_prompts, round_key, sampling, cfg)
        scores = device_scores(components_fn, weights, round_prompts, rolled, cfg.group_size)
        return Sampled(round_prompts, rolled, scores)

    if cfg.dynamic_sampling:
        sampled, extra = sample_groups(
            sample_round, prompts, sample_key, group_size=cfg.group_size, rounds=cfg.rounds
        )
    else:
        sampled, extra = sample_round(prompts, sample_key), {}
    state, metrics, advantages = learn_fn(state, frozen, sampled, learn_key)
    return state, {**metrics, **extra}, IterationLog.of(sampled, advantages)
