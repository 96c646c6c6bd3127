"""Stage ``grpo``: the GRPO family of online RL (GRPO, Dr.GRPO, DAPO, GSPO, RLOO, REINFORCE++, CISPO); and
what every RL stage shares: the ``rl.*`` / ``rollout.*`` settings resolved, the prompt table, the checks,
the iteration, evaluation and the report (``rl_plan``, which ``ppo`` uses too).

Each loop step is one RL iteration (``rl_iteration.RLIteration``): ``rl.prompts_per_iteration`` RL-prompt
records, rendered once into a ``PromptTable`` and drawn in shuffled batches whose position every checkpoint
saves; ``rl.group_size`` completions each (``rollout.*``: max_new_tokens, temperature, top_p, top_k, min_p,
stop strings; optionally in another compute dtype, ``rollout.dtype``); rewards from ``reward.functions``;
group advantages and ``rl.num_iterations`` epochs of ``rl.minibatches`` updates (``rl_step.learn``).
``rl.algorithm`` picks the family member's settings (``objectives.rl.RL_ALGORITHMS``); each ``rl.*`` key
left None takes it from there.

Evaluation (``train.eval_every``, and always before the first update): greedy answers to the held-out
prompts (``data.eval_split`` / ``data.eval_path``, at most ``rl.eval_prompts``) scored by the rewards; the
first and last ``eval/exact_match`` also go into ``summary.json`` as ``eval/exact_match_start`` and
``eval/exact_match``. The named ``eval.sets`` are evaluated too (``eval_sets``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jaxrl_llm.errors import UserError
from jaxrl_llm.models.flops import forward_flops
from jaxrl_llm.objectives.rl import PPO_DEFAULTS, RL_ALGORITHMS, PolicyLossConfig
from jaxrl_llm.parallel import data_split
from jaxrl_llm.reward import RewardSet
from jaxrl_llm.rollout import SamplingParams, end_of_turn_ids

from .eval_sets import eval_set_evaluators
from .iteration import Plan, StageContext
from .loop import log
from .rl_data import PromptTable
from .rl_eval import evaluator
from .rl_iteration import PolicyAccess, RLIteration, RLParts
from .rl_step import RLConfig, learn


def resolved(cfg: Any, key: str) -> Any:
    """``rl.<key>``, or where it is None the ``rl.algorithm`` preset's value (stage ppo: its own defaults)."""
    value = cfg.rl[key]
    if value is not None:
        return value
    return (PPO_DEFAULTS if cfg.stage == "ppo" else RL_ALGORITHMS[cfg.rl.algorithm])[key]


def policy_config(cfg: Any) -> PolicyLossConfig:
    """The policy loss's settings (``rl.*``, presets resolved)."""
    return PolicyLossConfig(
        loss=resolved(cfg, "loss"),
        loss_agg=resolved(cfg, "loss_agg"),
        importance_level=resolved(cfg, "importance_level"),
        clip_low=float(resolved(cfg, "clip_low")),
        clip_high=float(resolved(cfg, "clip_high")),
        dual_clip=cfg.rl.dual_clip,
        beta=float(cfg.rl.beta),
        kl_estimator=cfg.rl.kl_estimator,
        rollout_is=cfg.rl.rollout_is,
        rollout_is_cap=float(cfg.rl.rollout_is_cap),
        max_completion_length=int(cfg.rollout.max_new_tokens),
        temperature=float(cfg.rollout.temperature) or 1.0,
    )


def rl_config(cfg: Any, renderer: Any) -> RLConfig:
    """The resolved ``RLConfig`` of a validated config (EOS ids and stop sequences from the renderer)."""
    stops = []
    for text in cfg.rollout.stop:
        ids = renderer.encode(text).tolist()
        if not ids:
            raise UserError(f"rollout.stop: {text!r} encodes to no tokens")
        stops.append(tuple(ids))
    pad = renderer.tokenizer.pad_id
    return RLConfig(
        group_size=int(cfg.rl.group_size),
        max_new_tokens=int(cfg.rollout.max_new_tokens),
        num_iterations=int(cfg.rl.num_iterations),
        minibatches=int(cfg.rl.minibatches),
        accum_steps=int(cfg.train.grad_accum_steps),
        baseline=resolved(cfg, "baseline"),
        scale=resolved(cfg, "scale"),
        advantage_eps=float(cfg.rl.advantage_eps),
        mask_truncated=bool(cfg.rl.mask_truncated),
        eos_ids=tuple(int(i) for i in end_of_turn_ids(renderer)),
        stops=tuple(stops),
        pad_id=0 if pad is None else int(pad),
        policy=policy_config(cfg),
        dynamic_sampling=bool(resolved(cfg, "dynamic_sampling")),
        extra_rounds=int(cfg.rl.dynamic_sampling_rounds),
    )


