"""The step factory: one jitted, sharded, ahead-of-time compiled step for every objective.

``build_train_step(graphdef, objective, tx, schedule, accum_steps)`` returns the pure function

    step(state: TrainState, batch: {name: [B, ...]}, rng) -> (state, metrics)

that splits the batch into ``accum_steps`` micro-batches, adds their gradients under ``lax.scan`` (in
float32, whatever the parameter dtype), divides by the objective's normalizer of the *whole* batch and
applies one optimizer update. ``compile_step`` jits it with explicit input/output shardings (parameters
and optimizer state by their logical axes, batch rows over the data axes), donates the state, compiles it
for the given shapes before step 0 and reports XLA's memory analysis.

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

from jaxrl_llm.objectives.base import Objective
from jaxrl_llm.parallel import DEFAULT_RULES, named_sharding, variable_axes
from jaxrl_llm.parallel.rules import constrain

from .state import TrainState

Batch = Mapping[str, jax.Array]
StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def micro_batches(batch: Batch, accum_steps: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [A, B / A, ...]`` with micro-batch ``a`` = rows ``a, a + A, ...`` (strided)."""

    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", *(None,) * (x.ndim - 2)))

    return {k: split(v) for k, v in batch.items()}


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def build_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    *,
    accum_steps: int = 1,
    mesh: Mesh | None = None,
) -> StepFn:
    """The pure training step (not jitted; see :func:`compile_step`).

    Metrics (all scalars): the objective's (``loss`` first), ``grad_norm`` (global norm of the gradients
    before clipping, frozen parameters' included), ``learning_rate`` (the schedule at this step),
    ``tokens`` (non-padding tokens in the batch) and ``truncated`` (documents cut to fit a row). With a
    ``mesh``, the accumulated gradients are kept sharded like the parameters.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1")

    def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        normalizer = objective.normalizer(batch)

        def grads_of(mb: Batch, key: jax.Array):
            def loss_fn(params):
                loss_sum, sums = objective.loss(nnx.merge(graphdef, params), mb, key)
                return loss_sum / normalizer, sums

            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return jax.tree.map(lambda g: g.astype(jnp.float32), grads), sums

        if accum_steps == 1:
            grads, sums = grads_of(batch, rng)
        else:
            micro = micro_batches(batch, accum_steps)
            keys = jax.random.split(rng, accum_steps)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, first, keys[0])
            zeros = jax.tree.map(jnp.zeros_like, shapes)
            if mesh is not None:  # an unconstrained carry may be replicated: full gradients on every device
                zeros = (
                    jax.lax.with_sharding_constraint(zeros[0], tree_shardings(shapes[0], mesh)),
                    zeros[1],
                )

            def body(carry, xs):
                mb, key = xs
                return _add(carry, grads_of(mb, key)), None

            (grads, sums), _ = jax.lax.scan(body, zeros, (micro, keys))
        grad_norm = optax.tree.norm(grads)
        new_state = state.apply_gradients(grads, tx)
        metrics = dict(objective.summarize(sums, normalizer))
        metrics["grad_norm"] = grad_norm
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        if "segment_ids" in batch:
            metrics["tokens"] = (batch["segment_ids"] > 0).sum(dtype=jnp.float32)
        if "num_truncated" in batch:
            metrics["truncated"] = batch["num_truncated"].sum(dtype=jnp.float32)
        return new_state, metrics

    return step


def build_eval_step(graphdef: nnx.GraphDef, objective: Objective) -> Callable:
    """``eval_step(params, batch, rng) -> (sums, normalizer)``: accumulate over batches, then summarize."""

    def eval_step(params: nnx.State, batch: Batch, rng: jax.Array):
        _, sums = objective.loss(nnx.merge(graphdef, params), batch, rng)
        return sums, objective.normalizer(batch)

    return eval_step


# --- shardings ---------------------------------------------------------------------------------------


def tree_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """A sharding for every leaf of a (possibly abstract) state: variables by their logical axes, the rest
    replicated. Optimizer moments are ``nnx.Param`` copies of the parameters and shard like them; factored
    statistics (adafactor) whose shape no longer matches the axes are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            try:
                return x.replace(named_sharding(variable_axes(x), x.shape, mesh, rules, "state"))
            except ValueError:
                return x.replace(replicated)
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shardings(batch: Batch, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, NamedSharding]:
    from jaxrl_llm.data.pipeline import batch_axes

    return {
        k: named_sharding(batch_axes(len(v.shape)), v.shape, mesh, rules, f"batch[{k!r}]")
        for k, v in batch.items()
    }


def shard_state(state: TrainState, mesh: Mesh) -> TrainState:
    """``state`` placed by :func:`tree_shardings` (a no-op for arrays already there)."""
    return jax.device_put(state, tree_shardings(state, mesh))


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


def compile_step(
    step: StepFn, state: TrainState, batch: Batch, rng: jax.Array, mesh: Mesh, *, donate: bool = True
) -> Compiled:
    """Jits ``step`` with explicit shardings and donated state, and compiles it for these shapes now.

    ``state``/``batch``/``rng`` may be arrays or ``jax.ShapeDtypeStruct``s; only shapes and dtypes count.
    """
    state_sh = tree_shardings(state, mesh)
    batch_sh = batch_shardings(batch, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,) if donate else (),
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(state, batch, rng).compile()
    return Compiled(compiled, time.perf_counter() - start, memory_analysis(compiled))


def compile_eval_step(eval_step: Callable, params: Any, batch: Batch, rng: jax.Array, mesh: Mesh) -> Compiled:
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        eval_step,
        in_shardings=(tree_shardings(params, mesh), batch_shardings(batch, mesh), replicated),
        out_shardings=replicated,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(params, batch, rng).compile()
    return Compiled(compiled, time.perf_counter() - start, memory_analysis(compiled))


def abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with the arrays' shardings) for a tree of arrays (or of structs)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
