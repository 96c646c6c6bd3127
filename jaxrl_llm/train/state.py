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
      trainable: static, the ``nnx`` filter of the parameters that are trained (gradients, optimizer state
        and checkpoints): every ``nnx.Param``, or a LoRA run's adapters (``models.lora.TRAINABLE``), whose
        base weights stay in ``params`` untouched and are not checkpointed (``checkpointed``).
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    extra: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    lr_scale: jax.Array = dataclasses.field(default_factory=lambda: jnp.ones((), jnp.float32))
    trainable: Any = struct.field(pytree_node=False, default=nnx.Param)

    @classmethod
    def create(
        cls,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        extra: dict[str, jax.Array] | None = None,
        trainable: Any = nnx.Param,
    ) -> tuple[nnx.GraphDef, TrainState]:
        """Splits ``model`` into ``(graphdef, TrainState)`` with step 0 and ``tx.init`` of the ``trainable``
        parameters (a filter: every ``nnx.Param`` by default).

        A model with state other than ``nnx.Param`` (e.g. RNG streams or caches) must be split by the
        caller, since those would be lost here.
        """
        _, _, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"model has non-Param state the TrainState would drop: {rest}")
        graphdef, params = nnx.split(model, nnx.Param)
        state = cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(nnx.filter_state(params, trainable) if trainable is not nnx.Param else params),
            rng=rng,
            extra=dict(extra or {}),
            trainable=trainable,
        )
        return graphdef, state

    def split_params(self) -> tuple[nnx.State, nnx.State]:
        """``(trained, untrained)`` parts of ``params`` (``nnx.merge(graphdef, trained, untrained)``)."""
        if self.trainable is nnx.Param:
            return self.params, nnx.State({})
        return nnx.split_state(self.params, self.trainable, ...)

    def checkpointed(self) -> TrainState:
        """What a checkpoint holds: the state with only the trained parameters (all of them, unless a filter
        leaves base weights out, which come back from the model's source on resume)."""
        return self if self.trainable is nnx.Param else self.replace(params=self.split_params()[0])

    def untrained(self) -> nnx.State:
        """The parameters a checkpoint leaves out (empty unless ``trainable`` is a filter)."""
        return self.split_params()[1]

    def with_untrained(self, untrained: nnx.State) -> TrainState:
        """A restored ``checkpointed()`` state made whole again with the parameters it left out."""
        if not jax.tree.leaves(untrained):
            return self
        return self.replace(params=nnx.merge_state(untrained, self.params))

    def apply_gradients(
        self, grads: Any, tx: optax.GradientTransformation, apply: jax.Array | None = None
    ) -> TrainState:
        """One optimizer update: ``params <- params + lr_scale * tx.update(grads)``, ``step <- step + 1``.

        ``grads`` are the trained parameters' (``split_params()[0]``); the others are left as they are.
        ``apply`` (a [] bool, traced): False keeps the parameters and optimizer state as they are (a skipped
        update: the step still counts, so the schedule stays aligned with the loop).
        """
        trained, untrained = self.split_params()
        updates, opt_state = tx.update(grads, self.opt_state, trained)
        updates = jax.tree.map(lambda u: (u * self.lr_scale).astype(u.dtype), updates)
        params = optax.apply_updates(trained, updates)
        if apply is not None:
            keep = lambda new, old: jnp.where(apply, new, old)
            params = jax.tree.map(keep, params, trained)
            opt_state = jax.tree.map(keep, opt_state, self.opt_state)
        if self.trainable is not nnx.Param:
            params = nnx.merge_state(untrained, params)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


@struct.dataclass
class Frozen:
    """Named models a step reads but never trains: sharded like any parameters, never donated, never nested
    inside the policy.

    A model may also be a *view* of the trained parameters: a LoRA run's reference is the policy's own
    parameters under a graph definition that skips the adapters (``models.lora.adapters_off``), so it holds
    no arrays of its own; ``bind(params)`` supplies them where the step has the training state.

    Attributes:
      states: ``{name: nnx.State}`` the models' arrays (the pytree leaves).
      graphdefs: ``((name, nnx.GraphDef), ...)``, static.
      views: ``((name, path), ...)``, static: models whose state is the trained parameters at ``path`` (a
        tuple of keys: ``()`` the whole, ``("policy",)`` PPO's policy), under their graph definition.
    """

    states: dict[str, nnx.State]
    graphdefs: tuple[tuple[str, nnx.GraphDef], ...] = struct.field(pytree_node=False, default=())
    views: tuple[tuple[str, tuple[str, ...]], ...] = struct.field(pytree_node=False, default=())

    def bind(self, params: Any) -> Frozen:
        """The views' states taken from ``params`` (the training state's parameters, or a model), under
        ``stop_gradient``; ``self`` when there are no views."""
        if not self.views:
            return self
        if isinstance(params, nnx.Module):
            params = nnx.state(params, nnx.Param)
        states = dict(self.states)
        for name, path in self.views:
            part = params
            for key in path:
                part = part[key]
            states[name] = jax.tree.map(jax.lax.stop_gradient, part)
        return Frozen(states=states, graphdefs=self.graphdefs)

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
        """The modules, rebuilt from the arrays (call inside the jitted step; ``bind`` views first)."""
        if self.views:
            raise ValueError(
                f"frozen models {[n for n, _ in self.views]} are views of the trained parameters: "
                "call frozen.bind(state.params).models()"
            )
        return {name: nnx.merge(graphdef, self.states[name]) for name, graphdef in self.graphdefs}