def reference_if_penalised(cfg: Any) -> tuple[str, ...]:
    """The frozen reference exists only for a KL penalty (``rl.beta > 0``)."""
    return ("reference",) if cfg.rl.beta > 0 else ()


def sampling_params(cfg: Any) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p).validate()


def updates_per_step(cfg: Any) -> int:
    return int(cfg.rl.num_iterations) * int(cfg.rl.minibatches)


def check_mesh(cfg: Any, mesh: Any) -> None:
    """Rows the mesh cannot split evenly are a configuration error, named with the keys that set them."""
    split = data_split(mesh)
    p, g, m = (int(v) for v in (cfg.rl.prompts_per_iteration, cfg.rl.group_size, cfg.rl.minibatches))
    micro = p * g // m // int(cfg.train.grad_accum_steps)
    for what, rows in (
        ("rl.prompts_per_iteration", p),
        ("a micro-batch (prompts x group_size / rl.minibatches / train.grad_accum_steps)", micro),
    ):
        if rows % split:
            raise UserError(
                f"{what} = {rows} rows cannot be split over the mesh's {split} data-parallel devices "
                f"(parallel.data x parallel.fsdp); make it a multiple of {split}"
            )


def check_role_meshes(cfg: Any, roles: Any, rl: RLConfig) -> None:
    """The roles' meshes of their own must split their rows evenly: the rollout's prompts, the reference's
    micro-batches (its log-probs are computed in the update's micro-batches)."""
    p, g = int(cfg.rl.prompts_per_iteration), rl.group_size
    micro = p * g // (rl.minibatches * rl.accum_steps)
    for key, value, mesh, rows, what in (
        ("rollout.mesh", cfg.rollout.mesh, roles.rollout, p, "rl.prompts_per_iteration"),
        ("rl.reference_mesh", cfg.rl.reference_mesh, roles.reference, micro, "a micro-batch"),
    ):
        split = data_split(mesh)
        if rows % split:
            raise UserError(
                f"{what} = {rows} rows cannot be split over the {split} data-parallel devices of "
                f"{key}={value!r}; make it a multiple of {split}"
            )


def rollout_graphdef(graphdef: Any, model: Any, dtype: str) -> Any:
    """The policy's graph definition with the rollout's compute dtype (parameters unchanged)."""
    if not dtype or dtype == model.cfg.dtype:
        return graphdef
    from flax import nnx

    from jaxrl_llm.models.create import abstract_model
    from jaxrl_llm.models.lora import like

    other = like(model, abstract_model(model.cfg.replace(dtype=dtype)))  # a LoRA policy's adapters too
    return nnx.split(other, nnx.Param)[0]


