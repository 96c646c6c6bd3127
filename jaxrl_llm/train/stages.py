"""The stage table: ``config.stage`` -> what the stage trains on, with what, and how it iterates.

Every stage runs the same way (``run_stage``): ``setup.start_stage`` loads the data (refusing record kinds
the stage does not train on), the tokenizer, the renderer and the model with the stage's head; the frozen
models the stage names are copied from the initial policy (with LoRA: views of the policy's own weights
with the adapters off, ``frozen_models``; an RL reference with ``rl.reference_mesh``: a copy on its own
mesh, ``StageContext.apart``); the optimizer and the ``TrainState`` are made;
the stage's ``plan`` builds its iteration and evaluators; ``loop.run_loop`` runs them. A stage is one row:

- ``kinds``: the canonical record kinds it trains on;
- ``head``: the model's head (``lm``, ``score``);
- ``encoder``: ``renderer -> encoder`` turning records into token rows (None: the plan renders itself);
- ``objective``: ``cfg -> Objective``, the loss the updates minimise;
- ``frozen``: ``cfg -> names`` of frozen copies of the initial policy the objective reads (``reference``);
- ``plan``: ``StageContext -> Plan``, the iteration (``BatchIteration``, or RL's) and its evaluators;
- ``updates_per_step``: ``cfg -> int``, optimizer updates one loop step makes (the schedule's length);
- ``trainable``: ``(cfg, run) -> model`` what the optimizer trains, when it is more than the policy (PPO's
  actor-critic), with ``policy(model)`` picking what is exported and ``extra(cfg)`` the state's extra
  scalars (PPO's KL coefficient).

Heavy imports (JAX, models, data) happen when this module is imported, which ``python -m jaxrl_llm.train``
does only after it has validated and printed the config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxrl_llm.data.records import DataError
from jaxrl_llm.objectives import (
    Objective,
    dpo_objective,
    kto_objective,
    orpo_objective,
    policy_objective,
    ppo_objective,
    rm_objective,
    sft_objective,
    simpo_objective,
)
from jaxrl_llm.render import KTOEncoder, PairEncoder
from jaxrl_llm.render.records import SFTEncoder

from . import grpo, pairs, ppo, sft
from .grpo import grpo_plan, policy_config, reference_if_penalised, updates_per_step
from .iteration import Plan, StageContext
from .pairs import pairs_plan
from .ppo import ppo_plan
from .sft import rows_plan

Config = ml_collections.ConfigDict


def _none(cfg: Config) -> tuple[str, ...]:
    return ()


def _one(cfg: Config) -> int:
    return 1


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the table (see the module docstring)."""

    kinds: tuple[str, ...]
    objective: Callable[[Config], Objective]
    plan: Callable[[StageContext], Plan]
    encoder: Callable[[Any], Any] | None = None
    head: str = "lm"
    frozen: Callable[[Config], tuple[str, ...]] = _none
    updates_per_step: Callable[[Config], int] = _one
    trainable: Callable[[Config, Any], Any] | None = None
    policy: Callable[[Any], Any] = lambda model: model
    extra: Callable[[Config], dict[str, Any]] = lambda cfg: {}
    epoch_steps: Callable[[Config, list, Any], int] = pairs.epoch_steps


def _dpo(cfg: Config) -> Objective:
    p = cfg.pref
    return dpo_objective(
        beta=p.beta,
        loss_type=p.loss_type,
        label_smoothing=p.label_smoothing,
        reference_free=p.reference_free,
        sft_weight=p.sft_weight,
    )


def _kto(cfg: Config) -> Objective:
    p = cfg.pref
    return kto_objective(
        beta=p.beta, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight
    )


def _reference_unless_free(cfg: Config) -> tuple[str, ...]:
    return () if cfg.pref.reference_free else ("reference",)


def _reference(cfg: Config) -> tuple[str, ...]:
    return ("reference",)


