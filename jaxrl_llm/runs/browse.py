"""Finding run directories and describing them: ``runs list`` (one line a run) and ``runs show`` (one run).

A run directory is a folder holding ``train_config.json`` or ``artifacts.json``. Its registry is
``artifacts.json`` refreshed from the files beside it (``checkpoint.collect_artifacts``), so a run written
before the registry existed, or one still training, is described too; nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jaxrl_llm.checkpoint import ARTIFACTS_NAME, collect_artifacts, read_artifacts
from jaxrl_llm.errors import UserError

DEFAULT_ROOT = "runs"
RUNNING_WITHIN_S = 600  # metrics written this recently by an unfinished run: probably still training
# The eval metric a one-line summary shows, first one present (loss when none of these is reported).
MAIN_EVAL = ("exact_match", "accuracy", "reward", "reward_mean", "token_accuracy", "loss")
SHOWN_FIRST = (
    "loss",
    "reward/total/mean",
    "exact_match",
    "token_accuracy",
    "accuracy",
    "kl/sequence",
    "entropy",
    "grad_norm",
    "learning_rate",
    "tokens_seen",
)
_MARKERS = ("train_config.json", ARTIFACTS_NAME)


class RunError(UserError):
    """A path that is not a run directory, or a step or file the run does not have."""


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in _MARKERS)


def resolve_run(name: str | os.PathLike) -> Path:
    """``name`` as a run directory: a path, or the name of a run under ``runs/``."""
    path = Path(name)
    if not path.exists() and (Path(DEFAULT_ROOT) / path).exists():
        path = Path(DEFAULT_ROOT) / path
    if not path.exists():
        raise RunError(f"{name}: no such run directory")
    if not path.is_dir() or not is_run_dir(path):
        raise RunError(
            f"{name}: not a run directory (it holds neither train_config.json nor {ARTIFACTS_NAME})"
        )
    return path


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every run directory at or under ``root`` (a run's own subfolders are not searched)."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such directory")
    found = []
    for here, dirs, _ in os.walk(root):
        if is_run_dir(Path(here)):
            found.append(Path(here))
            dirs.clear()
        else:
            dirs.sort()
    return found


def load_run(run_dir: Path) -> dict[str, Any]:
    """The run's registry, refreshed from its files (see the module docstring)."""
    return collect_artifacts(run_dir, read_artifacts(run_dir))


def last_logged_step(run_dir: Path) -> int | None:
    """The step of the last line of ``metrics.jsonl`` (reading only its end)."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def total_steps(art: dict) -> int | None:
    return ((art.get("config") or {}).get("train") or {}).get("steps")


def steps_done(run_dir: Path, art: dict) -> int | None:
    if art.get("final"):
        return art["final"].get("steps")
    saved = [c["step"] for c in art.get("checkpoints") or []]
    logged = last_logged_step(run_dir)
    known = [s for s in (*saved, logged) if s is not None]
    return max(known) if known else None


def status(run_dir: Path, art: dict) -> str:
    """finished, running? (recent metrics, unfinished), stopped-resumable (a checkpoint to continue from),
    or failed (unfinished, nothing to resume)."""
    if art.get("final"):
        return "finished"
    try:
        recent = time.time() - (run_dir / "metrics.jsonl").stat().st_mtime < RUNNING_WITHIN_S
    except OSError:
        recent = False
    if recent:
        return "running?"
    return "stopped-resumable" if art.get("checkpoints") else "failed"


def latest_metrics(art: dict) -> dict[str, dict]:
    """``{"train", "eval"}``: the final metrics, else those of the latest checkpoint."""
    if art.get("final"):
        return art["final"].get("metrics") or {}
    checkpoints = art.get("checkpoints") or []
    return checkpoints[-1].get("metrics") or {} if checkpoints else {}


def main_eval(metrics: dict) -> tuple[str, float] | None:
    for key in MAIN_EVAL:
        if isinstance(metrics.get(key), int | float):
            return key, metrics[key]
    return None


def model_name(art: dict) -> str:
    model = art.get("model") or {}
    if model.get("source") == "path":
        path = Path(model.get("path") or "?")
        return path.parent.name if path.name == "final" else path.name
    return str(model.get("preset") or "?")


def data_hash(art: dict, n: int = 8) -> str:
    train = (art.get("data") or {}).get("train") or {}
    return (train.get("content_hash") or "-")[:n]


def started(run_dir: Path, art: dict) -> str:
    if art.get("started_at"):
        return str(art["started_at"])
    try:
        return datetime.fromtimestamp(run_dir.stat().st_mtime, UTC).isoformat(timespec="seconds")
    except OSError:
        return ""


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def list_lines(root: str | os.PathLike) -> list[str]:
    """One line a run under ``root``, oldest first, under a header."""
    root = Path(root)
    rows = []
    for run_dir in find_runs(root):
        art = load_run(run_dir)
        metrics = latest_metrics(art)
        ev = main_eval(metrics.get("eval") or {})
        total = total_steps(art)
        rows.append(
            (
                started(run_dir, art),
                str(run_dir.relative_to(root)) if run_dir != root else str(run_dir),
                str(art.get("stage") or "?"),
                model_name(art),
                f"{fmt(steps_done(run_dir, art))}/{fmt(total)}",
                fmt((metrics.get("train") or {}).get("loss")),
                f"{ev[0]} {fmt(ev[1])}" if ev else "-",
                data_hash(art),
                status(run_dir, art),
            )
        )
    rows.sort(key=lambda r: r[0])
    header = ("date", "run", "stage", "model", "steps", "loss", "eval", "data", "status")
    table = [header] + [(r[0][:16].replace("T", " "), *r[1:]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]


def _metrics_line(metrics: dict, most: int = 8) -> str:
    """The first ``most`` numeric metrics, the usual headline ones first (an RL step logs ~50)."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    keys = [k for k in SHOWN_FIRST if k in numeric] + sorted(k for k in numeric if k not in SHOWN_FIRST)
    shown = ", ".join(f"{k} {fmt(numeric[k])}" for k in keys[:most])
    return shown + (f" (+{len(keys) - most} more)" if len(keys) > most else "") if shown else "-"


