"""``python -m jaxrl_llm.runs {list,show,diff,export} ...``: the runs under a folder, one run, two runs
compared, or one checkpoint exported.

- ``list [DIR]`` (default ``runs/``): one line a run (date, name, stage, model, steps done/total, last
  loss, main eval metric, data hash, status), oldest first;
- ``show RUN``: its config highlights, data, tokenizer, model source, checkpoints with their metrics,
  final export, devices, versions and commit;
- ``diff RUN_A RUN_B``: config keys that differ, then data files, tokenizer, model source, versions,
  commit and devices, then the final metrics side by side with their deltas;
- ``export RUN --step N [--out DIR]``: checkpoint N as an HF checkpoint (default ``RUN/export-step-N``).

RUN is a run directory, or the name of one under ``runs/``. Exit codes: 0 done, 2 a usage mistake, a
missing run, a folder that is not a run or a step the run does not have (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "jaxrl_llm.runs"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description="Browse, compare and export training runs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="one line per run found under DIR (default runs/)")
    listing.add_argument("dir", nargs="?", default="runs", metavar="DIR")
    show = commands.add_parser("show", help="one run's artifacts: config, data, model, checkpoints, versions")
    show.add_argument("run", metavar="RUN")
    diff = commands.add_parser(
        "diff", help="what differs between two runs: config and data first, then metrics"
    )
    diff.add_argument("run_a", metavar="RUN_A")
    diff.add_argument("run_b", metavar="RUN_B")
    export = commands.add_parser("export", help="a checkpoint's parameters as an HF checkpoint directory")
    export.add_argument("run", metavar="RUN")
    export.add_argument("--step", type=int, required=True, metavar="N", help="the checkpoint's step")
    export.add_argument("--out", metavar="DIR", help="output folder (default RUN/export-step-N)")
    return parser


def _run(args: argparse.Namespace) -> list[str]:
    from jaxrl_llm.runs import (
        diff_lines,
        export_checkpoint,
        export_lines,
        list_lines,
        resolve_run,
        show_lines,
    )

    if args.command == "list":
        return list_lines(args.dir)
    if args.command == "show":
        return show_lines(resolve_run(args.run))
    if args.command == "diff":
        return diff_lines(resolve_run(args.run_a), resolve_run(args.run_b))
    run_dir = resolve_run(args.run)
    out, digest = export_checkpoint(run_dir, args.step, Path(args.out) if args.out else None)
    return export_lines(run_dir, args.step, out, digest)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)  # exits 2 with argparse's usage message on a bad command line
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError

    try:
        lines = _run(args)
    except (UserError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `runs list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