# The keys match jaxrl_llm.config.STAGE_NAMES (a test checks it).
STAGES: dict[str, Stage] = {
    "sft": Stage(
        ("conversation", "text"),
        lambda cfg: sft_objective(),
        rows_plan,
        SFTEncoder,
        epoch_steps=sft.epoch_steps,
    ),
    "pt": Stage(  # the SFT loss on raw text
        ("text",), lambda cfg: sft_objective(), rows_plan, SFTEncoder, epoch_steps=sft.epoch_steps
    ),
    "rm": Stage(
        ("preference",),
        lambda cfg: rm_objective(center_coef=cfg.pref.center_coef),
        pairs_plan,
        PairEncoder,
        "score",
    ),
    "dpo": Stage(("preference",), _dpo, pairs_plan, PairEncoder, frozen=_reference_unless_free),
    "kto": Stage(("unpaired",), _kto, pairs_plan, KTOEncoder, frozen=_reference),
    "orpo": Stage(("preference",), lambda cfg: orpo_objective(beta=cfg.pref.beta), pairs_plan, PairEncoder),
    "simpo": Stage(
        ("preference",),
        lambda cfg: simpo_objective(
            beta=cfg.pref.beta, gamma=cfg.pref.simpo_gamma, label_smoothing=cfg.pref.label_smoothing
        ),
        pairs_plan,
        PairEncoder,
    ),
    "ppo": Stage(
        ("prompt",),
        lambda cfg: ppo_objective(policy_config(cfg), vf_coef=cfg.rl.vf_coef, value_clip=cfg.rl.value_clip),
        ppo_plan,
        frozen=lambda cfg: ("reference",) if cfg.rl.kl_coef > 0 or cfg.rl.kl_target is not None else (),
        updates_per_step=updates_per_step,
        trainable=ppo.trainable,
        policy=lambda model: model.policy,
        extra=ppo.initial_extra,
        epoch_steps=grpo.epoch_steps,
    ),
    "grpo": Stage(
        ("prompt",),
        lambda cfg: policy_objective(policy_config(cfg)),
        grpo_plan,
        frozen=reference_if_penalised,
        updates_per_step=updates_per_step,
        epoch_steps=grpo.epoch_steps,
    ),
}

# How an error names a record kind, and the fields that make one.
KIND_WORDS = {
    "conversation": ("conversation", "messages"),
    "text": ("text", "text"),
    "preference": ("preference pairs", "prompt, chosen, rejected"),
    "unpaired": ("labelled completions", "prompt, completion, label"),
    "prompt": ("RL prompts", "prompt, ground_truth"),
}


def check_kind(stage: str, kind: str | None) -> None:
    """Refuses records ``stage`` does not train on, naming the stages that do train on them."""
    allowed = STAGES[stage].kinds
    if kind in allowed:
        return
    if kind is None:  # no record accepted, and the source did not say (the data layer says why first)
        raise DataError(f"stage={stage!r}: data.path holds no accepted records, so their kind is unknown")
    fields = " / ".join(KIND_WORDS[k][1] for k in allowed)
    others = [name for name, row in STAGES.items() if kind in row.kinds]
    hint = ""
    if others and kind in KIND_WORDS:
        hint = f"; {KIND_WORDS[kind][0]} train with " + ", ".join(f"stage={n}" for n in others)
    raise DataError(
        f"stage={stage!r} trains on {' or '.join(allowed)} records ({fields}), but data.path holds {kind} "
        f"records{hint}"
    )


# Keys that only say how this invocation runs, not what it trains: not reported as changed on resume.
_INVOCATION_KEYS = ("run_dir", "train.resume", "train.resume_from_step", "train.max_hours")


def resume_settings(cfg: Config) -> dict[str, Any]:
    """The flattened config as JSON values, saved with each checkpoint to name what a resume changed."""
    import json

    from jaxrl_llm.config.validate import flatten

    flat = {k: v for k, v in flatten(cfg)[0].items() if k not in _INVOCATION_KEYS}
    return json.loads(json.dumps(flat, default=str))


def frozen_models(names: tuple[str, ...], policy: Any, model: Any, mesh: Any = None) -> Any:
    """The stage's frozen models ``names`` (``reference``): copies of the initial ``policy``, made before the
    first update donates its buffers (each keeps its parameter's sharding); with LoRA, views of the trained
    ``model``'s own parameters at the policy's place under a graph definition with the adapters off (the
    base: no copy of any weight). With ``mesh`` (a mesh of their own) they are copies placed there by the
    sharding rules, LoRA's too (its base with the adapters off: the base never trains)."""
    from flax import nnx

    from jaxrl_llm.models.lora import adapters_off, has_lora
    from jaxrl_llm.parallel import frozen_copy, place

    from .state import Frozen

    if mesh is not None:
        if has_lora(policy):
            graphdef, state = adapters_off(policy), nnx.state(policy, nnx.Param)
        else:
            graphdef, state = nnx.split(policy)
        state = place(state, mesh)
        return Frozen(states=dict.fromkeys(names, state), graphdefs=tuple((name, graphdef) for name in names))
    if not has_lora(policy):
        graphdef, initial = nnx.split(policy)
        return Frozen(
            states={name: frozen_copy(initial) for name in names},
            graphdefs=tuple((name, graphdef) for name in names),
        )
    path = next(tuple(map(str, p)) for p, node in nnx.iter_graph(model) if node is policy)
    off = adapters_off(policy)
    return Frozen(
        states={}, graphdefs=tuple((name, off) for name in names), views=tuple((name, path) for name in names)
    )


