"""``python -m jaxrl_llm.train --config configs/X.py [--config.a.b=value ...]``.

Parses and validates the config before anything heavy is imported, prints the resolved config, then runs
the stage named by ``config.stage``. Exit codes: 0 done (or stopped by SIGTERM/SIGINT/``train.max_hours``
with a checkpoint saved), 2 user error (configuration, paths, checkpoints, data; a run that diverged),
128 + the signal for a signal before the first step or a second signal.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence

PROG = "jaxrl_llm.train"
EXIT_CONFIG_ERROR = 2  # the same status as any other user error (jaxrl_llm.errors.EXIT_USER_ERROR)

USAGE = f"""\
usage: python -m {PROG} [--config PATH] [--config.KEY=VALUE ...]

  --config PATH          a Python file whose get_config() returns the config (e.g. configs/quickstart.py);
                         without it the base config is used
  --config.KEY=VALUE     override one key, e.g. --config.optimizer.lr=1e-4 --config.train.steps 200;
                         applied in order; VALUE is parsed as the key's type (bool: true/false,
                         nullable keys: none)
  -h, --help             show this message

Every key with its default, allowed values and meaning: python -m jaxrl_llm.config
The config is validated and printed before training starts; config.stage selects what runs.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE, end="")
        return 0
    # Only the config package is imported up to here, so a mistake is reported in well under a second.
    from jaxrl_llm.config import ConfigError, format_config, parse_args

    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        problems = "\n".join(f"  {p}" for p in err.problems)
        print(f"{PROG}: configuration error:\n{problems}", file=sys.stderr)
        print(f"(see python -m {PROG} --help, and python -m jaxrl_llm.config for every key)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"{PROG}: resolved config:\n{format_config(cfg)}", flush=True)

    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError
    from jaxrl_llm.train.faults import Interrupted, interrupt_handlers

    try:
        # Until the step loop installs its own handler (save, then exit 0), a signal stops at once.
        with interrupt_handlers():
            from jaxrl_llm.train.stages import run_stage

            return run_stage(cfg)
    except (UserError, OSError) as err:  # a bad path, checkpoint, mesh or dataset found while running
        print(f"{PROG}: {_disk_full(err, cfg.run_dir) or err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as stop:
        print(f"{PROG}: {stop} before the first training step: stopped, nothing to save", file=sys.stderr)
        return 128 + stop.signum
    except Exception as err:  # a full disk as another library reports it (tokenizers, TensorStore)
        if not (message := _disk_full(err, cfg.run_dir)):
            raise
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


_DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded")


def _disk_full(err: BaseException, run_dir: str) -> str | None:
    """The message for a write that found the disk full, naming the run directory (a flush names no file,
    and a Rust or C++ library's error is not an OSError), or None for any other error."""
    from jaxrl_llm.errors import UserError

    if isinstance(err, UserError) and "no space left on device" in str(err):
        return None  # already names its directory (the checkpoint manager's)
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in str(err) for s in _DISK_FULL
    )
    if not full:
        return None
    return (
        f"{run_dir}: no space left on device ({str(err).splitlines()[0][:200]}); free space and run the same "
        "command again (training resumes from the last complete checkpoint)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
