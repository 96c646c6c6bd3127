"""A training run that is killed on purpose, for tests/test_train_faults.py (run as a subprocess).

    python tests/fault_worker.py MODE STEP -- TRAIN_ARGS...

MODE ``kill-mid-save``: SIGKILL the process right after the asynchronous save of checkpoint ``STEP`` has
started (while its files are being written). MODE ``two-signals``: send SIGTERM twice during step ``STEP``
(the second must exit at once, without saving).
"""

from __future__ import annotations

import os
import signal
import sys

from jaxrl_llm.checkpoint import manager
from jaxrl_llm.train import __main__ as train_main
from jaxrl_llm.train import loop


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
