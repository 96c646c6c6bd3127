"""``TrainState``: the arrays one optimizer step reads and writes (step, params, optimizer state, RNG);
``Frozen``: the models a step reads and never trains (a reference policy, a reward model).

NNX objects stay outside jit: ``TrainState.create`` splits the model and returns its ``graphdef``
separately; inside a step, ``nnx.merge(graphdef, state.params)`` rebuilds the module. ``Frozen`` keeps its
graph definitions as static (hashable) pytree metadata beside the parameter arrays, so it passes through jit
as one argument and ``models()`` rebuilds its modules inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """A pytree of arrays only.

    Attributes:
      step: [] int32, optimizer steps taken.
      params: ``nnx.State`` of the model's ``nnx.Param`` variables.
      opt_state: the optimizer's state for ``params``.
      rng: the run's PRNG key; step ``i`` uses ``fold_in(rng, i)`` (so a resumed run draws the same keys).
      extra: scalars a stage carries from step to step and checkpoints with the rest (PPO's adaptive KL
        coefficient); empty for most stages.
      lr_scale: [] float32, multiplies every update (1 unless a rollback lowered the learning rate; with
        Adam-like optimizers scaling the update is scaling the learning rate).
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    extra: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    lr_scale: jax.Array = dataclasses.field(default_factory=lambda: jnp.ones((), jnp.float32))

    @classmethod
    def create(
        cls,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        extra: dict[str, jax.Array] | None = None,
    ) -> tuple[nnx.GraphDef, TrainState]:
        """Splits ``model`` into ``(graphdef, TrainState)`` with step 0 and ``tx.init(params)``.

        Only ``nnx.Param`` variables are trained; a model with other state (e.g. RNG streams or caches)
        must be split by the caller, since those would be lost here.
        """
        _, _, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"model has non-Param state the TrainState would drop: {rest}")
        graphdef, params = nnx.split(model, nnx.Param)
        state = cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            extra=dict(extra or {}),
        )
        return graphdef, state

    def apply_gradients(
        self, grads: Any, tx: optax.GradientTransformation, apply: jax.Array | None = None
    ) -> TrainState:
        """One optimizer update: ``params <- params + lr_scale * tx.update(grads)``, ``step <- step + 1``.

        ``apply`` (a [] bool, traced): False keeps the parameters and optimizer state as they are (a skipped
        update: the step still counts, so the schedule stays aligned with the loop).
        """
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        updates = jax.tree.map(lambda u: (u * self.lr_scale).astype(u.dtype), updates)
        params = optax.apply_updates(self.params, updates)
        if apply is not None:
            keep = lambda new, old: jnp.where(apply, new, old)
            params = jax.tree.map(keep, params, self.params)
            opt_state = jax.tree.map(keep, opt_state, self.opt_state)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


@struct.dataclass
class Frozen:
    """Named models a step reads but never trains: sharded like any parameters, never donated, never nested
    inside the policy.

    Attributes:
      states: ``{name: nnx.State}`` the models' arrays (the pytree leaves).
      graphdefs: ``((name, nnx.GraphDef), ...)``, static.
    """

    states: dict[str, nnx.State]
    graphdefs: tuple[tuple[str, nnx.GraphDef], ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def of(cls, **models: nnx.Module) -> Frozen:
        """From modules (their arrays are shared, not copied: copy first what a donated step will consume)."""
        split = {name: nnx.split(model) for name, model in models.items()}
        return cls(
            states={name: state for name, (_, state) in split.items()},
            graphdefs=tuple((name, graphdef) for name, (graphdef, _) in split.items()),
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.graphdefs)

    def models(self) -> dict[str, nnx.Module]:
        """The modules, rebuilt from the arrays (call inside the jitted step)."""
        return {name: nnx.merge(graphdef, self.states[name]) for name, graphdef in self.graphdefs}
