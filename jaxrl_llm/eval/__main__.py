"""``python -m jaxrl_llm.eval TARGET --data PATH [--verifier NAME ...] [--n 8 --temperature 0.7] ...``.

TARGET is an HF checkpoint directory or a training run's directory (its ``final/`` export, and from its
``train_config.json``: the chat template, the reward functions as default verifiers, and in RL runs the
rollout's ``max_new_tokens`` and stop strings). The records of ``--data`` (read as ``data.path``) are
evaluated by their kind with the evaluator training runs for ``eval.sets`` (``jaxrl_llm.train.eval_run``):
prompts (and conversations ending with an answer) are answered greedily and scored (accuracy, reward per
component; with ``--n`` > 1 also pass@k and maj@k), conversations and text give the held-out loss and
perplexity, preference pairs the pairwise accuracy (a reward model's scores, or a language model's
log-probs). Prints a table and writes the results as JSON (``--out``; for a run directory by default
``RUN_DIR/eval/<name>.json``). Exit codes: 0 evaluated, 2 a usage mistake or a target, dataset or verifier
that cannot be used (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "jaxrl_llm.eval"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "target", metavar="TARGET", help="an HF checkpoint directory or a training run's directory"
    )
    p.add_argument(
        "--data", required=True, metavar="PATH", help="the dataset (as data.path; synthetic:... too)"
    )
    p.add_argument("--format", default="auto", help="the dataset's format (as data.format; default auto)")
    p.add_argument("--kind", default="auto", help="the records' kind (as data.kind; default auto)")
    p.add_argument(
        "--verifier",
        action="append",
        metavar="NAME|JSON",
        help="a reward function scoring answers (repeatable): a name (math_verify) or a JSON entry as in "
        "reward.functions; default: the run's reward.functions, else math_verify",
    )
    p.add_argument("--n", type=int, default=1, help="sampled answers per prompt for pass@k/maj@k (default 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature with --n > 1")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --n > 1 (default 1)")
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="answer budget (default: the run's, else 256)"
    )
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N records")
    p.add_argument(
        "--template", metavar="NAME", help="chat template (default: the run's, else the tokenizer's)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="prompts (rows, pairs) a program call")
    p.add_argument(
        "--seq-len", type=int, metavar="N", help="packed row length for losses (default: the model's)"
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--name", help="the set's name in the output (default: the data file's stem)")
    p.add_argument(
        "--out", metavar="FILE.json", help="where the JSON goes (default: RUN_DIR/eval/<name>.json)"
    )
    return p


def _verifiers(values: Sequence[str] | None, run_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    from jaxrl_llm.errors import UserError

    if not values:
        return list(run_cfg.get("reward", {}).get("functions") or []) or [{"name": "math_verify"}]
    out = []
    for value in values:
        if value.lstrip().startswith(("{", "[")):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise UserError(f"--verifier {value!r}: not JSON ({err.msg})") from None
            out += parsed if isinstance(parsed, list) else [parsed]
        else:
            out.append({"name": value})
    from jaxrl_llm.reward import parse_specs

    parse_specs(out, where="--verifier")  # before the model loads: a wrong name fails fast
    return out


def _table(metrics: dict[str, float]) -> str:
    width = max(map(len, metrics), default=6)
    rows = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    rows += [
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items()
    ]
    return "\n".join(rows)


def _check(args: argparse.Namespace) -> str | None:
    for name in ("n", "batch_size", "limit", "max_new_tokens", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.n > 1 and args.temperature <= 0:
        return f"--n {args.n} samples at --temperature {args.temperature:g} are all the greedy answer"
    return None


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation the arguments describe; returns the results written as JSON."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl_llm.checkpoint.target import resolve_target, target_renderer
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.parallel import make_mesh
    from jaxrl_llm.reward import RewardSet
    from jaxrl_llm.train.eval_run import EvalSettings, RecordEvaluator
    from jaxrl_llm.train.eval_sets import load_records

    start = time.perf_counter()
    target = resolve_target(args.target)
    model_dir, run_dir, run_cfg = target.model_dir, target.run_dir, target.run_config
    rl = run_cfg.get("stage") in ("grpo", "ppo")
    rollout = run_cfg.get("rollout", {}) if rl else {}
    renderer = target_renderer(target, args.template)
    records, kind, counts = load_records(
        args.data, format=args.format, kind=args.kind, limit=args.limit, where="--data"
    )
    verifiers = _verifiers(args.verifier, run_cfg) if kind in ("prompt", "conversation") else []
    mesh = make_mesh(data=1, fsdp=-1)  # parameters and rows over every device
    model = load_hf(model_dir, dtype=getattr(jnp, args.dtype), mesh=mesh)
    head = "score" if getattr(model, "score", None) is not None else "lm"
    graphdef, params = nnx.split(model, nnx.Param)
    settings = EvalSettings(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens or int(rollout.get("max_new_tokens") or 256),
        stop=tuple(rollout.get("stop") or ()),
        batch_size=args.batch_size,
        seq_len=args.seq_len or model.cfg.max_seq_len,
        seed=args.seed,
    )
    rewards = RewardSet(verifiers, tokenizer=renderer.tokenizer) if verifiers and head == "lm" else None
    try:
        evaluator = RecordEvaluator(
            graphdef, renderer, records, kind, settings, rewards=rewards, mesh=mesh, head=head
        )
        result = evaluator(params)
    finally:
        if rewards is not None:
            rewards.close()
    name = args.name or Path(args.data.split("?")[0].split(":")[-1]).stem or "data"
    return {
        "name": name,
        "target": str(args.target),
        "model": str(model_dir),
        "head": head,
        "data": args.data,
        "kind": kind,
        "records": len(records),
        "rejected": counts.rejected,
        "template": renderer.template_name,
        "verifiers": verifiers,
        "settings": {k: v for k, v in vars(settings).items() if k != "examples"}
        | {"stop": list(settings.stop)},
        "metrics": result.metrics,
        "notes": result.notes,
        "examples": result.examples,
        "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
        "seconds": round(time.perf_counter() - start, 2),
        "_run_dir": str(run_dir) if run_dir else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)  # exits 2 with argparse's usage message on a bad command line
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError

    problem = _check(args)
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        results = evaluate(args)
        run_dir = results.pop("_run_dir")
        out = (
            Path(args.out)
            if args.out
            else Path(run_dir) / "eval" / f"{results['name']}.json"
            if run_dir
            else None
        )
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    # A target, dataset, template or verifier that cannot be used: one line, no traceback.
    except (UserError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(
        f"{results['name']}: {results['records']} {results['kind']} records, {results['model']} ({results['head']})"
    )
    print(_table(results["metrics"]))
    for key, note in results["notes"].items():
        print(f"  {key}: {note}")
    for ex in results["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['greedy']!r} (ground truth {ex['ground_truth']!r})")
    print(f"results: {out}" if out is not None else "results: not written (set --out FILE.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
