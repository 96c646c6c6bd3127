"""The memory planner's command line (``python -m jaxrl_llm.bench memory``): its flags, the ``MemorySpec``
they describe, and the plan as a table (``jaxrl_llm.bench.memory`` does the planning)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

from ..errors import UserError
from ..parallel import MESH_AXES
from ..parallel.mesh import resolve_axis_sizes
from .memory import DEFAULT_LORA_RANK, PAIR_STAGES, RL_STAGES, STAGES, MemorySpec

DEFAULT_FIT_MAX = 4096

_LABELS = {
    "optimizer_state": "optimizer state",
    "activations": "activations (compiled temp)",
    "kv_cache": "KV cache",
}


def parse_mesh(text: str, devices: int | None = None) -> tuple[int, int, int]:
    """``"data=1,fsdp=8,tensor=1"`` -> ``(1, 8, 1)``; an axis left out is 1. With ``devices`` the sizes must
    multiply to it, and one axis may be -1 (the rest), as in the config's ``parallel`` section."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.strip().lstrip("-").isdigit():
            raise UserError(
                f"--mesh {text!r}: expected axis=size pairs over {', '.join(MESH_AXES)} (e.g. data=1,fsdp=8,tensor=1)"
            )
        sizes[name] = int(value)
    found = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    if devices is not None:
        return resolve_axis_sizes(found, devices)  # a MeshError naming the axes when they do not fit
    if any(s < 1 for s in found):
        raise UserError(f"--mesh {text!r}: every size must be >= 1 (-1 only with --devices N)")
    return found


def format_table(result: dict[str, Any]) -> str:
    """The plan as a few lines of text: what was sized, then GiB per device by row."""
    s = result["settings"]
    mesh = ",".join(f"{k}={v}" for k, v in s["mesh"].items())
    mb = s["micro_batch"]
    lora = f", LoRA rank {s['lora_rank']}" if s["lora_rank"] is not None else ""
    lines = [
        f"{s['preset']} stage {s['stage']} on {mesh} ({result['devices']} devices){lora}",
        f"micro-batch {mb['rows']} rows (all devices) x {mb['length']} tokens; params {s['param_dtype']}, compute "
        f"{s['dtype']}, remat {s['remat']}, scan_layers {s['scan_layers']}, reference {s['reference']}",
        f"{result['param_count']:,} parameters, {result['trained_param_count']:,} trained",
        f"{'':<29}{'GiB per device':>15}",
    ]
    for name, value in result["bytes_per_device"].items():
        shown = "not compiled" if value is None else f"{value / 2**30:,.3f}"
        lines.append(f"{_LABELS.get(name, name):<29}{shown:>15}")
    compiled = result["compiled"]
    if compiled and compiled["step"]:
        step = compiled["step"]
        what = " (the update only: no cache, no reference pass)" if s["stage"] in RL_STAGES else ""
        lines.append(f"{'compiled train step peak':<29}{step['peak'] / 2**30:>15,.3f}{what}")
    if compiled:
        seconds = compiled["gradients"]["compile_s"] + (compiled["step"] or {}).get("compile_s", 0)
        lines.append(f"(compiled in {seconds:.1f}s on {result['devices']} simulated CPU devices)")
    if "fit" in result:
        lines.append(fit_line(result["fit"]))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The ``memory`` subcommand's flags."""
    parser.add_argument("--preset", required=True, help="model preset (jaxrl_llm.models.presets)")
    parser.add_argument(
        "--mesh", default="data=1,fsdp=1,tensor=1", help="axis sizes, e.g. data=1,fsdp=8,tensor=1"
    )
    parser.add_argument(
        "--devices", type=int, help="the mesh must use this many devices (one axis may be -1)"
    )
    parser.add_argument("--stage", default="sft", choices=STAGES)
    parser.add_argument("--batch", type=int, default=8, help="rows (sft, pt), pairs/examples, or RL prompts")
    parser.add_argument(
        "--seq-len", type=int, help="sft, pt: row tokens; pair stages: a side's (default 256)"
    )
    parser.add_argument("--prompt-len", type=int, help="grpo, ppo: prompt tokens (default 256)")
    parser.add_argument("--new-tokens", type=int, help="grpo, ppo: completion tokens (default 256)")
    parser.add_argument("--group", type=int, help="grpo, ppo: completions per prompt (default 8)")
    parser.add_argument("--minibatches", type=int, help="grpo, ppo: updates an epoch (default 1)")
    parser.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base")
    parser.add_argument(
        "--lora-rank", type=int, help=f"LoRA rank (default {DEFAULT_LORA_RANK}; implies --lora)"
    )
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--optimizer-state-dtype",
        default="param",
        choices=("param", "float32"),
        help="optimizer.state_dtype: Adam's moments in --param-dtype (param) or float32",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--no-scan-layers", dest="scan_layers", action="store_false", help="unrolled blocks")
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        help="keep a frozen reference (default: dpo, kto, ppo yes; grpo no, as with rl.beta=0)",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled figure")
    parser.add_argument(
        "--fit-gib",
        type=float,
        metavar="G",
        help="instead of planning --batch, search the largest batch whose per-device need (total, or the "
        "compiled step peak where larger) fits in G GiB: doubling, then bisecting, in multiples of what "
        "the mesh's data x fsdp devices (and --accum) split",
    )
    parser.add_argument(
        "--fit-max",
        type=int,
        default=DEFAULT_FIT_MAX,
        metavar="N",
        help=f"--fit-gib: the largest batch tried (default {DEFAULT_FIT_MAX})",
    )


