"""The step factory: one jitted, sharded, ahead-of-time compiled update for every objective.

``build_update(graphdef, objective, tx, schedule, accum_steps)`` returns the pure function

    update(state: TrainState, batch: {name: [B, ...]}, rng, frozen: Frozen) -> (state, metrics)

that splits the batch into ``accum_steps`` micro-batches, adds their gradients under ``lax.scan`` (in
float32, whatever the parameter dtype), divides by the objective's normalizer of the *whole* batch and
applies one optimizer update. ``frozen`` holds the models the objective reads but never trains (a reference
policy): a separate argument, sharded like any parameters and never donated. ``compile_update`` jits it with
explicit input/output shardings (parameters and optimizer state by their logical axes, batch rows over the
data axes), donates the state, compiles it for the given shapes before step 0 and reports XLA's memory
analysis. An RL iteration calls the same pure ``update`` inside its own compiled program.

Micro-batch ``a`` takes rows ``a, a + A, a + 2A, ...`` (a strided split, not contiguous blocks), so that
with the batch sharded over devices every micro-batch is spread over all of them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_llm.models.lora import use_dropout
from jaxrl_llm.objectives.base import Objective, combine_sums, identity_sums
from jaxrl_llm.parallel import batch_shardings, constrain, tree_shardings

from .state import Frozen, TrainState

Batch = Mapping[str, jax.Array]
UpdateFn = Callable[[TrainState, Batch, jax.Array, Frozen], tuple[TrainState, dict[str, jax.Array]]]
NO_FROZEN = Frozen(states={})


def micro_batches(batch: Batch, accum_steps: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [A, B / A, ...]`` with micro-batch ``a`` = rows ``a, a + A, ...`` (strided)."""

    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", *(None,) * (x.ndim - 2)))

    return {k: split(v) for k, v in batch.items()}


def build_update(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    *,
    accum_steps: int = 1,
    mesh: Mesh | None = None,
) -> UpdateFn:
    """The pure update (not jitted; see :func:`compile_update`).

    Only ``state.trainable``'s parameters are differentiated (a LoRA run's adapters: no gradient for the
    base weights); a model with LoRA dropout draws its masks from the micro-batch's key.

    Metrics (all scalars): the objective's (``loss`` first), ``grad_norm`` (global norm of the gradients
    before clipping, frozen parameters' included), ``skipped`` (1 when the loss or the gradient norm was not
    finite: then the parameters and optimizer state are left as they were), ``learning_rate`` (the
    schedule at this step, times the state's ``lr_scale``),
    ``tokens`` (non-padding tokens in the batch) and ``truncated`` (documents cut to fit a row). With a
    ``mesh``, the accumulated gradients are kept sharded like the parameters.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1")

    def update(
        state: TrainState, batch: Batch, rng: jax.Array, frozen: Frozen = NO_FROZEN
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        normalizer = objective.normalizer(batch)
        frozen_models = frozen.bind(state.params).models()
        trained, untrained = state.split_params()  # gradients for the trained part only (LoRA: adapters)

        def grads_of(mb: Batch, key: jax.Array):
            def loss_fn(params):
                model = nnx.merge(graphdef, params, untrained) if untrained else nnx.merge(graphdef, params)
                use_dropout(model, key)
                loss_sum, sums = objective.loss(model, mb, key, frozen_models)
                return loss_sum / normalizer, sums

            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
            return jax.tree.map(lambda g: g.astype(jnp.float32), grads), sums

        if accum_steps == 1:
            grads, sums = grads_of(batch, rng)
        else:
            micro = micro_batches(batch, accum_steps)
            keys = jax.random.split(rng, accum_steps)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, first, keys[0])
            zeros = (jax.tree.map(jnp.zeros_like, shapes[0]), identity_sums(shapes[1]))
            if mesh is not None:  # an unconstrained carry may be replicated: full gradients on every device
                zeros = (
                    jax.lax.with_sharding_constraint(zeros[0], tree_shardings(shapes[0], mesh)),
                    zeros[1],
                )

            def body(carry, xs):
                mb, key = xs
                grads, sums = grads_of(mb, key)
                return (jax.tree.map(jnp.add, carry[0], grads), combine_sums(carry[1], sums)), None

            (grads, sums), _ = jax.lax.scan(body, zeros, (micro, keys))
        grad_norm = optax.tree.norm(grads)
        metrics = dict(objective.summarize(sums, normalizer))
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        new_state = state.apply_gradients(grads, tx, apply=finite)
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32) * state.lr_scale
        if "segment_ids" in batch:
            metrics["tokens"] = (batch["segment_ids"] > 0).sum(dtype=jnp.float32)
        if "num_truncated" in batch:
            metrics["truncated"] = batch["num_truncated"].sum(dtype=jnp.float32)
        return new_state, metrics

    return update


def build_eval_step(graphdef: nnx.GraphDef, objective: Objective) -> Callable:
    """``eval_step(params, batch, rng, frozen) -> (sums, normalizer)``: accumulate over batches
    (``combine_sums``), then summarize."""

    def eval_step(params: nnx.State, batch: Batch, rng: jax.Array, frozen: Frozen = NO_FROZEN):
        _, sums = objective.loss(nnx.merge(graphdef, params), batch, rng, frozen.bind(params).models())
        return sums, objective.normalizer(batch)

    return eval_step


# --- compilation -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    """A compiled step with what its compilation reported."""

    fn: Callable
    compile_s: float
    memory: dict[str, int]

    def __call__(self, *args):
        return self.fn(*args)

    def describe(self) -> str:
        mib = {k: v / 2**20 for k, v in self.memory.items()}
        parts = ", ".join(f"{k.replace('_size_in_bytes', '')} {v:,.1f} MiB" for k, v in mib.items())
        return f"compiled in {self.compile_s:.1f}s; memory per device: {parts or 'not reported'}"


def memory_analysis(compiled: Any) -> dict[str, int]:
    """XLA's per-device memory analysis of a compiled executable (empty where the backend has none)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return {}
    if stats is None:
        return {}
    names = ("argument", "output", "temp", "alias", "generated_code")
    out = {f"{n}_size_in_bytes": int(getattr(stats, f"{n}_size_in_bytes", 0) or 0) for n in names}
    return out


def compile_program(
    fn: Callable,
    args: tuple[Any, ...],
    in_shardings: tuple[Any, ...],
    out_shardings: Any,
    mesh: Mesh,
    *,
    donate_argnums: tuple[int, ...] = (),
) -> Compiled:
    """Jits ``fn`` with explicit shardings and compiles it for ``args`` now (arrays or
    ``jax.ShapeDtypeStruct``s: only shapes and dtypes count); every compiled program of a run goes
    through here, so each reports its compile time and memory."""
    jitted = jax.jit(
        fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(*args).compile()
    return Compiled(compiled, time.perf_counter() - start, memory_analysis(compiled))


def compile_update(
    update: UpdateFn,
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    mesh: Mesh,
    frozen: Frozen = NO_FROZEN,
    *,
    donate: bool = True,
) -> Compiled:
    """Jits ``update`` with explicit shardings and donated state (never the frozen models), and compiles it
    for these shapes now."""
    state_sh = tree_shardings(state, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return compile_program(
        update,
        (state, batch, rng, frozen),
        (state_sh, batch_shardings(batch, mesh), replicated, tree_shardings(frozen, mesh)),
        (state_sh, replicated),
        mesh,
        donate_argnums=(0,) if donate else (),
    )
