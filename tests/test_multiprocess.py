"""Every training stage run as two JAX processes x 2 CPU devices on localhost (gloo collectives, one mesh)
gives the results of one process with 4 devices: models created sharded across the processes or loaded onto
them (the RL stages' HF checkpoint), every step's metrics, evaluations, a checkpoint restored across the
processes and the exports process 0 writes from collectively gathered weights."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.simulated_devices import cpu_devices_env

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_together(commands: list[tuple[list[str], int]], logs: Path, timeout: int) -> list[str]:
    """Runs ``(args, devices)`` python commands at once; asserts each exits 0 and returns their stdouts.

    Their output goes to files in ``logs``: through pipes read one process at a time, a process blocked
    writing to a full pipe would hang its peers in their next collective."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [(logs / f"{i}.out", logs / f"{i}.err") for i in range(len(commands))]
    procs = []
    for (args, devices), (out, err) in zip(commands, files, strict=True):
        with out.open("w") as stdout, err.open("w") as stderr:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    cwd=ROOT,
                    env=cpu_devices_env(devices),
                    stdout=stdout,
                    stderr=stderr,
                )
            )
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:  # a hung peer (e.g. the other failed before joining) must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [(out.read_text(), err.read_text()) for out, err in files]
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return [out for out, _ in outputs]


STAGES = ("sft", "pt", "rm", "dpo", "kto", "orpo", "simpo", "grpo", "ppo")
NOT_COMPARED = re.compile(r"^time$|^time/|_s$|mfu|seconds|compile")  # clocks, not results


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_stage_on_two_processes_equals_one_process_with_four_devices(tmp_path):
    """Each stage through the real command (tests/stages_worker.py), 2 processes x 2 devices against 1 x 4,
    started together: every logged training and evaluation metric at every step, the resumed sft step and
    the exported weights agree. The data reach both runs as the same global batches (data.process_split
    'rows'), the pair stages' length buckets and the RL prompts included."""
    address = f"127.0.0.1:{_free_port()}"
    worker = str(ROOT / "tests" / "stages_worker.py")
    one, two = tmp_path / "one", tmp_path / "two"
    outs = _run_together(
        [([worker, str(one), "0", "1", "", *STAGES], 4)]
        + [([worker, str(two), str(i), "2", address, *STAGES], 2) for i in range(2)],
        tmp_path / "logs",
        timeout=900,
    )
    for i, out in enumerate(outs[1:]):
        assert f"process {i}: ppo done" in out
    for stage in STAGES:
        single, multi = _metrics(one / stage), _metrics(two / stage)
        assert [(r["split"], r["step"]) for r in single] == [(r["split"], r["step"]) for r in multi], stage
        splits = {r["split"] for r in single}
        assert "train" in splits and ("eval" in splits or stage not in ("sft", "dpo", "grpo")), stage
        for a, b in zip(single, multi, strict=True):
            for key, value in a.items():
                if isinstance(value, float) and not NOT_COMPARED.search(key) and math.isfinite(value):
                    assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (stage, a["step"], key)
        weights = [load_file(str(d / stage / "final" / "model.safetensors")) for d in (one, two)]
        assert weights[0].keys() == weights[1].keys()
        for name, value in weights[0].items():
            np.testing.assert_allclose(weights[1][name], value, atol=5e-5, err_msg=f"{stage} {name}")
    assert max(r["step"] for r in _metrics(two / "sft")) == 3  # resumed across processes for step 3
