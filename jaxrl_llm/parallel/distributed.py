"""Multi-process (multi-host) start-up: one JAX process per host, all devices in one global mesh.

On a TPU pod slice or under SLURM, ``jax.distributed.initialize()`` finds its peers by itself. Elsewhere
(several processes on one machine, or GPU hosts without a cluster manager) the coordinator address, the
process count and this process's id are given explicitly, from config or from the environment variables
``JAXRL_COORDINATOR``, ``JAXRL_NUM_PROCESSES`` and ``JAXRL_PROCESS_ID``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_started = False


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins the other processes before any device is touched; returns whether this run is multi-process.

    A value given here wins over its ``JAXRL_*`` environment variable; unset ones (None, or an empty
    address) fall back to it. With one process and no coordinator this does nothing, so single-host code
    calls it unconditionally.
    """
    global _started
    address = coordinator_address or os.environ.get("JAXRL_COORDINATOR", "")
    count = int(os.environ.get("JAXRL_NUM_PROCESSES", 1)) if num_processes is None else num_processes
    index = int(os.environ.get("JAXRL_PROCESS_ID", 0)) if process_id is None else process_id
    if _started:
        return jax.process_count() > 1
    if count == 1 and not address:
        cluster = _cluster_detected()
        if not cluster:
            return False
        try:
            jax.distributed.initialize()  # TPU VM, GKE slice or SLURM: JAX reads the topology itself
        except ValueError:  # a TPU runtime installed where JAX finds no cluster: one process
            if cluster != "tpu vm":
                raise
            return False
        _started = True
        return jax.process_count() > 1
    if not 0 <= index < count:
        raise ValueError(f"process_id={index} must be in [0, {count}) for num_processes={count}")
    jax.distributed.initialize(coordinator_address=address or None, num_processes=count, process_id=index)
    _started = True
    return jax.process_count() > 1


def _cluster_detected() -> str:
    """Where JAX can find this process's peers by itself ("" where it cannot): a multi-host TPU slice under
    GKE (``TPU_WORKER_HOSTNAMES``), a SLURM job with several tasks, or a Cloud TPU VM (``libtpu`` installed:
    ``tpu/run.sh`` starts one process per host of the slice over ssh, with no variable of its own, and JAX
    asks the TPU's metadata server; a one-host VM joins a cluster of one)."""
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1:
        return "gke tpu"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return "tpu vm" if importlib.util.find_spec("libtpu") is not None else ""


def is_main_process() -> bool:
    """Process 0 writes files (checkpoints, exports, logs); the others only compute."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the same ``name``d point; free in a single-process run."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """The whole value of every (possibly multi-process sharded) array of ``tree`` as numpy, on every
    process: one ``device_get`` for the arrays this process holds whole, a gather for the others.

    A collective when an array spans processes: every process must call it, in the same order.
    """
    leaves, treedef = jax.tree.flatten(tree)
    spread = [not getattr(x, "is_fully_addressable", True) for x in leaves]
    local = iter(jax.device_get([x for x, s in zip(leaves, spread, strict=True) if not s]))
    out = [
        np.asarray(multihost_utils.process_allgather(x, tiled=True)) if s else np.asarray(next(local))
        for x, s in zip(leaves, spread, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
