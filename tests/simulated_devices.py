"""Runs a Python program in a subprocess with simulated CPU devices (XLA_FLAGS must precede JAX's import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_devices_env(count: int) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
        "JAX_PLATFORMS": "cpu",
    }


def run_on_cpu_devices(args: list[str], count: int, passed: str, *, timeout: int = 600) -> str:
    """Runs ``python *args`` from the repo root on ``count`` devices; asserts it exits 0 and prints ``passed``."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=cpu_devices_env(count),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert passed in proc.stdout, proc.stdout[-3000:]
    return proc.stdout
