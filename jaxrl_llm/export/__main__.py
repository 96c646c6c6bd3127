"""``python -m jaxrl_llm.export RUN_DIR [--step N] --out DIR``: one checkpoint of a training run as an HF
checkpoint directory that HF transformers loads on its own.

DIR receives the safetensors, ``config.json`` and ``generation_config.json`` (with the end-of-turn ids HF
``generate`` stops at, and the pad id HF's sequence classifiers need), and the tokenizer files with the chat
template the run trained with: the files the run writes to ``final/`` for its last step. ``--step`` picks
the checkpoint (default: the last one kept); when its parameters are the run's final ones, it says so. A LoRA
run's export has its adapters merged into the base (``model.path``, loaded again); ``--adapter`` writes the
adapters alone as a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
``python -m jaxrl_llm.sanity DIR`` then checks the export against HF transformers. Exit codes: 0 exported,
2 a usage mistake, a folder that is not a run, or a step the run does not have (one line on stderr, no
traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "jaxrl_llm.export"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    p.add_argument("run", metavar="RUN_DIR", help="a training run's directory (or its name under runs/)")
    p.add_argument("--step", type=int, metavar="N", help="the checkpoint's step (default: the last one kept)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder the HF checkpoint is written to")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's adapters alone, as a PEFT adapter directory (default: merged into the base)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)  # exits 2 with argparse's usage message on a bad command line
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError

    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder")
        from jaxrl_llm.runs import export_checkpoint, export_lines, latest_step, resolve_run

        run_dir = resolve_run(args.run)
        step = latest_step(run_dir) if args.step is None else args.step
        out, digest = export_checkpoint(run_dir, step, out, adapter=args.adapter)
        lines = export_lines(run_dir, step, out, digest)
    # A missing run, a step it does not have, a checkpoint that cannot be read: one line, no traceback.
    except (UserError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