def spec_from_args(args) -> MemorySpec:
    """A ``MemorySpec`` from the parsed flags; a ``UserError`` for flags the stage does not take."""
    rl = args.stage in RL_STAGES
    rl_flags = ("prompt_len", "new_tokens", "group", "minibatches")
    wrong = ["--seq-len"] if rl and args.seq_len is not None else []
    if not rl:
        wrong = ["--" + f.replace("_", "-") for f in rl_flags if getattr(args, f) is not None]
    if wrong:
        takes = "--prompt-len, --new-tokens, --group" if rl else "--seq-len"
        raise UserError(f"{', '.join(wrong)}: stage {args.stage!r} does not take it (it takes {takes})")
    given = {f: getattr(args, f) for f in ("seq_len", *rl_flags) if getattr(args, f) is not None}
    lora = args.lora_rank if args.lora_rank is not None else DEFAULT_LORA_RANK if args.lora else None
    return MemorySpec(
        preset=args.preset,
        mesh=parse_mesh(args.mesh, args.devices),
        stage=args.stage,
        batch=args.batch,
        accum=args.accum,
        lora_rank=lora,
        remat=args.remat,
        param_dtype=args.param_dtype,
        state_dtype=args.optimizer_state_dtype,
        dtype=args.dtype,
        scan_layers=args.scan_layers,
        reference=args.reference,
        **given,
    )


# ------------------------------------------------------------------------------------------ --fit-gib


@dataclasses.dataclass(frozen=True)
class Fit:
    """What ``largest_fit`` found: ``batch`` the largest that fits (0: none does) and ``need`` its bytes;
    ``next_batch`` the next multiple of ``step`` and ``next_need`` its bytes (None where the search stopped
    at ``max_batch`` with everything tried fitting); ``tried`` every batch planned, in order."""

    limit: int
    batch: int
    need: int | None
    next_batch: int | None
    next_need: int | None
    step: int
    max_batch: int
    tried: dict[int, int]


def largest_fit(
    need: Callable[[int], int], limit: int, *, step: int = 1, max_batch: int = DEFAULT_FIT_MAX
) -> Fit:
    """The largest multiple of ``step`` up to ``max_batch`` whose ``need(batch)`` (bytes; assumed to grow
    with the batch) is at most ``limit``: ``step``, 2, 4, 8 ... times it until one does not fit (or the
    next would pass ``max_batch``, which is then tried itself), then bisection between the last that fit
    and the first that did not. ``need`` runs once per batch, about 2 log2(answer / step) times."""
    if step < 1 or max_batch < step:
        raise ValueError(f"step {step} and max_batch {max_batch}: need 1 <= step <= max_batch")
    tried: dict[int, int] = {}

    def fits(k: int) -> bool:  # k multiples of step
        if k * step not in tried:
            tried[k * step] = need(k * step)
        return tried[k * step] <= limit

    top = max_batch // step
    lo, hi, k = 0, None, 1  # lo: the most multiples known to fit (0: none); hi: the fewest known not to
    while k <= top:
        if not fits(k):
            hi = k
            break
        lo, k = k, 2 * k
    if hi is None and lo < top:
        if fits(top):
            lo = top
        else:
            hi = top
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    batch, next_batch = lo * step, None if hi is None else hi * step
    return Fit(
        limit=limit,
        batch=batch,
        need=tried.get(batch),
        next_batch=next_batch,
        next_need=None if next_batch is None else tried[next_batch],
        step=step,
        max_batch=max_batch,
        tried=tried,
    )