def data_line(manifest: dict) -> str:
    sources = ", ".join(str(s.get("path")) for s in manifest.get("sources") or []) or "-"
    counts = manifest.get("counts") or {}
    return (
        f"{sources} ({manifest.get('kind', '?')}; {counts.get('accepted', '?')} records accepted of "
        f"{counts.get('read', '?')}; content hash {(manifest.get('content_hash') or '-')[:12]})"
    )


def show_lines(run_dir: Path) -> list[str]:
    """A readable summary of one run's registry."""
    art = load_run(run_dir)
    config = art.get("config") or {}
    train, opt = config.get("train") or {}, config.get("optimizer") or {}
    model = art.get("model") or {}
    lines = [
        f"run: {run_dir}",
        f"  stage {art.get('stage')}, {status(run_dir, art)}, steps {fmt(steps_done(run_dir, art))}/"
        f"{fmt(total_steps(art))}, started {art.get('started_at') or '-'}, resumed {art.get('resumes', 0)}x",
        f"  optimizer {opt.get('name')} lr {fmt(opt.get('lr'))} ({opt.get('schedule')}, warmup "
        f"{opt.get('warmup_steps')}), batch {train.get('batch_size')} x seq_len {train.get('seq_len')}, "
        f"seed {config.get('seed')}",
        f"  config sha256 {(art.get('config_sha256') or '-')[:12]} ({', '.join(art.get('config_files') or [])})",
    ]
    source = model.get("path") if model.get("source") == "path" else f"preset {model.get('preset')}"
    lines.append(
        f"model: {source} ({model.get('family', '?')}, {fmt(model.get('parameters'))} parameters, "
        f"{model.get('head', '?')} head)"
        + (f", sha256 {model['sha256'][:12]}" if model.get("sha256") else "")
        + (f", seed {model.get('seed')}" if model.get("source") == "preset" else "")
    )
    tok = art.get("tokenizer") or {}
    lines.append(
        f"tokenizer: {tok.get('tokenizer', '-')} (vocab {tok.get('vocab_size', '?')}, files "
        f"{(tok.get('files_sha256') or '-')[:12]}), template {tok.get('template', '-')} "
        f"{(tok.get('template_sha256') or '-')[:12]}"
    )
    for split, manifest in sorted((art.get("data") or {}).items()):
        lines.append(f"data {split}: {data_line(manifest)}")
    lines.append("checkpoints:" if art.get("checkpoints") else "checkpoints: none")
    for c in art.get("checkpoints") or []:
        metrics = c.get("metrics") or {}
        lines.append(f"  step {c['step']} ({c.get('saved_at') or '-'}): {c.get('path')}")
        lines.append(f"    train: {_metrics_line(metrics.get('train') or {})}")
        if metrics.get("eval"):
            lines.append(f"    eval: {_metrics_line(metrics['eval'])}")
    final = art.get("final")
    if final:
        metrics = final.get("metrics") or {}
        lines.append(
            f"final: {final.get('path') or '(not exported)'}, params sha256 {final.get('params_sha256')}"
        )
        lines.append(f"  train: {_metrics_line(metrics.get('train') or {})}")
        lines.append(f"  eval: {_metrics_line(metrics.get('eval') or {})}")
    devices = art.get("devices") or {}
    lines.append(
        f"devices: {devices.get('device_count', '?')} x {devices.get('device_kind', '?')} "
        f"({devices.get('platform', '?')}), {devices.get('process_count', '?')} processes, mesh "
        f"{devices.get('mesh', {})}"
    )
    versions = art.get("versions") or {}
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    lines.append(f"git commit: {art.get('git_commit') or '-'}")
    return lines
