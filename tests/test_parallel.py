"""Meshes and the logical-axis rules: unit checks here, 8 simulated devices in a subprocess."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.parallel import MeshError, logical_to_spec, make_mesh, resolve_axis_sizes
from tests.simulated_devices import run_on_cpu_devices

ROOT = Path(__file__).resolve().parents[1]


def test_minus_one_fills_the_remaining_devices():
    assert resolve_axis_sizes((-1, 2, 2), 8) == (2, 2, 2)
    assert resolve_axis_sizes((1, -1, 1), 8) == (1, 8, 1)
    assert resolve_axis_sizes((2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "sizes, devices, message",
    [
        ((-1, -1, 1), 8, "at most one may be -1"),
        ((3, -1, 1), 8, "8 devices are not divisible by 3"),
        ((2, 2, 1), 8, "need 4 devices but 8 are available"),
        ((0, 1, 1), 1, "each size must be >= 1"),
    ],
)
def test_mesh_errors_name_the_axes(sizes, devices, message):
    with pytest.raises(MeshError, match=message):
        resolve_axis_sizes(sizes, devices)


def test_rules_table():
    assert logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)  # fsdp used once
    assert logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    with pytest.raises(KeyError, match="logical axis 'bogus' has no rule"):
        logical_to_spec(("bogus",))


def test_one_device_mesh_runs_the_model():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    model = create_model(get_preset("llama-tiny"), mesh=mesh)
    assert model(jax.numpy.zeros((1, 4), jax.numpy.int32)).shape == (1, 4, 256)


@pytest.mark.slow
def test_parameters_are_sharded_as_the_rules_say_on_8_devices():
    run_on_cpu_devices([str(ROOT / "tests" / "sharding_8dev.py")], 8, "8-device sharding checks passed")


@pytest.mark.parametrize(
    ("env", "libtpu", "found"),
    [
        ({}, False, ""),
        ({"SLURM_NTASKS": "4"}, False, "slurm"),
        ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, True, "gke tpu"),
        ({"TPU_WORKER_HOSTNAMES": "h0"}, True, "tpu vm"),  # tpu/run.sh's hosts: JAX asks the metadata server
    ],
)
def test_initialize_joins_the_clusters_jax_finds_by_itself(monkeypatch, env, libtpu, found):
    from jaxrl_llm.parallel import distributed

    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAXRL_COORDINATOR", "JAXRL_NUM_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    real = distributed.importlib.util.find_spec
    monkeypatch.setattr(
        distributed.importlib.util, "find_spec", lambda n: object() if n == "libtpu" and libtpu else real(n)
    )
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda: calls.append(1))
    monkeypatch.setattr(distributed, "_started", False)
    assert distributed._cluster_detected() == found
    assert distributed.initialize() is False and calls == ([1] if found else [])  # one process here

    def no_cluster():
        raise ValueError("coordinator_address should be defined")

    monkeypatch.setattr(distributed, "_started", False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", no_cluster)
    if found == "tpu vm":  # a TPU runtime installed where JAX finds no cluster: one process
        assert distributed.initialize() is False
    elif found:
        with pytest.raises(ValueError, match="coordinator_address"):
            distributed.initialize()
