"""Device meshes with the three axes every sharded computation in the project uses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxrl_llm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(UserError):
    """Mesh axis sizes that do not fit the devices available."""


def resolve_axis_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the one ``-1`` entry by whatever makes the product equal ``num_devices``."""
    named = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True))
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh axes ({named}): each size must be >= 1, and at most one may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % fixed:
            raise MeshError(f"mesh axes ({named}): {num_devices} devices are not divisible by {fixed}")
        sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh axes ({named}) need {math.prod(sizes)} devices but {num_devices} are available; "
            "set one axis to -1 to use all of them"
        )
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices), axes in Auto mode.

    Auto (not jax 0.10's default Explicit) axis types let XLA propagate shardings through the model, so
    row-parallel matmuls compile without per-op sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes((data, fsdp, tensor), len(devices))
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - topology-aware placement is an optimisation; fall back to order.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(parallel) -> Mesh:
    """The mesh named by a config's ``parallel`` section (``data``, ``fsdp``, ``tensor``)."""
    return make_mesh(int(parallel.data), int(parallel.fsdp), int(parallel.tensor))
