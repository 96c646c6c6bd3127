"""Stage ``ppo``: PPO with a critic (Ouyang et al. 2022's RLHF recipe; TRL's ``PPOTrainer``).

The trained model is an ``ActorCritic``: the policy and a critic (a value per token) on a separate copy of
the backbone, initialised from the policy (zero value head) or from a reward model's checkpoint
(``rl.critic_path``), trained together with one optimizer on ``policy loss + rl.vf_coef * value loss``. The
reference (a frozen copy of the initial policy) shapes the rewards. An iteration (``ppo_learn``):

1. the sampled completions (``rl.group_size`` per prompt; 1 is the classic setting) and their rewards
   (``reward.functions``: the sequence score at the last token);
2. one no-gradient pass for the policy's, the reference's log-probs and the critic's values;
3. per-token rewards: ``-kl_coef * (logp - ref_logp)`` on every token plus the score at the last one
   (``kl_shaped_rewards``); ``kl_coef`` is ``rl.kl_coef``, or adapted towards ``rl.kl_target`` (Ziegler
   et al. 2019) and carried in the training state;
4. GAE (``rl.gamma``, ``rl.lam``) gives advantages and returns; advantages are whitened over the batch's
   tokens (``rl.whiten_advantages``);
5. ``rl.num_iterations`` epochs of ``rl.minibatches`` updates of ``objectives.ppo_objective``: the clipped
   policy loss plus the clipped value loss (``rl.value_clip``).

Only the policy is exported (``final/``); checkpoints hold both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.models.actor_critic import ActorCritic, critic_like
from jaxrl_llm.objectives import adaptive_kl_coef, gae, kl_shaped_rewards, whiten
from jaxrl_llm.objectives.rl import completion_values

from .iteration import Plan, StageContext
from .loop import log
from .rl_data import PromptTable
from .rl_groups import Sampled
from .rl_iteration import PolicyAccess, RLParts
from .rl_step import (
    RLConfig,
    counted,
    epochs,
    logps_pass,
    no_grad_pass,
    reference_logps_of,
    rl_batch,
    sample_metrics,
)
from .setup import with_lora
from .state import Frozen, TrainState
from .step import UpdateFn

_f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO's own settings (``rl.*``)."""

    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> PPOConfig:
        r = cfg.rl
        return cls(
            gamma=float(r.gamma),
            lam=float(r.lam),
            kl_coef=float(r.kl_coef),
            kl_target=None if r.kl_target is None else float(r.kl_target),
            kl_horizon=float(r.kl_horizon),
            whiten_advantages=bool(r.whiten_advantages),
        )


def trainable(cfg: Any, run: Any) -> ActorCritic:
    """The policy with its critic: a copy of the policy's backbone, or ``rl.critic_path``'s reward model."""
    if cfg.rl.critic_path:
        from jaxrl_llm.models import load_hf

        critic = load_hf(
            cfg.rl.critic_path,
            dtype=cfg.model.param_dtype,
            compute_dtype=cfg.model.dtype,
            mesh=run.mesh,
            head="score",
        )
        log(f"ppo: critic from {cfg.rl.critic_path}")
    else:
        critic = critic_like(run.model, mesh=run.mesh)
        log("ppo: critic initialised from the policy's backbone with a zero value head")
    # With LoRA the critic gets adapters of its own on its (frozen) backbone; its value head trains fully.
    return ActorCritic(run.model, with_lora(cfg, critic, run.mesh))


def initial_extra(cfg: Any) -> dict[str, jax.Array]:
    return {"kl_coef": jnp.asarray(cfg.rl.kl_coef, _f32)}


