"""``python -m jaxrl_llm.report RUN_DIR [RUN_DIR ...] [--out DIR] [--smoothing W]``.

Writes one PNG per metric panel and ``report.html`` (which links them) for the runs, overlaid. Output folder:
``RUN_DIR/report/`` for one run (where training writes its own report at the end of a run); for several runs
``--out`` is required, since no one run's folder is the right home for a comparison. Exit codes: 0 written,
2 a usage mistake or a folder that is not a run directory (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "jaxrl_llm.report"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="PNG plots and a one-page HTML summary of training runs (several are overlaid).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a training run directory")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default for one run: RUN_DIR/report; required for several runs)",
    )
    parser.add_argument(
        "--smoothing",
        type=float,
        default=None,
        metavar="W",
        help="EMA weight in [0, 1) of the smoothed curves, as TensorBoard's slider (0: none; default: by "
        "curve length, 0.34 at 16 points to ~0.9 from 100, as LLaMA-Factory's plot_loss)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError
    from jaxrl_llm.observe.report import REPORT_DIRNAME, write_report

    args = _parser().parse_args(argv)  # exits 2 with argparse's usage message on a bad command line
    smoothing = args.smoothing
    if smoothing is not None and not 0.0 <= smoothing < 1.0:
        print(f"{PROG}: --smoothing must be in [0, 1), got {smoothing}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.out is None and len(args.run_dirs) > 1:
        print(f"{PROG}: several runs need --out DIR (where to write the comparison)", file=sys.stderr)
        return EXIT_USER_ERROR
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / REPORT_DIRNAME
    try:
        written = write_report(args.run_dirs, out, smoothing)
    except UserError as err:  # a missing folder or one without metrics.jsonl: one line, no traceback
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{len(written) - 1} plots and the summary page: {written[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
