"""This machine's measured ceilings: dense matmul FLOP/s and memory read bandwidth.

Benchmarks report their throughput as a fraction of these, measured in the same run, rather than of a
datasheet number that a CPU (or a throttled GPU) never reaches.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def timed(fn, *args, repeats: int = 5) -> float:
    """Median wall time of ``fn(*args)`` (already compiled), in seconds, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_s(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
    """Best sustained FLOP/s of an ``n x n @ n x n`` matmul (n: 2048 on CPU, 8192 on accelerators)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / timed(matmul, a, b, repeats=repeats)


def memory_bytes_per_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes read per second by a reduction over a large float32 array (far larger than any cache).

    Reading is what a decode step does with the weights and the KV cache. (An elementwise pass that writes a
    fresh output mostly measures the page faults of the new allocation: ~5 GB/s here against ~30 read.)
    """
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / timed(total, x, repeats=repeats)


def machine_peaks(dtype=jnp.float32) -> dict[str, float]:
    return {"matmul_flops_per_s": matmul_flops_per_s(dtype), "memory_bytes_per_s": memory_bytes_per_s()}


def mesh_peak_flops(per_device: float | None, dtype: str) -> float | None:
    """Peak FLOP/s of all devices together for the MFU estimate: ``per_device`` if given, else the known
    accelerator table, else (CPU) a matmul measured now; None when none of these knows."""
    from .metrics import peak_flops

    devices = jax.devices()
    per_device = per_device or peak_flops(devices[0].device_kind, dtype)
    if per_device is None and devices[0].platform == "cpu":
        per_device = matmul_flops_per_s(jnp.dtype(dtype), repeats=3) / len(devices)
    return None if per_device is None else per_device * len(devices)
