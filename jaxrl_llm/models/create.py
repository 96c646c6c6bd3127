"""Creating models: abstractly (no memory), or with every parameter born sharded on a mesh."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from ..parallel import DEFAULT_RULES, state_shardings
from .config import ModelConfig, ModelConfigError
from .transformer import HEADS


def _constructor(cfg: ModelConfig, head: str, seed: int):
    if head not in HEADS:
        raise ModelConfigError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    return lambda: HEADS[head](cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, head: str = "lm"):
    """The model with ``ShapeDtypeStruct`` leaves: shapes and axes of an 8B model, nothing allocated."""
    return nnx.eval_shape(_constructor(cfg, head, 0))


def count_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create_model(
    cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, rules=DEFAULT_RULES, head: str = "lm"
):
    """A randomly initialised model (HF-style normal(0.02) weights, unit norms).

    With a ``mesh`` the initialiser is compiled with the shardings the rules give each parameter as its
    outputs, so no parameter ever exists unsharded (an 8B model need not fit on one device).
    """
    construct = _constructor(cfg, head, seed)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(construct))

    def init():
        return nnx.split(construct())[1]

    if mesh is None:
        state = jax.jit(init)()
    else:
        shardings = state_shardings(abstract_state, mesh, rules)
        with jax.set_mesh(mesh):
            state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
