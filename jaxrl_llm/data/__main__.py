"""``python -m jaxrl_llm.data validate SOURCE [...]``: check a dataset and print its counts and version.

Every record is read (``on_error="skip"``), so one run reports all the problems: the counts (read,
accepted, rejected, filtered by reason), the content hash (the dataset's version) and the first errors,
each naming the file, the record and the field. Exit codes: 0 every record was accepted or filtered,
1 some were rejected, 2 the source itself cannot be read (or the command line is wrong).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from jaxrl_llm.data.records import KINDS

PROG = "python -m jaxrl_llm.data"
SHOWN_ERRORS = 5
EXIT_REJECTED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "validate",
        help="read, validate and filter a dataset; print counts, the content hash and the first errors",
        description=__doc__.split("\n\n", 1)[1],
    )
    check.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="dataset file or directory; with --name, may be the dataset_info.json (or its directory); "
        "may be left out when --dataset-info names the registry",
    )
    check.add_argument("--format", default="auto", help="source format (default: auto, from the file name)")
    check.add_argument("--kind", default="auto", choices=("auto", *KINDS), help="record kind (default: auto)")
    check.add_argument("--dataset-info", metavar="FILE", help="LLaMA-Factory dataset_info.json (with --name)")
    check.add_argument("--name", help="dataset name in --dataset-info")
    check.add_argument("--tokenizer", metavar="DIR", help="token-length filter (not implemented yet)")
    check.add_argument("--template", metavar="NAME", help="chat template (not implemented yet)")
    check.add_argument(
        "--rejects", metavar="OUT.jsonl", help="write rejected records here, one JSON line each"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.add_argument("--max-turns", type=_positive_int, metavar="N", help="drop records with more messages")
    check.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.tokenizer or args.template:
        # TODO(issue 3, item 6): token-length bounds after rendering need the renderer.
        return "--tokenizer/--template: not implemented yet (token-length filtering comes with rendering)"
    if args.dataset_info and not args.name:
        return "--dataset-info needs --name: the dataset to read from the registry"
    if not args.source and not args.dataset_info:
        return "SOURCE is required unless --dataset-info FILE --name NAME names the dataset"
    return None


def summary(loaded: Any, source: str) -> dict[str, Any]:
    """The report of ``validate`` as one JSON-ready dict."""
    return {
        "source": source,
        "format": loaded.manifest["sources"][0]["format"],
        "kind": loaded.kind,
        **loaded.counts.as_dict(),
        "content_hash": loaded.content_hash,
        "first_errors": loaded.errors[:SHOWN_ERRORS],
    }


def _print_text(report: dict[str, Any], rejects: str | None) -> None:
    filtered = report["filtered"]
    detail = ", ".join(f"{reason} {n}" for reason, n in filtered.items())
    print(f"source:       {report['source']} (format {report['format']}, kind {report['kind']})")
    print(f"read:         {report['read']}")
    print(f"accepted:     {report['accepted']}")
    print(f"rejected:     {report['rejected']}")
    print(f"filtered:     {sum(filtered.values())}" + (f" ({detail})" if detail else ""))
    print(f"content hash: {report['content_hash']}")
    if report["first_errors"]:
        shown = len(report["first_errors"])
        print(f"first errors ({shown} of {report['rejected']}):")
        for line in report["first_errors"]:
            print(f"  {line}")
    if rejects:
        print(f"rejects:      {rejects}")


def _validate(args: argparse.Namespace) -> int:
    from jaxrl_llm.data.filters import FilterConfig
    from jaxrl_llm.data.load import load_dataset

    filters = FilterConfig(dedup=not args.no_dedup, max_turns=args.max_turns)
    loaded = load_dataset(
        args.source,
        format=args.format,
        kind=args.kind,
        dataset_info=args.dataset_info,
        name=args.name,
        on_error="skip",
        rejects_path=args.rejects,
        filters=filters,
    )
    report = summary(loaded, args.source or f"{args.dataset_info}#{args.name}")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print_text(report, args.rejects)
    return EXIT_REJECTED if loaded.counts.rejected else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError

    args = _parser().parse_args(argv)  # exits 2 with argparse's usage message on a bad command line
    problem = _usage_problem(args)
    if problem:
        print(f"{PROG} {args.command}: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return _validate(args)
    except UserError as err:  # the source cannot be read: one line, no traceback
        print(f"{PROG} {args.command}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
