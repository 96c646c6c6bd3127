"""What a stage hands the loop: ``StageContext`` in, ``Plan`` out; and ``BatchIteration``, the iteration of
every stage that makes one optimizer update per host batch (sft, pt and the pair stages).

``BatchIteration`` draws the next batch from a data pipeline, places it on the mesh (rows over the data
axes), optionally ``prepare``s it (a precomputed reference table looked up) and runs the compiled
``update(state, batch, rng, frozen)``. Every row length the pipeline can emit is compiled before step 0,
each compile logged with XLA's memory analysis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jaxrl_llm.data.pipeline import to_device
from jaxrl_llm.objectives.base import Objective

from .loop import Evaluator, Iteration, log
from .state import Frozen, TrainState
from .step import NO_FROZEN, Compiled, UpdateFn, build_update, compile_update

BatchSpec = dict[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass
class StageContext:
    """Everything a stage's iteration builder gets: the validated config, what ``setup.start_stage`` made
    (data, tokenizer, renderer, model, mesh), the stage table's encoder and objective, and the optimizer
    with the state's graph definition and the frozen models (``apart``: those on a mesh of their own, an RL
    run's reference with ``rl.reference_mesh``)."""

    cfg: Any
    run: Any  # setup.StageRun
    encoder: Any
    objective: Objective
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    frozen: Frozen
    apart: Frozen | None = None

    def update(self, accum_steps: int) -> UpdateFn:
        """The stage's pure ``update(state, batch, rng, frozen)`` (``step.build_update``)."""
        return build_update(
            self.graphdef, self.objective, self.tx, self.schedule, accum_steps=accum_steps, mesh=self.run.mesh
        )


@dataclasses.dataclass
class Plan:
    """A stage's iteration for the loop, its evaluators, what a resumed run must match (``signature``),
    ``report(summary)``: the stage's last words (and fields to add to ``summary.json``, or None), and
    ``eval_at_start``: evaluate before the first step whatever ``train.eval_at_start`` says."""

    iteration: Iteration
    signature: dict[str, Any]
    evaluators: Sequence[Evaluator] = ()
    report: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda summary: None
    eval_at_start: bool = False


class BatchIteration:
    """One optimizer update per host batch (see the module docstring).

    Args:
      update: the pure ``update(state, batch, rng, frozen)`` of ``step.build_update``.
      data: the stage's pipeline (an endless Grain ``IterDataset``); its iterator is ``self.data``, saved in
        checkpoints.
      mesh: where batches and the state live.
      specs: the shapes of every (prepared) batch the pipeline can emit, compiled before step 0.
      flops: ``(rows, length) -> FLOPs`` of one update on such a batch (for MFU).
      frozen: the models the objective reads (a live reference).
      prepare: device batch -> device batch, before the update (and evaluation).
    """

    def __init__(
        self,
        update: UpdateFn,
        data: Any,
        mesh: Any,
        *,
        specs: Sequence[BatchSpec],
        flops: Callable[[int, int], float],
        frozen: Frozen = NO_FROZEN,
        prepare: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
    ):
        self.update, self.mesh, self.frozen, self.prepare = update, mesh, frozen, prepare
        self.data = iter(data)
        self.specs, self.flops = list(specs), flops
        self._compiled: dict[Any, Compiled] = {}

    def _program(self, state: TrainState, batch: Any, rng: jax.Array) -> Compiled:
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        if key not in self._compiled:
            compiled = compile_update(self.update, state, batch, rng, self.mesh, self.frozen)
            shape = "x".join(map(str, batch["tokens"].shape)) if "tokens" in batch else "?"
            log(f"train step for batch {shape}: {compiled.describe()}")
            self._compiled[key] = compiled
        return self._compiled[key]

    def compile(self, state: TrainState) -> float:
        for spec in self.specs:
            self._program(state, spec, jax.random.key(0))
        return self.compile_s

    @property
    def compile_s(self) -> float:
        return sum(c.compile_s for c in self._compiled.values())

    def __call__(self, state: TrainState, step: int, rng: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        batch = to_device(next(self.data), self.mesh)
        if self.prepare is not None:
            batch = self.prepare(batch)
        state, metrics = self._program(state, batch, rng)(state, batch, rng, self.frozen)
        tokens = batch["tokens"]
        length = tokens.shape[-1]
        return state, {**metrics, "flops": self.flops(tokens.size // length, length)}
