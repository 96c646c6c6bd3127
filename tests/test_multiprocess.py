"""Two JAX processes on localhost (gloo collectives) share one mesh: create, run, export, reload."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.simulated_devices import cpu_devices_env

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_one_mesh(tmp_path):
    port = _free_port()
    env = cpu_devices_env(2)
    script = str(ROOT / "tests" / "multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, f"127.0.0.1:{port}", str(i), str(tmp_path / "export")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [(p, *p.communicate(timeout=300)) for p in procs]
    finally:  # a hung peer (e.g. the other failed before joining) must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [(p.returncode, out, err) for p, out, err in outputs]
    for i, (code, out, err) in enumerate(outputs):
        assert code == 0, f"process {i} failed:\n{out[-2000:]}\n{err[-4000:]}"
        assert f"process {i}: multi-process checks passed (main={i == 0})" in out
    assert (tmp_path / "export" / "model.safetensors").exists()