def rl_plan(
    ctx: StageContext, parts: Callable[[RLConfig, RewardSet, PromptTable], RLParts], describe: str
) -> Plan:
    """An RL stage's plan: settings, prompts and rewards made and checked here, the stage's own ``RLParts``
    (its ``learn``, where its policy sits, its FLOPs) from ``parts(cfg, rewards, table)``."""
    c, run = ctx.cfg, ctx.run
    check_mesh(c, run.mesh)
    cfg = rl_config(c, run.renderer)
    check_role_meshes(c, run.roles, cfg)
    table = PromptTable(run.train_records, run.renderer, pad_id=cfg.pad_id, what="data.path")
    limit = run.model.cfg.max_seq_len
    if table.width + cfg.max_new_tokens > limit:
        raise UserError(
            f"prompts of up to {table.longest} tokens (padded to {table.width}) + rollout.max_new_tokens="
            f"{cfg.max_new_tokens} exceed the model's max_seq_len {limit}: lower rollout.max_new_tokens or drop "
            "long prompts with data.max_tokens"
        )
    rewards = RewardSet.from_config(c, tokenizer=run.tokenizer, mesh=run.roles.reward)
    if run.roles.reward is not None and not rewards.models:
        raise UserError(
            f"reward.mesh={c.reward.mesh!r}: no reward_model among reward.functions to place there; leave "
            "reward.mesh empty"
        )
    it = RLIteration(
        parts(cfg, rewards, table),
        run.mesh,
        run.tokenizer,
        prompts=int(c.rl.prompts_per_iteration),
        sampling=sampling_params(c),
        seed=c.seed,
        log_samples=int(c.rl.log_samples),
        samples_path=run.run_dir / "samples.jsonl",
        rollout_mesh=run.roles.rollout,
        off_policy=bool(c.rollout.off_policy),
        reference_mesh=run.roles.reference if ctx.apart is not None else None,
    )
    if it.fused:
        programs = "one compiled program (device rewards)"
    elif run.roles.rollout is not None:
        stale = ", one step off-policy" if c.rollout.off_policy else ""
        programs = f"rollouts on their own mesh {dict(run.roles.rollout.shape)}{stale}, scored on the host"
    else:
        programs = "rollout and update programs, host rewards between"
    log(
        f"rl: {describe}, {it.prompts} prompts x {cfg.group_size} samples an iteration, {cfg.updates} update(s); "
        f"{programs}"
    )
    held_out = run.eval_records[: c.rl.eval_prompts] if c.rl.eval_prompts else run.eval_records
    evaluators = [evaluator(it, held_out, run.renderer)] if held_out else []
    evaluators += eval_set_evaluators(ctx, it.parts.policy.of)
    signature = {
        "rl.prompts_per_iteration": it.prompts,
        "rl.group_size": cfg.group_size,
        "rl.dynamic_sampling": cfg.dynamic_sampling,
        "seed": c.seed,
        "processes": jax.process_count(),
        "training data (content hash)": run.loaded.content_hash,
    }
    return Plan(it, signature, evaluators, functools.partial(_report, run.run_dir), eval_at_start=True)


def _report(run_dir: Any, summary: dict[str, Any]) -> dict[str, Any]:
    final, first, train = summary["final_eval"], summary["first_eval"], summary["final_train"]
    shown = {k: train[k] for k in ("reward/total/mean", "loss", "kl", "completion/length_mean") if k in train}
    log(
        f"done: {summary['steps']} iterations; "
        + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        + f"; summary in {run_dir / 'summary.json'}"
    )
    if "exact_match" not in final:
        return {}
    log(
        f"held-out greedy exact match: {final['exact_match']:.1%} of {final['samples']:.0f} prompts "
        f"(before training: {first.get('exact_match', float('nan')):.1%})"
    )
    return {"eval/exact_match": final["exact_match"], "eval/exact_match_start": first.get("exact_match")}


def iteration_flops(arch: Any, prompts: int, width: int, cfg: RLConfig, passes: int) -> float:
    """Matmul FLOPs of an iteration: the prefill, the decode (the cache's attention left out) and ``passes``
    forwards over the ``prompt | completion`` rows (3 an update epoch, 1 a no-gradient pass)."""
    rows = prompts * cfg.group_size
    return (
        forward_flops(arch, prompts, width)
        + forward_flops(arch, rows, cfg.max_new_tokens)
        + passes * forward_flops(arch, rows, width + cfg.max_new_tokens)
    )


def grpo_plan(ctx: StageContext) -> Plan:
    run = ctx.run

    def parts(cfg: RLConfig, rewards: RewardSet, table: PromptTable) -> RLParts:
        update = ctx.update(cfg.accum_steps)
        passes = 3 * cfg.num_iterations + cfg.recompute_old + (cfg.policy.beta > 0)
        return RLParts(
            cfg=cfg,
            rewards=rewards,
            table=table,
            learn=functools.partial(learn, update, ctx.graphdef, cfg),
            policy=PolicyAccess(rollout_graphdef(ctx.graphdef, run.model, ctx.cfg.rollout.dtype)),
            frozen=ctx.frozen,
            reference=ctx.apart,
            flops=iteration_flops(
                run.model.cfg, int(ctx.cfg.rl.prompts_per_iteration), table.width, cfg, passes
            ),
        )

    cfg = ctx.cfg
    describe = f"{cfg.rl.algorithm} ({resolved(cfg, 'baseline')} baseline, {resolved(cfg, 'scale')} scale, {resolved(cfg, 'loss_agg')})"
    return rl_plan(ctx, parts, describe)


def epoch_steps(cfg: Any, records: list[dict], encoder: Any = None) -> int:
    """Iterations in one pass over the prompts (``rl.prompts_per_iteration`` a step; dynamic sampling's
    extra rounds not counted)."""
    return max(1, len(records) // cfg.rl.prompts_per_iteration)
