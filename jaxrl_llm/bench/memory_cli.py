"""The memory planner's command line (``python -m jaxrl_llm.bench memory``): its flags, the ``MemorySpec``
they describe, and the plan as a table (``jaxrl_llm.bench.memory`` does the planning)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError
from ..parallel import MESH_AXES
from ..parallel.mesh import resolve_axis_sizes
from .memory import DEFAULT_LORA_RANK, RL_STAGES, STAGES, MemorySpec

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
