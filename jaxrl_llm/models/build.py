"""Creating models: abstractly (no memory), or with every parameter born sharded on a mesh."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from ..parallel import DEFAULT_RULES, state_shardings
from .config import SIZE_FIELDS, ModelConfig, ModelConfigError
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


def model_config(section) -> ModelConfig:
    """The :class:`ModelConfig` a validated ``config.model`` section describes (preset + size overrides)."""
    from .presets import get_preset

    execution = dict(
        param_dtype=section.param_dtype,
        dtype=section.dtype,
        remat=section.remat,
        scan_layers=bool(section.scan_layers),
    )
    if section.path:
        from .config import from_hf_config
        from .hf_io import read_hf_config

        return from_hf_config(read_hf_config(section.path), **execution)
    sizes = {k: getattr(section, k) for k in SIZE_FIELDS if getattr(section, k) is not None}
    return get_preset(section.preset, **sizes, **execution)


def build_model(
    section, *, seed: int = 0, mesh: Mesh | None = None, head: str = "lm", vocab_size: int | None = None
):
    """The model a validated ``config.model`` section names: loaded from ``path``, else built from scratch.

    ``vocab_size`` (a tokenizer's) sizes a model built from scratch whose ``section.vocab_size`` is None.
    """
    if section.path:
        from .hf_io import load_hf

        return load_hf(
            section.path,
            dtype=section.param_dtype,
            compute_dtype=section.dtype,
            mesh=mesh,
            head=head,
            remat=section.remat,
            scan_layers=bool(section.scan_layers),
        )
    arch = model_config(section)
    if section.vocab_size is None and vocab_size is not None:
        arch = arch.replace(vocab_size=vocab_size)
    return create_model(arch, seed=seed, mesh=mesh, head=head)
