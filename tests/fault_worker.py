"""Fault injection for the tests: helpers, and a training run that is killed on purpose (run as a script).

    python tests/fault_worker.py MODE STEP -- TRAIN_ARGS...

MODE ``kill-mid-save``: SIGKILL the process right after the asynchronous save of checkpoint ``STEP`` has
started (while its files are being written). MODE ``two-signals``: send SIGTERM twice during step ``STEP``
(the second must exit at once, without saving).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from jaxrl_llm.checkpoint import manager
from jaxrl_llm.train import __main__ as train_main
from jaxrl_llm.train import loop

ROOT = Path(__file__).resolve().parents[1]


def run_worker(mode: str, step: int, *args: str) -> subprocess.CompletedProcess:
    """This file as a subprocess: a training run with ``args`` that ``mode`` interrupts at ``step``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__)), mode, str(step), "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def checkpoints(run_dir: Path) -> list[int]:
    """The complete checkpoints' steps in ``run_dir``."""
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def signal_at_call(monkeypatch, module, n: int, signum: int) -> None:
    """Sends ``signum`` to this process while the ``n``-th training batch is being placed on the device
    (``module.to_device``, patched)."""
    real, calls = module.to_device, {"n": 0}

    def to_device(batch, mesh):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return real(batch, mesh)

    monkeypatch.setattr(module, "to_device", to_device)


def main() -> int:
    mode, step = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    if mode == "kill-mid-save":
        real_save = manager.Checkpointer.save

        def save(self, at, *a, **k):
            started = real_save(self, at, *a, **k)
            if at == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return started

        manager.Checkpointer.save = save
    elif mode == "two-signals":
        real_merge = loop.Progress.update

        def update(self, done, *a, **k):
            if done == step:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return real_merge(self, done, *a, **k)

        loop.Progress.update = update
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return train_main.main(args)


if __name__ == "__main__":
    sys.exit(main())
