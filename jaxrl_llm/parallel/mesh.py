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


def parse_mesh(text: str, what: str = "mesh") -> tuple[int, int, int]:
    """``"data=4,fsdp=2"`` -> ``(4, 2, 1)``: named axis sizes (each >= 1), the axes not named 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise MeshError(
                f"{what}={text!r}: expected comma-separated axis=size with axes {', '.join(MESH_AXES)} and "
                "sizes >= 1, e.g. 'data=4' or 'fsdp=2,tensor=2'"
            )
        sizes[name.strip()] = int(value)
    return tuple(sizes[a] for a in MESH_AXES)


def data_split(mesh: Mesh | None) -> int:
    """Devices a batch's rows are split over (the ``data`` and ``fsdp`` axes; 1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in ("data", "fsdp"))


def padded_rows(rows: int, mesh: Mesh | None) -> int:
    """``rows`` rounded up to a multiple of :func:`data_split`: a batch every data-parallel device gets a share of."""
    split = data_split(mesh)
    return -(-rows // split) * split


def role_meshes(parallel, roles: dict[str, tuple[int, int, int]]) -> tuple[Mesh, dict[str, Mesh]]:
    """A training mesh (``parallel.*``; ``-1`` fills it) and a mesh of its own for each role (``{"rollout.mesh":
    (data, fsdp, tensor)}``, in order): each role takes the last of every process's devices not yet taken,
    an equal share from each, and training the rest. So every mesh spans every process, and every process
    takes part in every role's programs (multi-controller JAX runs a program on each process holding a
    device of it). With one process the roles take the last devices: the first role the very last."""
    by_process: dict[int, list] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    left = [by_process[p] for p in sorted(by_process)]
    taken: dict[str, list] = {}
    for role, shape in roles.items():
        need = math.prod(shape)
        share, rest = divmod(need, len(left))
        if rest:
            raise MeshError(
                f"{role}: a mesh of {need} devices cannot take an equal share of each of the {len(left)} "
                f"processes' devices; make its size a multiple of {len(left)}"
            )
        if share >= min(len(devices) for devices in left):
            total = sum(map(len, left))
            raise MeshError(
                f"{role}: a mesh of {need} devices leaves none of the {total} still free for training; make it "
                f"smaller or leave {role} empty to share the training mesh"
            )
        taken[role] = [d for devices in left for d in devices[len(devices) - share :]]
        left = [devices[: len(devices) - share] for devices in left]
    train = make_mesh(
        int(parallel.data), int(parallel.fsdp), int(parallel.tensor), devices=[d for ds in left for d in ds]
    )
    return train, {role: make_mesh(*roles[role], devices=devices) for role, devices in taken.items()}
