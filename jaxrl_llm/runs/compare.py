"""``runs diff A B``: what differs between two runs, causes first (config, data, tokenizer, model, versions,
devices), then the effect (final metrics side by side with their deltas)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .browse import data_line, fmt, latest_metrics, load_run

# Keys that name where and how a run was invoked rather than what it trained.
IGNORED_KEYS = ("run_dir",)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.lr": 0.001, ...}``: nested dicts as dotted keys (lists and scalars are values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def config_lines(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    keys = sorted(
        k for k in fa.keys() | fb.keys() if k not in IGNORED_KEYS and fa.get(k, ...) != fb.get(k, ...)
    )
    if not keys:
        return ["config: same"]
    out = [f"config: {len(keys)} {'keys differ' if len(keys) > 1 else 'key differs'}"]
    for k in keys:
        va = _value(fa[k]) if k in fa else "(absent)"
        vb = _value(fb[k]) if k in fb else "(absent)"
        out.append(f"  {k}: {va} -> {vb}")
    return out


def _source_lines(split: str, a: list[dict], b: list[dict]) -> list[str]:
    """Which data file differs: by position, its path and its content's sha256."""
    out = []
    for i in range(max(len(a), len(b))):
        sa, sb = (a[i] if i < len(a) else {}), (b[i] if i < len(b) else {})
        name = sb.get("path") or sa.get("path")
        if sa.get("path") != sb.get("path"):
            out.append(f"  {split} data file {i}: {sa.get('path', '(none)')} -> {sb.get('path', '(none)')}")
        if sa.get("sha256") != sb.get("sha256"):
            out.append(
                f"  {split} data file {name}: content differs (sha256 {(sa.get('sha256') or '-')[:12]} -> "
                f"{(sb.get('sha256') or '-')[:12]})"
            )
    return out


def data_lines(a: dict, b: dict) -> list[str]:
    out = []
    for split in sorted(a.keys() | b.keys()):
        ma, mb = a.get(split) or {}, b.get(split) or {}
        if not ma or not mb:
            out.append(f"  {split}: {'only in B' if mb else 'only in A'}")
            continue
        if ma.get("content_hash") == mb.get("content_hash"):
            continue
        out.append(
            f"  {split}: content hash {(ma.get('content_hash') or '-')[:12]} -> "
            f"{(mb.get('content_hash') or '-')[:12]}"
        )
        out += _source_lines(split, ma.get("sources") or [], mb.get("sources") or [])
        ca, cb = ma.get("counts") or {}, mb.get("counts") or {}
        for k in ("read", "accepted", "rejected"):
            if ca.get(k) != cb.get(k):
                out.append(f"  {split} records {k}: {fmt(ca.get(k))} -> {fmt(cb.get(k))}")
        if ma.get("kind") != mb.get("kind"):
            out.append(f"  {split} kind: {ma.get('kind')} -> {mb.get('kind')}")
    if not out:
        same = a.get("train") or {}
        return [f"data: same ({data_line(same)})" if same else "data: none recorded"]
    return ["data: differs", *out]


def _fields_lines(title: str, a: dict, b: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    keys = keys or tuple(sorted(a.keys() | b.keys()))
    changed = [k for k in keys if a.get(k) != b.get(k)]
    if not changed:
        return [f"{title}: same"]
    return [f"{title}: differs"] + [f"  {k}: {fmt(a.get(k))} -> {fmt(b.get(k))}" for k in changed]


def metric_lines(a: dict, b: dict) -> list[str]:
    """Final (else latest checkpoint's) train and eval metrics: ``name  A  B  delta``."""
    rows = [("metric", "A", "B", "B - A")]
    for split in ("train", "eval"):
        ma, mb = a.get(split) or {}, b.get(split) or {}
        for k in sorted(ma.keys() | mb.keys()):
            va, vb = ma.get(k), mb.get(k)
            numeric = isinstance(va, int | float) and isinstance(vb, int | float)
            delta = f"{vb - va:+.4g}" if numeric else ""
            rows.append((f"{split} {k}", fmt(va), fmt(vb), delta))
    if len(rows) == 1:
        return ["metrics: none recorded"]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    cells = (
        [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        for r in rows
    )
    table = [("  " + "  ".join(c)).rstrip() for c in cells]
    return ["metrics (final, else the latest checkpoint's):", *table]


def _in_run(tokenizer: dict, run_dir: Path) -> dict:
    """The tokenizer with a path inside its run written ``RUN/...`` (a tokenizer each run trained for itself
    is in a different folder by construction; its files' hash says whether it differs)."""
    try:
        inside = Path(tokenizer["tokenizer"]).resolve().relative_to(run_dir.resolve())
    except (KeyError, TypeError, ValueError, OSError):
        return tokenizer
    return {**tokenizer, "tokenizer": f"RUN/{inside}"}


def diff_lines(run_a: Path, run_b: Path) -> list[str]:
    """The differences between two runs, in words (see the module docstring)."""
    a, b = load_run(run_a), load_run(run_b)
    out = [f"A: {run_a}", f"B: {run_b}"]
    out += config_lines(a.get("config") or {}, b.get("config") or {})
    out += data_lines(a.get("data") or {}, b.get("data") or {})
    tok_keys = ("template", "template_sha256", "tokenizer", "vocab_size", "files_sha256", "mask")
    tok_a, tok_b = _in_run(a.get("tokenizer") or {}, run_a), _in_run(b.get("tokenizer") or {}, run_b)
    out += _fields_lines("tokenizer", tok_a, tok_b, tok_keys)
    model_keys = ("source", "preset", "seed", "path", "sha256", "family", "parameters", "head")
    out += _fields_lines("model", a.get("model") or {}, b.get("model") or {}, model_keys)
    out += _fields_lines("versions", a.get("versions") or {}, b.get("versions") or {})
    out += _fields_lines("git commit", {"commit": a.get("git_commit")}, {"commit": b.get("git_commit")})
    device_keys = ("platform", "device_kind", "device_count", "process_count", "mesh")
    out += _fields_lines("devices", a.get("devices") or {}, b.get("devices") or {}, device_keys)
    out += metric_lines(latest_metrics(a), latest_metrics(b))
    fa, fb = a.get("final") or {}, b.get("final") or {}
    if fa.get("params_sha256") and fa.get("params_sha256") == fb.get("params_sha256"):
        out.append("final parameters: identical (same params_sha256)")
    return out