def batch_step(spec: MemorySpec) -> int:
    """The smallest ``--batch`` that ``MemorySpec.check`` lets the mesh split; every valid batch is a
    multiple of it. sft, pt and the pair stages: ``accum`` micro-batches of a multiple of data x fsdp rows.
    RL: prompts a multiple of data x fsdp, and ``batch x group`` rows a multiple of
    ``minibatches x accum x data x fsdp``."""
    split = spec.data_split
    if spec.stage in RL_STAGES:
        rows = spec.minibatches * spec.accum * split
        return math.lcm(split, rows // math.gcd(rows, spec.group))
    return spec.accum * split


def plan_need(result: dict[str, Any]) -> int:
    """The bytes a plan says a device needs: ``total``, or the compiled train step's peak where larger."""
    total = result["bytes_per_device"]["total"]
    step = (result.get("compiled") or {}).get("step") or {}
    return max(total, step.get("peak", 0))


def _shape_words(spec: MemorySpec) -> str:
    if spec.stage in RL_STAGES:
        return f"prompt-len {spec.prompt_len} + new-tokens {spec.new_tokens}, group {spec.group}"
    if spec.stage in PAIR_STAGES:
        return f"seq-len {spec.seq_len} a side"
    return f"seq-len {spec.seq_len}"


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 4)


def fit_line(fit: dict[str, Any]) -> str:
    """The search's result in one line (``fit`` as ``fit_json`` writes it)."""
    where = f"in {fit['limit_gib']:g} GiB at {fit['shape']}"
    if fit["batch"] == 0:
        return (
            f"nothing fits {where}: the smallest batch, {fit['next_batch']}, needs "
            f"{fit['next_total_gib']:.4g} GiB (batch 0)"
        )
    found = f"largest batch that fits {where}: {fit['batch']} ({fit['total_gib']:.4g} GiB)"
    if fit["next_batch"] is None:
        return f"{found}; the search stopped at --fit-max {fit['max_batch']} below the limit"
    return f"{found}; {fit['next_batch']} needs {fit['next_total_gib']:.4g} GiB"


def fit_json(fit: Fit, spec: MemorySpec, limit_gib: float) -> dict[str, Any]:
    """The search's result as the ``--json`` output's ``fit``: batches, bytes and GiB per device."""
    return {
        "limit_gib": limit_gib,
        "batch": fit.batch,
        "total_gib": _gib(fit.need),
        "next_batch": fit.next_batch,
        "next_total_gib": _gib(fit.next_need),
        "total_bytes": fit.need,
        "next_total_bytes": fit.next_need,
        "step": fit.step,
        "max_batch": fit.max_batch,
        "shape": _shape_words(spec),
        "need": "the plan's total, or the compiled train step peak where larger",
        "tried_gib": {str(b): _gib(v) for b, v in fit.tried.items()},
    }


def run_memory(args) -> dict[str, Any]:
    """The ``memory`` subcommand: the plan at ``--batch``, or with ``--fit-gib`` the plan at the largest
    batch that fits (at the smallest when none does) with the search's result under ``fit``."""
    from .memory import plan_memory

    spec = spec_from_args(args)
    if args.fit_gib is None:
        return plan_memory(spec, compile=args.compile)
    if args.fit_gib <= 0:
        raise UserError(f"--fit-gib {args.fit_gib:g}: must be above 0")
    step = batch_step(spec)
    if args.fit_max < step:
        raise UserError(f"--fit-max {args.fit_max}: below the smallest batch the mesh splits, {step}")
    dataclasses.replace(spec, batch=step).check()  # any other mistake, before the first plan
    plans: dict[int, dict[str, Any]] = {}

    def need(batch: int) -> int:
        plans[batch] = plan_memory(dataclasses.replace(spec, batch=batch), compile=args.compile)
        print(f"  batch {batch}: {plan_need(plans[batch]) / 2**30:.4g} GiB", file=sys.stderr, flush=True)
        return plan_need(plans[batch])

    if not args.compile:
        print(
            "--fit-gib with --no-compile: no activations, so only an RL stage's KV cache grows with the batch",
            file=sys.stderr,
        )
    fit = largest_fit(need, round(args.fit_gib * 2**30), step=step, max_batch=args.fit_max)
    return {**plans[fit.batch or step], "fit": fit_json(fit, spec, args.fit_gib)}
