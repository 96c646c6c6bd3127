"""One markdown table from the JSON files that ``python -m jaxrl_llm.bench ... --json`` writes.

    python scripts/bench_table.py DIR [--out FILE]

scripts/bench_all.sh runs it on its output directory. Each result is one row (a ``serve`` result one row per
stream count): what was measured, the device, our number, the peer's from the same run (HF transformers or
TRL), the ratio (the bench's own ``speedup``: above 1 means ours is faster) and the fraction of this machine's
limit the bench measured in the same run (the matmul peak; for rollouts the roofline limit of prefill at the
matmul peak plus decode at the read bandwidth). A ``memory`` plan is one row of GiB per device; with
``--fit-gib`` the largest batch that fits, the next batch's need, and the fraction of the limit it uses. Files are read in name order (bench_all.sh numbers them in the
README's order); a JSON that is not a bench result is named under the table and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

HEADER = ("benchmark", "device", "ours", "peer (same run)", "ratio", "fraction of limit")
_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    device: str = "—"
    ours: str = "—"
    peer: str = "—"
    ratio: str = "—"
    fraction: str = "—"


def _dtype(r: dict) -> str:
    compute = _DTYPES.get(r.get("dtype", ""), r.get("dtype", "?"))
    params = r.get("param_dtype")
    return (
        compute if params in (None, r.get("dtype")) else f"{compute} (params {_DTYPES.get(params, params)})"
    )


def _rate(x: float) -> str:
    return f"{x:,.0f} tokens/s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _peer(r: dict, value: str) -> str:
    name = str(r.get("peer", "peer")).split(" (")[0]
    return f"{name}: {value}"


def _common(r: dict) -> dict:
    out = {"device": str(r.get("device", "—"))}
    if "speedup" in r:
        out["ratio"] = f"{r['speedup']:.2f}x"
    return out


def _forward(r: dict) -> list[Row]:
    label = f"forward, {r['model']} {_dtype(r)}, batch {r['batch']} x {r['seq_len']}"
    peer = _peer(r, _rate(r["peer_tokens_per_s"])) if "peer_tokens_per_s" in r else "—"
    fraction = f"{r['peak_fraction']:.2f} of matmul peak"
    return [Row(label, ours=_rate(r["tokens_per_s"]), peer=peer, fraction=fraction, **_common(r))]


def _train(r: dict) -> list[Row]:
    objective = r["objective"]
    if objective in ("dpo", "rm"):
        shape = f"{r['batch']} pairs x ({r['prompt_len']} + {r['completion_len']})"
        name = "DPO step" if objective == "dpo" else "reward-model step"
        if objective == "dpo":
            shape += f", {r.get('reference', 'live')} reference"
    else:
        name, shape = f"{objective.upper()} step", f"batch {r['batch']} x {r.get('seq_len')}"
    extras = [f"remat {r['remat']}"] if r.get("remat", "none") != "none" else []
    extras += [f"accum {r['grad_accum_steps']}"] if r.get("grad_accum_steps", 1) != 1 else []
    label = ", ".join([f"{name}, {r['model']} {_dtype(r)}", shape, *extras])
    peer = _peer(r, _rate(r["peer_tokens_per_s"])) if "peer_tokens_per_s" in r else "—"
    fraction = f"{r['peak_fraction']:.2f} of matmul peak"
    return [Row(label, ours=_rate(r["tokens_per_s"]), peer=peer, fraction=fraction, **_common(r))]


def _grpo(r: dict) -> list[Row]:
    rollout = "" if r.get("rollout_dtype", r["dtype"]) == r["dtype"] else f", rollouts {r['rollout_dtype']}"
    label = (
        f"GRPO iteration, {r['model']} {_dtype(r)}{rollout}, {r['prompts']} prompts x {r['group']} samples x "
        f"({r['prompt_len']} + {r['new_tokens']})"
    )
    ours = f"{r['iteration_s']:.3g} s (rollout {r['rollout_s']:.3g} s, update {r['update_s']:.3g} s)"
    peer = "—"
    if "peer_iteration_s" in r:
        parts = f"{r['peer_iteration_s']:.3g} s ({r['peer_rollout_s']:.3g} + {r['peer_update_s']:.3g})"
        peer = _peer(r, parts)
    fraction = f"{r['peak_fraction']:.2f} of matmul peak"
    return [Row(label, ours=ours, peer=peer, fraction=fraction, **_common(r))]


def _rollout(r: dict) -> list[Row]:
    label = (
        f"rollout, {r['model']} {_dtype(r)}, {r['batch']} x ({r['prompt_len']} + {r['new_tokens']}), "
        f"{r['sampling']}"
    )
    peer = _peer(r, _rate(r["peer_tokens_per_s"])) if "peer_tokens_per_s" in r else "—"
    fraction = f"{r['peak_fraction']:.2f} of the rollout limit"
    return [Row(label, ours=_rate(r["tokens_per_s"]), peer=peer, fraction=fraction, **_common(r))]


def _serve(r: dict) -> list[Row]:
    streams = sorted({int(m.group(1)) for k in r if (m := re.fullmatch(r"engine_tokens_per_s@(\d+)", k))})
    requests = r.get("requests_per_stream", 1)
    rows = []
    for c in streams:
        label = (
            f"serve, {r['model']} {_dtype(r)}, {_plural(c, 'stream')} x {_plural(requests, 'request')} of "
            f"{r['new_tokens']} tokens (peer: the one-shot Sampler)"
        )
        ours = f"{_rate(r[f'engine_tokens_per_s@{c}'])}, first token {r[f'engine_ttft_s@{c}']:.3g} s"
        peer = (
            f"Sampler: {_rate(r[f'sampler_tokens_per_s@{c}'])}, first token {r[f'sampler_ttft_s@{c}']:.3g} s"
        )
        rows.append(
            Row(
                label,
                device=str(r.get("device", "—")),
                ours=ours,
                peer=peer,
                ratio=f"{r[f'engine/sampler@{c}']:.2f}x",
            )
        )
    return rows


def _gib(n: float) -> str:
    return f"{n:.4g} GiB"


def _memory(r: dict) -> list[Row]:
    """A memory plan (``bench memory``): per-device GiB at its batch, or with ``--fit-gib`` the largest batch
    that fits. Planned from shapes and XLA:CPU's compile, so the device column says so."""
    s, fit = r["settings"], r.get("fit")
    mesh = ",".join(f"{k}={v}" for k, v in s["mesh"].items() if v != 1)
    extras = [f"remat {s['remat']}"] if s.get("remat", "none") != "none" else []
    extras += [f"LoRA rank {s['lora_rank']}"] if s.get("lora_rank") is not None else []
    extras += [mesh] if mesh else []
    what = f"{s['preset']} {s['stage'].upper()} {_dtype(s)}"
    compiled = "XLA:CPU compile" if r.get("compiled") else "shapes only, no activations"
    device = f"planned ({compiled})"
    if fit is None:
        rows_len = s["micro_batch"]
        label = ", ".join([f"memory plan, {what}", f"batch {s['batch']} x {rows_len['length']}", *extras])
        step = ((r.get("compiled") or {}).get("step") or {}).get("peak")
        total = r["bytes_per_device"]["total"]
        ours = f"{_gib(total / 2**30)} a device" + (f" (step peak {_gib(step / 2**30)})" if step else "")
        return [Row(label, device=device, ours=ours)]
    label = ", ".join([f"largest batch in {fit['limit_gib']:g} GiB, {what}", fit["shape"], *extras])
    if fit["batch"] == 0:
        ours = f"none: batch {fit['next_batch']} needs {_gib(fit['next_total_gib'])}"
    else:
        ours = f"batch {fit['batch']} ({_gib(fit['total_gib'])})"
        if fit["next_batch"] is None:
            ours += f", the search's cap ({fit['max_batch']})"
        else:
            ours += f"; {fit['next_batch']} needs {_gib(fit['next_total_gib'])}"
    fraction = (
        "—" if not fit["batch"] else f"{fit['total_gib'] / fit['limit_gib']:.2f} of {fit['limit_gib']:g} GiB"
    )
    return [Row(label, device=device, ours=ours, fraction=fraction)]