def _export(cfg: Config, run: Any, row: Stage, lora: bool) -> Callable[[Any, Any], None]:
    """The run's export to ``final/`` (LoRA merged); with ``lora.save_adapter``, a LoRA causal LM's adapters
    also go to ``<run_dir>/adapter`` in PEFT's format."""
    from . import setup

    merged = setup.hf_export(run.renderer, row.policy)
    if not lora or not cfg.lora.save_adapter or row.head != "lm":
        return merged
    adapter = setup.adapter_export(run.renderer, row.policy, setup.lora_base_model(cfg))

    def export(model: Any, out: Any) -> None:
        merged(model, out)
        adapter(model, out.parent / setup.ADAPTER_DIRNAME)

    return export


def run_stage(cfg: Config) -> int:
    """Runs ``cfg.stage`` (validated, so it is in the table); returns the process exit code."""
    row = STAGES[cfg.stage]
    import jax
    from flax import nnx

    from jaxrl_llm.models.lora import TRAINABLE, has_lora
    from jaxrl_llm.observe import mesh_peak_flops
    from jaxrl_llm.parallel import place

    from . import setup
    from .canary import canary_for_stage
    from .loop import LoopConfig, run_loop
    from .optimizer import OptimizerConfig, make_optimizer, make_schedule
    from .state import TrainState

    LoopConfig.from_config(cfg)  # its mistakes (observe.report_to=wandb, no wandb) before the model loads

    def epoch_steps(records: list[dict], renderer: Any) -> int:
        return row.epoch_steps(cfg, records, row.encoder(renderer) if row.encoder is not None else None)

    run = setup.start_stage(
        cfg, check_kind, head=row.head, epoch_steps=epoch_steps, updates_per_step=row.updates_per_step(cfg)
    )
    graphdef0, initial = nnx.split(run.model)
    model = row.trainable(cfg, run) if row.trainable is not None else run.model
    lora = has_lora(run.model)
    names = row.frozen(cfg)
    apart = ("reference",) if run.roles.reference is not None and "reference" in names else ()
    frozen = frozen_models(tuple(n for n in names if n not in apart), run.model, model)
    elsewhere = frozen_models(apart, run.model, model, mesh=run.roles.reference) if apart else None
    opt = OptimizerConfig.from_config(cfg, updates_per_step=row.updates_per_step(cfg))
    trainable = TRAINABLE if lora else nnx.Param  # LoRA: the adapters (and new heads), never the base
    tx = make_optimizer(opt, nnx.state(model, trainable))
    graphdef, state = TrainState.create(model, tx, jax.random.key(cfg.seed), row.extra(cfg), trainable)
    state = place(state, run.mesh)
    encoder = row.encoder(run.renderer) if row.encoder is not None else None
    ctx = StageContext(
        cfg, run, encoder, row.objective(cfg), graphdef, tx, make_schedule(opt), frozen, elsewhere
    )
    plan = row.plan(ctx)
    canary_frozen = frozen
    if lora and cfg.canary.max_kl is not None and "reference" not in frozen.names:
        canary_frozen = frozen_models(("reference",), run.model, model)  # no copy of the base for it either
    canary = canary_for_stage(cfg, run, graphdef, canary_frozen, row.policy, initial=(graphdef0, initial))
    loop = LoopConfig.from_config(cfg)
    if plan.eval_at_start:
        loop = dataclasses.replace(loop, eval_at_start=True)
    summary = run_loop(
        loop,
        graphdef=graphdef,
        state=state,
        iteration=plan.iteration,
        signature=plan.signature,
        settings=resume_settings(cfg),
        peak_flops=mesh_peak_flops(cfg.train.peak_flops, cfg.model.dtype),
        evaluators=plan.evaluators,
        export=_export(cfg, run, row, lora),
        canary=canary,
    )
    if summary.get("stopped"):  # a signal or train.max_hours: checkpointed, to be continued
        return 0
    from jaxrl_llm.checkpoint import write_summary
    from jaxrl_llm.checkpoint.registry import write_artifacts
    from jaxrl_llm.observe import write_plots
    from jaxrl_llm.parallel import is_main_process

    extra = plan.report(summary)
    if extra:
        summary = {**summary, **extra}
        write_summary(run.run_dir, summary)
    if is_main_process():
        write_artifacts(run.run_dir, summary=summary)  # the final summary, with the plan's report in it
        written = write_plots(run.run_dir)  # <run_dir>/report: a PNG a metric family, report.html
        if written:
            print(f"plots: {written[-1]}", flush=True)
    return 0
