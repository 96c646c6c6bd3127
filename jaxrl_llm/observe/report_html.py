"""The report's one HTML page: the runs (stage, model, steps, data hash), their final metrics, key and
differing configuration values, and the plots (PNGs beside the page, referenced by relative links).

Every text that comes from a run is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from .report import Panel, Run

# Shown for every run that has them; the full flattened configuration is one click away.
KEY_CONFIG = (
    "stage",
    "seed",
    "model.preset",
    "model.path",
    "model.dtype",
    "data.path",
    "render.template",
    "optimizer.name",
    "optimizer.lr",
    "optimizer.schedule",
    "optimizer.warmup_steps",
    "train.steps",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.seq_len",
)
RL_CONFIG = (
    "rl.algorithm",
    "rl.group_size",
    "rl.prompts_per_iteration",
    "rl.loss",
    "rl.beta",
    "rl.kl_coef",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "reward.functions",
)
PREF_CONFIG = ("pref.loss_type", "pref.beta")
RL_STAGES = frozenset({"grpo", "ppo"})

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.differs td { background: #fff6d6; }
.plots { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; }
figure img { width: 480px; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
code { font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A table cell's text: floats to 4 significant digits, big integers with separators."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | dict):
        import json

        return json.dumps(value, sort_keys=True)
    return str(value)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.lr": 0.002, ...}`` from a nested config."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def _model(run: Run) -> str:
    cfg = run.config.get("model", {}) if isinstance(run.config.get("model"), dict) else {}
    info = run.info.get("model", {}) if isinstance(run.info.get("model"), dict) else {}
    parts = [str(info["family"])] if info.get("family") else []
    if cfg.get("path"):
        parts.append(f"from {cfg['path']}")
    elif cfg.get("preset"):
        parts.append(f"preset {cfg['preset']}")
    if isinstance(info.get("parameters"), int):
        parts.append(f"{info['parameters']:,} parameters")
    return ", ".join(parts)


def _data_hash(run: Run) -> str:
    manifests = run.info.get("data_manifests")
    train = manifests.get("train") if isinstance(manifests, dict) else None
    digest = train.get("content_hash") if isinstance(train, dict) else None
    if not digest:
        from .report import read_json

        digest = read_json(run.path / "data_manifest.json").get("content_hash")
    return str(digest)[:16] if digest else ""


def _run_rows(run: Run) -> dict[str, str]:
    s = run.summary
    steps = s.get("steps", run.config.get("train", {}).get("steps") if run.config else None)
    if s.get("updates") not in (None, steps):
        steps = f"{fmt(steps)} ({fmt(s['updates'])} optimizer updates)"
    status = "finished" if s else "no summary.json (running, or stopped early)"
    if run.non_finite:
        status += "; non-finite values: " + ", ".join(f"{k} ({n})" for k, n in sorted(run.non_finite.items()))
    if run.bad_lines:
        status += f"; {run.bad_lines} unreadable line(s) in metrics.jsonl skipped"
    return {
        "directory": str(run.path),
        "stage": s.get("stage") or run.config.get("stage", ""),
        "model": _model(run),
        "steps": fmt(steps),
        "data (content hash)": _data_hash(run),
        "tokens seen": fmt(s.get("tokens_seen")),
        "train seconds": fmt(s.get("train_seconds")),
        "resumed from step": fmt(s.get("resumed_from")),
        "git commit": str(run.info.get("git_commit", ""))[:12],
        "started": run.info.get("started_at", ""),
        "status": status,
    }


def _table(runs: list[Run], rows: Mapping[str, list[Any]], highlight: bool = False) -> str:
    """Rows of cells, one column per run; with ``highlight``, rows whose values differ are marked."""
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{_e(run.label)}</th>" for run in runs)
    body = []
    for name, cells in rows.items():
        texts = [c if isinstance(c, str) else fmt(c) for c in cells]
        differs = highlight and len(runs) > 1 and len(set(texts)) > 1
        numeric = " class='num'" if all(isinstance(c, int | float) or c is None for c in cells) else ""
        tds = "".join(f"<td{numeric}>{_e(t)}</td>" for t in texts)
        body.append(f"<tr{' class=differs' if differs else ''}><th>{_e(name)}</th>{tds}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def _metrics_table(runs: list[Run], key: str) -> str:
    names: list[str] = []
    for run in runs:
        values = run.summary.get(key)
        for name in values if isinstance(values, dict) else {}:
            if name not in names:
                names.append(name)
    rows = {n: [(run.summary.get(key) or {}).get(n) for run in runs] for n in names}
    return _table(runs, rows, highlight=True)


def _eval_table(runs: list[Run]) -> str:
    """Evaluation metrics at the first and the last evaluation, ``first -> final``."""
    names: list[str] = []
    for run in runs:
        for name in run.summary.get("final_eval") or {}:
            if name not in names:
                names.append(name)
    rows = {}
    for name in names:
        cells = []
        for run in runs:
            first = (run.summary.get("first_eval") or {}).get(name)
            final = (run.summary.get("final_eval") or {}).get(name)
            cells.append(
                f"{fmt(first)} → {fmt(final)}" if first is not None and first != final else fmt(final)
            )
        rows[name] = cells
    return _table(runs, rows, highlight=True)


def _config_tables(runs: list[Run]) -> str:
    flat = [flatten(run.config) for run in runs]
    stages = {run.summary.get("stage") or run.config.get("stage") for run in runs}
    wanted = list(KEY_CONFIG)
    if stages & RL_STAGES:
        wanted += RL_CONFIG
    if stages - RL_STAGES - {"sft", None, ""}:
        wanted += PREF_CONFIG
    cell = lambda f, k: ("none" if f[k] is None else fmt(f[k])) if k in f else ""
    key_rows = {k: [cell(f, k) for f in flat] for k in wanted if any(k in f for f in flat)}
    names = sorted({k for f in flat for k in f})
    all_rows = {k: [cell(f, k) for f in flat] for k in names}
    parts = [_table(runs, key_rows, highlight=True)]
    if len(runs) > 1:
        differing = {k: v for k, v in all_rows.items() if len(set(v)) > 1}
        parts.append(f"<h3>Differences ({len(differing)})</h3>" + _table(runs, differing))
    parts.append(
        f"<details><summary>Full configuration ({len(names)} values)</summary>"
        f"{_table(runs, all_rows, highlight=True)}</details>"
    )
    return "".join(parts)


def write_html(runs: list[Run], drawn: list[Panel], path: Path) -> Path:
    """Writes the page at ``path``; the panels' PNGs (``<name>.png``) are expected beside it."""
    labels = ", ".join(run.label for run in runs)
    run_rows = [_run_rows(run) for run in runs]
    overview = {k: [rows[k] for rows in run_rows] for k in run_rows[0]} if runs else {}
    figures = "".join(
        f"<figure><a href='{quote(p.name)}.png'><img src='{quote(p.name)}.png' alt='{_e(p.title)}'></a>"
        f"<figcaption>{_e(p.title)}: {_e(', '.join(p.keys))}</figcaption></figure>"
        for p in drawn
    )
    body = [
        f"<h1>Training report: {_e(labels)}</h1>",
        "<h2>Runs</h2>",
        _table(runs, overview),
        "<h2>Final evaluation</h2>",
        _eval_table(runs),
        "<h2>Final training metrics</h2>",
        _metrics_table(runs, "final_train"),
        "<h2>Configuration</h2>",
        _config_tables(runs),
        "<h2>Plots</h2>",
        "<p>Faint lines: logged values; solid: smoothed (exponential moving average, as TensorBoard). "
        "Shaded: ±1 standard deviation across samples.</p>"
        if drawn
        else "<p>No metrics logged yet.</p>",
        f"<div class='plots'>{figures}</div>",
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Report: {_e(labels)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
