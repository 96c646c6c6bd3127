"""The memory planner's compiled figure: XLA's memory analysis of the stage's forward + backward.

``compile_programs(spec, devices)`` builds the abstract model, one abstract micro-batch of the stage's
update and its frozen reference (dpo, kto), and compiles

    grads(trained, untrained, batch, frozen) -> ((loss, the loss's statistics), float32 gradients)

(``untrained``: a LoRA run's base, which gets no gradient; empty without LoRA) with the stage's real
objective (the step factory's ``loss_sum / normalizer`` under ``value_and_grad``) through
``train.step.compile_program`` (the trainer's own jit-with-shardings path) on a mesh of the requested
shape. Nothing is allocated: the arguments are ``ShapeDtypeStruct``s. Its ``temp_size`` is the activations
and backward intermediates of one micro-batch; the gradients are its output. Then it compiles the trainer's
whole update (``build_update`` + ``compile_update``: gradient accumulation, clipping, AdamW, donated state)
on the same batch, whose peak is the check on the planner's sum (it also holds the optimizer's update
temporaries, which the rows leave out).

The mesh needs that many devices. JAX fixes the number of CPU devices when its backend starts, so unless
this process already has them, the compile runs in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (``python -m jaxrl_llm.bench.memory_compile SPEC``,
which prints the figures as one JSON line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .memory import PAIR_STAGES, RL_STAGES, MemorySpec, abstract_models, trainable

_f32 = jnp.float32


def stage_objective(spec: MemorySpec):
    """The stage's loss as ``jaxrl_llm.train.stages`` builds it with default settings (KL penalty 0.04 for
    grpo with ``--reference``)."""
    from ..objectives import (
        dpo_objective,
        kto_objective,
        orpo_objective,
        policy_objective,
        ppo_objective,
        rm_objective,
        sft_objective,
        simpo_objective,
    )
    from ..objectives.rl import PolicyLossConfig

    reference = spec.keeps_reference()
    policy = PolicyLossConfig(
        beta=0.04 if spec.stage == "grpo" and reference else 0.0, max_completion_length=spec.new_tokens
    )
    return {
        "sft": sft_objective,
        "pt": sft_objective,
        "rm": rm_objective,
        "dpo": lambda: dpo_objective(reference_free=not reference),
        "kto": kto_objective,
        "orpo": orpo_objective,
        "simpo": simpo_objective,
        "grpo": lambda: policy_objective(policy),
        "ppo": lambda: ppo_objective(policy),
    }[spec.stage]()


def micro_batch_spec(spec: MemorySpec, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """An abstract batch of ``rows`` rows of the stage's update, with the keys and dtypes its pipeline
    makes (``sft.batch_spec``, ``pairs.pair_spec``; RL: ``rl_step.rl_batch`` plus what ``learn`` adds)."""
    from ..train.pairs import pair_spec
    from ..train.sft import batch_spec

    _, length = spec.micro_batch()
    if spec.stage in PAIR_STAGES:
        return pair_spec(rows, length, reference=False, labels=spec.stage == "kto")
    if spec.stage not in RL_STAGES:
        return batch_spec(rows, length)
    n = spec.new_tokens
    tokens = lambda *shape, dtype=_f32: jax.ShapeDtypeStruct((rows, *shape), dtype)
    batch = {
        "tokens": tokens(length, dtype=jnp.int32),
        "attention_mask": tokens(length, dtype=jnp.bool_),
        "completion_mask": tokens(n, dtype=jnp.bool_),
        "advantages": tokens(n) if spec.stage == "ppo" else tokens(),
        "sampler_logps": tokens(n),
    }
    if spec.stage == "ppo" or spec.minibatches > 1:
        batch["old_logps"] = tokens(n)
    if spec.stage == "ppo":
        batch |= {"returns": tokens(n), "old_values": tokens(n)}
    elif spec.keeps_reference():
        batch["ref_logps"] = tokens(n)
    return batch


def _figures(compiled) -> dict[str, Any]:
    """``train.step.Compiled``'s memory analysis without the ``_size_in_bytes`` suffixes, its peak
    (arguments + outputs - aliased + temp) and compile time."""
    memory = {k.removesuffix("_size_in_bytes"): v for k, v in compiled.memory.items()}
    peak = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    return {**memory, "peak": peak, "compile_s": round(compiled.compile_s, 2)}


def compile_programs(spec: MemorySpec, devices: list) -> dict[str, Any]:
    """XLA's per-device memory analysis (bytes) of the stage's gradient program (``gradients``) and of the
    trainer's own update (``step``: ``build_update`` + ``compile_update``, AdamW, state donated) on the same
    batch. Both differentiate what the trainer trains (``memory.trainable``: with LoRA the adapters, the
    base an argument that gets no gradient)."""
    from ..parallel import batch_shardings, make_mesh, tree_shardings
    from ..train.optimizer import OptimizerConfig, make_optimizer, make_schedule
    from ..train.state import TrainState
    from ..train.step import build_update, compile_program, compile_update

    mesh = make_mesh(*spec.mesh, devices=devices)
    trained, policy = abstract_models(spec)
    graphdef, params = nnx.split(trained, nnx.Param)
    frozen = stage_frozen(spec, trained, policy)
    objective = stage_objective(spec)
    rows, _ = spec.micro_batch()
    batch = micro_batch_spec(spec, rows)
    train_params, untrained = split_trained(spec, params)

    def grads(train_params, untrained, batch, frozen):
        models = frozen.bind(nnx.merge_state(untrained, train_params)).models()  # LoRA: the base's view
        normalizer = objective.normalizer(batch)

        def loss_fn(p):
            model = nnx.merge(graphdef, p, untrained) if untrained else nnx.merge(graphdef, p)
            loss_sum, sums = objective.loss(model, batch, jax.random.key(0), models)
            return loss_sum / normalizer, sums

        # The statistics are outputs, as the step's metrics are: else XLA drops what only they need.
        (loss, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(train_params)
        return (loss, sums), jax.tree.map(lambda x: x.astype(_f32), g)

    train_sh = tree_shardings(train_params, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = (train_params, untrained, batch, frozen)
    in_sh = (
        train_sh,
        tree_shardings(untrained, mesh),
        batch_shardings(batch, mesh),
        tree_shardings(frozen, mesh),
    )
    out = {"gradients": _figures(compile_program(grads, args, in_sh, (replicated, train_sh), mesh))}
    opt = OptimizerConfig(state_dtype=spec.state_dtype)
    tx = make_optimizer(opt, train_params)
    key = jax.eval_shape(lambda: jax.random.key(0))
    extra = {"kl_coef": jax.ShapeDtypeStruct((), _f32)} if spec.stage == "ppo" else {}
    state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        params,
        jax.eval_shape(tx.init, train_params),
        key,
        extra,
        trainable=trainable(spec),
    )
    update = build_update(graphdef, objective, tx, make_schedule(opt), accum_steps=spec.accum, mesh=mesh)
    step_batch = micro_batch_spec(spec, rows * spec.accum)
    out["step"] = _figures(compile_update(update, state, step_batch, key, mesh, frozen))
    return out


def split_trained(spec: MemorySpec, params: Any) -> tuple[Any, Any]:
    """``(trained, untrained)`` parameters as ``TrainState.split_params`` splits them (the second empty
    without LoRA)."""
    if spec.lora_rank is None:
        return params, nnx.State({})
    return nnx.split_state(params, trainable(spec), ...)


def stage_frozen(spec: MemorySpec, trained: Any, policy: Any) -> Any:
    """The frozen models the loss reads live (dpo and kto's reference; ``NO_FROZEN`` for the others): a
    copy of the policy's parameters, or with LoRA a view of the trained ones with the adapters off
    (``train.stages.frozen_models``)."""
    from ..train.stages import frozen_models
    from ..train.state import Frozen
    from ..train.step import NO_FROZEN

    if spec.stage not in ("dpo", "kto") or not spec.keeps_reference():
        return NO_FROZEN
    if spec.lora_rank is not None:
        return frozen_models(("reference",), policy, trained)
    ref_graphdef, ref_params = nnx.split(policy, nnx.Param)
    return Frozen({"reference": ref_params}, (("reference", ref_graphdef),))


def _local_cpu_devices() -> list:
    """This process's CPU devices, if its JAX backend has already started (else none: starting it here
    would fix the device count at 1)."""
    try:
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            return []
        return jax.devices("cpu")
    except (ImportError, AttributeError, RuntimeError):
        return []


def compiled_figures(spec: MemorySpec) -> dict[str, Any]:
    """``compile_programs`` on ``spec.devices`` simulated CPU devices: here when this process has them,
    else in a child process (module docstring)."""
    devices = _local_cpu_devices()
    if len(devices) >= spec.devices:
        return compile_programs(spec, devices[: spec.devices])
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={spec.devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH")))),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrl_llm.bench.memory_compile", json.dumps(dataclasses.asdict(spec))],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the compile on {spec.devices} simulated devices failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    fields = json.loads(argv[0])
    spec = MemorySpec(**{**fields, "mesh": tuple(fields["mesh"])})
    print(json.dumps(compile_programs(spec, jax.devices()[: spec.devices])), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])
