"""Shardings of whole trees: a training state, a batch, any pytree of arrays or abstract shapes.

``rules`` names one array's axes; this module applies it to what the jitted programs take and return:
parameters and optimizer moments by their logical axes (``nnx.Variable`` metadata), batch arrays by rows
over the data axes, everything else (step counters, keys, scalars) replicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .rules import DEFAULT_RULES, Rules, named_sharding, variable_axes


def batch_axes(ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a batch array: ``("batch", "seq")`` for rows, ``("batch",)`` for per-row values."""
    return ("batch", "seq", *(None,) * (ndim - 2))[:ndim]


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
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


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
    """Rows of every batch array over the data axes (``batch_axes``)."""
    return {
        k: named_sharding(batch_axes(len(v.shape)), v.shape, mesh, rules, f"batch[{k!r}]")
        for k, v in batch.items()
    }


def rows_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Like ``batch_shardings`` for any pytree whose leaves all have a leading row axis."""
    return jax.tree.map(
        lambda v: named_sharding(batch_axes(len(v.shape)), v.shape, mesh, rules, "rows"), tree
    )


def place(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``tree`` placed by :func:`tree_shardings` (a no-op for arrays already there)."""
    return put(tree, tree_shardings(tree, mesh, rules))


def put(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works when a sharding spans several processes, where
    ``device_put`` refuses: a leaf not yet spread over the processes (numpy, or an array on this process's
    devices) must hold the same value on every process, and each process keeps its devices' part of it; a
    leaf already spread over them is resharded by a compiled copy within its devices, and goes through the
    host to other devices (multi-controller JAX moves arrays between processes only within one device set:
    one gather for all such leaves). Every process must call this."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    crossing = [i for i, (x, s) in enumerate(zip(leaves, targets, strict=True)) if _crosses(x, s)]
    if crossing:
        from .distributed import to_host

        fetched = to_host([_key_data(leaves[i]) for i in crossing])
        for i, value in zip(crossing, fetched, strict=True):
            x = leaves[i]
            if _is_key(x):  # its data came back: placed here and wrapped again
                value = jax.random.wrap_key_data(_put_leaf(value, targets[i]), impl=jax.random.key_impl(x))
            leaves[i] = value
    return treedef.unflatten([_put_leaf(x, s) for x, s in zip(leaves, targets, strict=True)])


def _crosses(x: Any, sharding: Any) -> bool:
    """An array spread over processes that is to move to other devices."""
    return (
        isinstance(x, jax.Array)
        and not x.is_fully_addressable
        and x.sharding.device_set != sharding.device_set
    )


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(x: Any) -> Any:
    return jax.random.key_data(x) if _is_key(x) else x


def _put_leaf(x: Any, sharding: Any) -> Any:
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding == sharding else jax.jit(lambda v: v, out_shardings=sharding)(x)
    if _is_key(x):
        data = _put_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def frozen_copy(tree: Any) -> Any:
    """A copy of a tree of arrays with every leaf's sharding kept: parameters a donated training state
    will not take with it (a reference model made from the policy's initial parameters)."""
    shardings = jax.tree.map(lambda x: x.sharding, tree)
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with the arrays' shardings) for a tree of arrays (or of structs)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
