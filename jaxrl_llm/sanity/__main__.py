"""``python -m jaxrl_llm.sanity RUN_DIR_OR_HF_DIR [--prompts FILE] [--max-new-tokens N] [--atol X]``.

Loads the checkpoint (an HF checkpoint directory, or a run directory's ``final/``) in HF transformers
(PyTorch on CPU, float32; a test extra) and with this project's models, renders a few prompts with the chat
template the run trained with (the run's canary prompts, ``--prompts``, else a few generic ones) and prints
a pass/fail table: the declared stop and pad ids; max |Δlogit| on each prompt; HF ``generate``'s greedy
continuation (with the checkpoint's own generation config) against our sampler's, token for token to the
stop token, with the first diverging token; for a reward model each score alone and in a padded batch.
Exit codes: 0 every check passed (``warn`` rows included), 1 a check failed, 2 a usage mistake or a target,
prompt file or missing PyTorch that prevents checking (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "jaxrl_llm.sanity"


def _parser() -> argparse.ArgumentParser:
    from jaxrl_llm.sanity.checks import DEFAULT_ATOL

    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description="Check a checkpoint against HF transformers."
    )
    p.add_argument(
        "target", metavar="RUN_DIR_OR_HF_DIR", help="an HF checkpoint or a training run's directory"
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="JSON Lines of prompts (a string, a message list or {prompt, ground_truth} a line); default: "
        "the run's canary prompts, else a few generic ones",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="greedy budget (default 32)")
    p.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        metavar="X",
        help=f"max |Δlogit| (default {DEFAULT_ATOL:g})",
    )
    p.add_argument(
        "--template", metavar="NAME", help="chat template (default: the run's, else the tokenizer's)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def table(report) -> str:
    """The checks as a fixed-width table."""
    head = ("check", "max |Δlogit|", "first diverging token", "verdict", "note")
    rows = [
        (
            c.name,
            "-" if c.max_delta is None else f"{c.max_delta:.2e}",
            c.diverge or "-",
            c.verdict,
            c.note,
        )
        for c in report.checks
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = []
    for r in [head, tuple("-" * w for w in widths) + ("-" * 4,), *rows]:
        lines.append("  ".join(f"{v:<{w}}" for v, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)  # exits 2 with argparse's usage message on a bad command line
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError
    from jaxrl_llm.sanity.checks import Settings, read_prompt_file, run_checks

    try:
        prompts = read_prompt_file(args.prompts) if args.prompts else None
        settings = Settings(prompts, args.max_new_tokens, args.atol, args.template)
        report = run_checks(args.target, settings)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    # A target, prompt file or template that cannot be used, or no PyTorch: one line, no traceback.
    except (UserError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(
        f"{report.model_dir} ({report.head} head, template {report.template}, {report.prompts} prompts, "
        f"atol {args.atol:g}) against HF transformers"
    )
    print(table(report))
    failed = sum(c.failed for c in report.checks)
    print(
        f"{failed} of {len(report.checks)} checks failed"
        if failed
        else f"all {len(report.checks)} checks passed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