def _peak(r: dict, name: str) -> list[Row]:
    ours = f"matmul {r['matmul_flops_per_s']:.3g} FLOP/s, read {r['memory_bytes_per_s']:.3g} B/s"
    return [Row(f"machine peak ({name})", ours=ours)]


def rows_of(result: dict, name: str) -> list[Row] | None:
    """The table rows of one bench result; None when ``result`` is not one (by the keys each bench writes)."""
    if "bytes_per_device" in result and "settings" in result:
        return _memory(result)
    if "objective" in result:
        return _grpo(result) if result["objective"] == "grpo" else _train(result)
    if "sampling" in result:
        return _rollout(result)
    if any(k.startswith("engine_tokens_per_s@") for k in result):
        return _serve(result)
    if "seq_len" in result and "tokens_per_s" in result:
        return _forward(result)
    if "matmul_flops_per_s" in result and "memory_bytes_per_s" in result:
        return _peak(result, name)
    return None


def build_table(directory: Path) -> str:
    """The markdown of every ``*.json`` bench result in ``directory``, in file-name order."""
    rows: list[Row] = []
    skipped: list[str] = []
    busy: list[str] = []
    for path in sorted(directory.glob("*.json")):
        name = re.sub(r"^\d+_", "", path.stem)
        try:
            result = json.loads(path.read_text())
            found = rows_of(result, name) if isinstance(result, dict) else None
        except (ValueError, KeyError, TypeError) as err:
            skipped.append(f"{path.name} ({type(err).__name__}: {err})")
            continue
        if found is None:
            skipped.append(f"{path.name} (not a bench result)")
            continue
        rows += found
        load = max(result.get("other_load_cores", 0) or 0, result.get("peer_other_load_cores", 0) or 0)
        if load >= 0.5:
            busy.append(f"{path.name}: other processes used {load:.1f} CPU cores during the run")
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |"]
    lines += ["| " + " | ".join(dataclasses.astuple(row)) + " |" for row in rows]
    notes = [f"- busy machine: {b}" for b in busy] + [f"- skipped {s}" for s in skipped]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path, help="the folder of bench JSON files")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"bench_table.py: {args.directory}: not a directory", file=sys.stderr)
        return 2
    table = build_table(args.directory)
    if args.out:
        args.out.write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
