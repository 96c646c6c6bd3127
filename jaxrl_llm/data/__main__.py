"""``python -m jaxrl_llm.data validate SOURCE [...]``: check a dataset and print its counts and version.

Every record is read (``on_error="skip"``), so one run reports all the problems: the counts (read,
accepted, rejected, filtered by reason), the content hash (the dataset's version) and the first errors,
each naming the file, the record and the field.

With ``--tokenizer DIR`` records are also rendered, through the tokenizer's own chat template or the
built-in ``--template NAME``: ``--min-tokens``/``--max-tokens`` filter by rendered length (a record the
template cannot render is rejected with its error), and the train/inference parity check runs on
``--parity-sample N`` accepted records (default 100, 0 = none), reporting how many fail and the first
failures (record, turn, first differing token).

Exit codes: 0 every record was accepted or filtered (and the parity sample passed), 1 some were rejected
or the parity check failed, 2 the source is empty or cannot be used, the tokenizer or template cannot be
used, or the command line is wrong.
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
PARITY_SAMPLE = 100


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
    check.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="HF tokenizer directory or SentencePiece .model: render records, check parity on a sample",
    )
    check.add_argument(
        "--template",
        metavar="NAME",
        help="built-in chat template (chatml, llama3, qwen, gemma, plain); default: the tokenizer's own",
    )
    check.add_argument(
        "--mask", choices=("all", "last"), help="assistant turns the parity check covers (default: all)"
    )
    check.add_argument("--min-tokens", type=_positive_int, metavar="N", help="drop shorter rendered records")
    check.add_argument("--max-tokens", type=_positive_int, metavar="N", help="drop longer rendered records")
    check.add_argument(
        "--parity-sample",
        type=_count,
        metavar="N",
        help=f"records checked for train/inference parity (default {PARITY_SAMPLE}; 0 = none)",
    )
    check.add_argument(
        "--rejects", metavar="OUT.jsonl", help="write rejected records here, one JSON line each"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.add_argument("--max-turns", type=_positive_int, metavar="N", help="drop records with more messages")
    check.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    return parser


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, with a message naming what was given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _usage_problem(args: argparse.Namespace) -> str | None:
    needs_tokenizer = {
        "--template": args.template,
        "--mask": args.mask,
        "--min-tokens": args.min_tokens,
        "--max-tokens": args.max_tokens,
        "--parity-sample": args.parity_sample,
    }
    given = [flag for flag, value in needs_tokenizer.items() if value is not None]
    if given and not args.tokenizer:
        return f"{', '.join(given)}: needs --tokenizer DIR (records are rendered with it)"
    if args.min_tokens is not None and args.max_tokens is not None and args.min_tokens > args.max_tokens:
        return f"--min-tokens {args.min_tokens} exceeds --max-tokens {args.max_tokens}"
    if args.dataset_info and not args.name:
        return "--dataset-info needs --name: the dataset to read from the registry"
    if not args.source and not args.dataset_info:
        return "SOURCE is required unless --dataset-info FILE --name NAME names the dataset"
    return None


def summary(loaded: Any, source: str, renderer: Any = None, parity: Any = None) -> dict[str, Any]:
    """The report of ``validate`` as one JSON-ready dict; with a renderer it adds ``render`` (template
    name and sha256, tokenizer, mask) and ``parity`` (``checked``, ``failed``, first ``errors``)."""
    report = {
        "source": source,
        "format": loaded.manifest["sources"][0]["format"],
        "kind": loaded.kind,
        **loaded.counts.as_dict(),
        "content_hash": loaded.content_hash,
        "first_errors": loaded.errors[:SHOWN_ERRORS],
    }
    if renderer is not None:
        report["render"] = renderer.identity()
    if parity is not None:
        report["parity"] = parity.as_dict()
    return report


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
    if "render" in report:
        render = report["render"]
        print(
            f"template:     {render['template']} (sha256 {render['template_sha256']}, mask {render['mask']})"
        )
    if "parity" in report:
        parity = report["parity"]
        verdict = "ok" if not parity["failed"] else f"{parity['failed']} failed"
        print(f"parity:       {verdict} ({parity['checked']} records checked)")
        for line in parity["errors"]:
            print(f"  {line}")
    if rejects:
        print(f"rejects:      {rejects}")


def _renderer(args: argparse.Namespace) -> Any:
    if not args.tokenizer:
        return None
    from jaxrl_llm.render import Renderer, load_tokenizer

    return Renderer(load_tokenizer(args.tokenizer), args.template, mask=args.mask or "all")


def _validate(args: argparse.Namespace) -> int:
    from jaxrl_llm.data.filters import FilterConfig
    from jaxrl_llm.data.load import load_dataset, no_records_reason
    from jaxrl_llm.data.records import DataError

    renderer = _renderer(args)  # a bad tokenizer or template name fails before any record is read
    filters = FilterConfig(
        dedup=not args.no_dedup,
        max_turns=args.max_turns,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
    )
    loaded = load_dataset(
        args.source,
        format=args.format,
        kind=args.kind,
        dataset_info=args.dataset_info,
        name=args.name,
        on_error="skip",
        rejects_path=args.rejects,
        filters=filters,
        renderer=renderer,
    )
    if loaded.counts.read == 0:  # nothing to validate is not a valid dataset
        raise DataError(no_records_reason(loaded))
    parity = None
    if renderer is not None:
        from jaxrl_llm.render import parity_report

        n = PARITY_SAMPLE if args.parity_sample is None else args.parity_sample
        parity = parity_report(
            loaded.records, renderer, n, locations=loaded.locations, max_errors=SHOWN_ERRORS
        )
    report = summary(loaded, args.source or f"{args.dataset_info}#{args.name}", renderer, parity)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print_text(report, args.rejects)
    return EXIT_REJECTED if loaded.counts.rejected or (parity is not None and parity.failed) else 0


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
    # The source, tokenizer or template cannot be used, or a file cannot be read: one line, no traceback.
    except (UserError, OSError) as err:
        print(f"{PROG} {args.command}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
