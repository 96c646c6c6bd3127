"""Stopping cleanly: signals, a wall-clock budget, and non-finite steps.

- ``StopSignals``: while the step loop runs, the first SIGTERM or SIGINT only asks it to stop; the loop
  finishes the step it is in, saves a checkpoint at that step and returns (exit 0), so a preemptible VM's
  notice or a Ctrl-C loses nothing. A second signal exits at once (status 128 + signal), keeping the last
  complete checkpoint. Outside the loop (setup, compilation before the loop installs its handler) the
  entry point's ``interrupt_handlers`` turn either signal into ``Interrupted``: a one-line message, no
  traceback.
- ``Deadline``: ``train.max_hours`` measured from the start of the loop; reaching it stops the same way.
- ``NonFinitePolicy``: what happens after ``max_consecutive`` steps in a row whose loss or gradient norm was
  not finite (each such update is skipped inside the compiled step, see ``train.step``): ``stop`` (an error
  naming the steps, exit 2, the last good checkpoint kept) or ``rollback`` (restore the last checkpoint and
  continue with the learning rate scaled by ``lr_factor``, at most ``max_rollbacks`` times).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from jaxrl_llm.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A signal that arrived outside the step loop (nothing to save yet)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row, or parameters that are not finite: nothing is exported."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signal_handler(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT inside the block (main thread only: elsewhere nothing changes)."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interrupt_handlers() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGINT raise ``Interrupted`` (the entry point reports it without a traceback)."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    return signal_handler(handler)


class StopSignals:
    """The loop's handler: records the first signal, exits at once on the second (see module docstring).
    Use it as ``with signal_handler(stop.handle):``."""

    def __init__(self) -> None:
        self.received: str | None = None

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(
                f"\n{name} again: exiting now without saving (the last complete checkpoint is kept)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.received = name
        print(
            f"\n{name}: stopping after this step and saving a checkpoint (send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )


@dataclasses.dataclass
class Deadline:
    """``max_hours`` of wall-clock time from ``start`` (None: no budget)."""

    max_hours: float | None
    start: float = dataclasses.field(default_factory=time.monotonic)

    def passed(self) -> bool:
        return self.max_hours is not None and time.monotonic() - self.start >= self.max_hours * 3600.0


@dataclasses.dataclass(frozen=True)
class NonFinitePolicy:
    """The ``train.nonfinite_*`` keys (see ``python -m jaxrl_llm.config``)."""

    max_consecutive: int = 10
    action: str = "stop"  # or "rollback"
    lr_factor: float = 0.5
    max_rollbacks: int = 3


@dataclasses.dataclass
class NonFiniteTracker:
    """Counts skipped (non-finite) steps from the metrics the loop fetches: in all, and in a row; ``row``
    holds ``(first step, length)`` of the first run of ``limit`` in a row, once one is seen."""

    limit: int
    skipped: int = 0
    in_a_row: int = 0
    first_of_row: int | None = None
    row: tuple[int, int] | None = None

    def observe(self, step0: int, fetched: list[dict[str, float]]) -> None:
        """``fetched``: the metrics of steps ``step0 + 1, step0 + 2, ...`` in order."""
        for i, m in enumerate(fetched):
            if m.get("skipped", 0.0) > 0:
                self.skipped += 1
                if self.in_a_row == 0:
                    self.first_of_row = step0 + i + 1
                self.in_a_row += 1
                if self.in_a_row >= self.limit and self.row is None:
                    self.row = (self.first_of_row, self.in_a_row)
            else:
                self.in_a_row, self.first_of_row = 0, None

    def reset(self) -> None:
        self.in_a_row, self.first_of_row, self.row = 0, None, None