def ppo_learn(
    update: UpdateFn,
    graphdef: nnx.GraphDef,
    cfg: RLConfig,
    ppo: PPOConfig,
    state: TrainState,
    frozen: Frozen,
    sampled: Sampled,
    key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """One PPO iteration's learning (module docstring, steps 2-5); returns the per-row mean advantage."""
    g, prompts, rolled, scores = cfg.group_size, sampled.prompts, sampled.rollout, sampled.scores
    valid = counted(sampled, cfg)
    batch = rl_batch(prompts, rolled, jnp.zeros_like(scores.total), valid, g)
    mask = batch["completion_mask"]
    chunks = cfg.minibatches * cfg.accum_steps
    model = lambda: nnx.merge(graphdef, state.params)
    temperature = cfg.policy.temperature
    old_logps = logps_pass(lambda: model().policy, batch, chunks, temperature)
    values = _values_pass(lambda: model().critic, batch, chunks)
    coef = state.extra["kl_coef"]
    if "reference" in frozen.names or sampled.ref_logps is not None:
        ref_logps = reference_logps_of(frozen, state.params, sampled, batch, chunks, temperature)
    else:
        ref_logps = old_logps
    rewards = kl_shaped_rewards(jnp.where(valid, scores.total, 0.0), old_logps, ref_logps, mask, kl_coef=coef)
    advantages, returns = gae(rewards, values, mask, gamma=ppo.gamma, lam=ppo.lam)
    if ppo.whiten_advantages:
        advantages = whiten(advantages, mask)
    batch |= {"advantages": advantages, "returns": returns, "old_values": values, "old_logps": old_logps}
    state, metrics = epochs(update, cfg, state, batch, key)
    # The policy's KL to the reference over this iteration's samples: the sum of k1 over each sequence.
    kl = (jnp.where(mask, old_logps - ref_logps, 0.0).sum(axis=1) * valid).sum() / jnp.maximum(valid.sum(), 1)
    if ppo.kl_target is not None:
        new_coef = adaptive_kl_coef(coef, kl, valid.shape[0], target=ppo.kl_target, horizon=ppo.kl_horizon)
        state = state.replace(extra={**state.extra, "kl_coef": new_coef})
    per_row = jnp.where(mask, advantages, 0.0).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)
    metrics = {**metrics, **sample_metrics(sampled, per_row, valid, g), "kl_coef": coef, "kl/sequence": kl}
    return state, metrics, per_row


def _values_pass(critic_fn, batch, chunks: int) -> jax.Array:
    """float32[R, N] the critic's values, no gradient, in ``chunks`` micro-batches."""
    return no_grad_pass(lambda mb: completion_values(critic_fn(), mb), batch, chunks)


def ppo_plan(ctx: StageContext) -> Plan:
    from .grpo import iteration_flops, rl_plan, rollout_graphdef

    run = ctx.run
    ppo = PPOConfig.from_config(ctx.cfg)
    policy_graphdef = nnx.split(run.model, nnx.Param)[0]  # the policy alone (ctx.graphdef: the actor-critic)

    def parts(cfg: RLConfig, rewards: Any, table: PromptTable) -> RLParts:
        update = ctx.update(cfg.accum_steps)
        reference = bool(ctx.frozen.names) or ctx.apart is not None
        passes = 3 * cfg.num_iterations + 2 + reference  # + old log-probs and values, the reference's
        return RLParts(
            cfg=cfg,
            rewards=rewards,
            table=table,
            learn=functools.partial(ppo_learn, update, ctx.graphdef, cfg, ppo),
            policy=PolicyAccess(
                rollout_graphdef(policy_graphdef, run.model, ctx.cfg.rollout.dtype),
                lambda params: params["policy"],
            ),
            frozen=ctx.frozen,
            reference=ctx.apart,
            flops=iteration_flops(
                run.model.cfg, int(ctx.cfg.rl.prompts_per_iteration), table.width, cfg, passes
            ),
        )

    kl = f"adaptive KL -> {ppo.kl_target}" if ppo.kl_target is not None else f"KL coef {ppo.kl_coef}"
    return rl_plan(ctx, parts, f"ppo (GAE gamma {ppo.gamma} lambda {ppo.lam}, {kl})")
