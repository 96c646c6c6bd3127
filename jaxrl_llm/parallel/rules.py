"""Logical axis names -> mesh axes: the single table that decides how every array is sharded.

Model code names the axes of each parameter and activation logically (``embed``, ``heads``, ...); this
module turns those names into ``PartitionSpec``s for the active mesh. Changing parallelism means changing
this table (or passing another one), never the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Batch is split over both data-parallel axes; weights are split over `fsdp` along the model dimension and
# over `tensor` along heads / MLP / vocabulary (Megatron-style column/row parallelism).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("cache_seq", None),
)


def logical_to_spec(axes: LogicalAxes, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """Maps logical names to a ``PartitionSpec``; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {', '.join(table)}")
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (e.g. 2 KV heads on 4-way tensor parallelism)."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        keep, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
            else:
                log.warning(
                    "%s: dimension %d is not divisible by mesh axis %r (%d); replicating it instead",
                    what,
                    dim,
                    a,
                    mesh.shape[a],
                )
        fitted.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*fitted)


def fitting_axes(entry: str | tuple[str, ...] | None, dim: int, mesh) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry whose product divides ``dim`` (leading ones first), for
    code that shards by hand (``shard_map``) and must not log as ``_fit_to_shape`` does."""
    keep, size = [], 1
    for a in (entry,) if isinstance(entry, str) else tuple(entry or ()):
        if dim % (size * mesh.shape[a]) == 0:
            keep.append(a)
            size *= mesh.shape[a]
    return tuple(keep)


def named_sharding(
    axes: LogicalAxes, shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES, what: str = "array"
) -> NamedSharding:
    return NamedSharding(mesh, _fit_to_shape(logical_to_spec(axes, rules), shape, mesh, what))


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes of a parameter; a leading ``layers`` axis is implied for stacked layers."""
    axes = tuple(var.get_metadata().get("axes", ()))
    ndim = len(var.shape)
    if len(axes) == ndim - 1:
        axes = ("layers", *axes)
    if len(axes) != ndim:
        raise ValueError(f"parameter of shape {var.shape} is annotated with {len(axes)} axes {axes}")
    return axes


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A ``NamedSharding`` for every variable of an (abstract) NNX state, from its logical axes."""

    def one(path, var):
        what = "/".join(str(p) for p in path)
        return var.replace(named_sharding(variable_axes(var), var.shape, mesh, rules, what))

    return nnx.map_state(one, state)


def constrain(x: jax.Array, axes: LogicalAxes, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """``with_sharding_constraint`` by logical names when a mesh is active; a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, rules)
    sizes = dict(mesh.shape)
    for dim, entry in zip(x.shape, spec, strict=False):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        total = 1
        for n in names:
            total *= sizes[n]
        if dim % total:
            return x  # e.g. batch 1 on a 2-way data axis: let XLA choose rather than fail
    return jax.lax.with_sharding_constraint(x, spec)
