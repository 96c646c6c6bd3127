"""The run's artifact registry, ``<run_dir>/artifacts.json``: everything that identifies a run in one file.

It gathers what the run directory already holds (``run_info.json``, ``train_config.json``, the data
manifests, ``summary.json``) and adds what no other file records: hashes of the tokenizer's files and of the
model source (``model.path``'s ``config.json`` and safetensors, or the preset and seed of a fresh
initialisation), and one entry per checkpoint with its step and the metrics it was saved with. The training
loop rewrites it after every checkpoint save, and the stage once more with the final summary; ``python -m
jaxrl_llm.runs`` reads it to list, show, compare and export runs (and builds it on the fly for a run
directory that has none).

Schema (version 1; every field may be absent or None when its source file is missing):

- ``schema_version``, ``updated_at`` (UTC), ``run_dir`` (where it was written), ``stage``;
- ``started_at``, ``command``, ``seed``, ``git_commit``, ``versions``, ``devices`` (with ``mesh``): from
  ``run_info.json``; ``resumes``: how many times the run was resumed;
- ``config``: the resolved config (``train_config.json``), ``config_sha256``, ``config_files`` (with any
  ``train_config.resume-<n>.json`` a resume with changed settings wrote);
- ``data``: ``{"train": manifest, "eval": manifest}`` (sources with their sha256, counts, content hash);
- ``tokenizer``: the template and its sha256, vocabulary size, tokenizer path and ``files_sha256``;
- ``model``: ``{"source": "path", "path", "sha256", "hash_method", "files"}`` or ``{"source": "preset",
  "preset", "seed"}``, plus ``family``, ``parameters``, ``head``;
- ``checkpoints``: ``[{"step", "loop_step", "path" (relative to the run), "saved_at", "tokens_seen",
  "metrics": {"train", "eval"}}]`` by step, only those still on disk (Orbax keeps the last
  ``train.keep_checkpoints``);
- ``final``: ``{"path", "params_sha256", "steps", "updates", "metrics": {"train", "eval", "first_eval"},
  ...}`` once ``summary.json`` exists.

Written by JAX process 0 only, atomically; building it never raises (a registry must not stop a run).
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax

from jaxrl_llm.data import manifest

from .manager import DIRNAME
from .run_info import SUMMARY_NAME, _dumps, _write_atomic

ARTIFACTS_NAME = "artifacts.json"
SCHEMA_VERSION = 1
# Files larger than this are identified by their size and first and last MiB rather than every byte (a
# multi-GiB safetensors shard would otherwise be read in full at every checkpoint).
FULL_HASH_LIMIT = 64 * 2**20
_SAMPLE = 2**20
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)
_CHECKPOINT_KEYS = ("loop_step", "tokens_seen", "train_seconds")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def file_sha256(path: Path) -> tuple[str, str]:
    """``(hex digest, method)``: sha256 of the bytes (``"sha256"``) or, past ``FULL_HASH_LIMIT``, of the
    size and the first and last MiB (``"sha256-size-first-last-mib"``: equal for copies, cheap for shards)."""
    size = path.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return manifest.file_sha256(path), "sha256"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(size.to_bytes(8, "little"))
        digest.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        digest.update(f.read(_SAMPLE))
    return digest.hexdigest(), "sha256-size-first-last-mib"


def files_digest(files: list[Path], root: Path) -> dict[str, Any] | None:
    """One sha256 over ``files`` (names relative to ``root`` and their digests), with each file's digest."""
    if not files:
        return None
    per_file, methods = {}, set()
    for path in sorted(files):
        digest, method = file_sha256(path)
        per_file[str(path.relative_to(root))] = digest
        methods.add(method)
    combined = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in per_file.items()).encode()).hexdigest()
    method = "sha256" if methods == {"sha256"} else "sha256-size-first-last-mib for files over 64 MiB"
    return {"sha256": combined, "hash_method": method, "files": per_file}


def _model_source(config: dict, info: dict, previous: dict | None) -> dict[str, Any] | None:
    model = config.get("model") or {}
    described = dict(info.get("model") or {})  # family, parameters, head
    if not model.get("path"):
        if not model.get("preset"):
            return described or None
        return {"source": "preset", "preset": model["preset"], "seed": config.get("seed"), **described}
    from jaxrl_llm.models.hf_io import checkpoint_dir

    try:
        where = checkpoint_dir(model["path"]).resolve()
    except (OSError, ValueError):
        where = Path(model["path"])
    out: dict[str, Any] = {"source": "path", "path": str(where), **described}
    if previous and previous.get("path") == out["path"] and previous.get("sha256"):
        return {**previous, **out}  # hashed when first recorded; not re-read at every checkpoint
    if where.is_dir():
        files = [p for p in where.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"]
        out |= files_digest(files, where) or {}
    if where.name == "final" and (where.parent / SUMMARY_NAME).exists():  # a previous run's export
        out["parent_run"] = str(where.parent)
        out["parent_params_sha256"] = (_read_json(where.parent / SUMMARY_NAME) or {}).get("params_sha256")
    return out


def _tokenizer(info: dict, run_dir: Path, previous: dict | None) -> dict[str, Any] | None:
    identity = dict(info.get("tokenizer") or {})
    if not identity:
        return None
    if previous and previous.get("tokenizer") == identity.get("tokenizer") and previous.get("files_sha256"):
        return {**identity, "files_sha256": previous["files_sha256"]}
    name = identity.get("tokenizer")
    candidates = [Path(name)] if name else []
    if name and not Path(name).is_absolute():
        candidates.append(run_dir / "tokenizer")  # a relative path from the training process's directory
    for where in candidates:
        if where.is_file():
            identity["files_sha256"] = file_sha256(where)[0]
            break
        files = [where / f for f in _TOKENIZER_FILES if (where / f).is_file()]
        if files:
            identity["files_sha256"] = files_digest(files, where)["sha256"]
            break
    return identity


def _data(info: dict, run_dir: Path) -> dict[str, Any]:
    manifests = dict(info.get("data_manifests") or {})
    for split, name in (("train", "data_manifest.json"), ("eval", "eval_data_manifest.json")):
        found = _read_json(run_dir / name)
        if isinstance(found, dict):
            manifests[split] = found
    return manifests


def _checkpoint_entry(step: int, saved: dict[str, Any], saved_at: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": int(step), "path": f"{DIRNAME}/{int(step)}", "saved_at": saved_at}
    entry |= {k: saved[k] for k in _CHECKPOINT_KEYS if k in saved}
    entry["metrics"] = {"train": saved.get("last_train") or {}, "eval": saved.get("last_eval") or {}}
    return entry


def _saved_at(where: Path) -> str | None:
    meta = _read_json(where / "_CHECKPOINT_METADATA") or {}
    nsecs = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
    try:
        seconds = nsecs / 1e9 if nsecs else where.stat().st_mtime
    except OSError:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _checkpoints(run_dir: Path, previous: list[dict], keep_step: int | None) -> list[dict]:
    """Entries of the checkpoints on disk: recorded ones kept, others read from their ``meta`` item."""
    folder = run_dir / DIRNAME
    on_disk = {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()
    recorded = {int(e["step"]): e for e in previous if isinstance(e, dict) and "step" in e}
    out = {s: e for s, e in recorded.items() if s in on_disk or s == keep_step}
    for step in on_disk - set(out):
        saved = _read_json(folder / str(step) / "meta" / "metadata")
        if isinstance(saved, dict):
            out[step] = _checkpoint_entry(step, saved, _saved_at(folder / str(step)))
    return [out[s] for s in sorted(out)]


def _final(summary: dict | None) -> dict[str, Any] | None:
    if not summary or summary.get("stopped"):
        return None
    keys = ("params_sha256", "steps", "updates", "tokens_seen", "train_seconds", "skipped_steps", "rollbacks")
    out = {"path": summary.get("export")} | {k: summary[k] for k in keys if k in summary}
    out["metrics"] = {
        "train": summary.get("final_train") or {},
        "eval": summary.get("final_eval") or {},
        "first_eval": summary.get("first_eval") or {},
    }
    out["extra"] = {k: v for k, v in summary.items() if not isinstance(v, dict | list) and k not in out}
    return out


def collect_artifacts(
    run_dir: str | Path,
    previous: dict | None = None,
    *,
    checkpoint: dict | None = None,
    summary: dict | None = None,
) -> dict[str, Any]:
    """The registry of ``run_dir`` as a dict (see the module docstring), built from its files and
    ``previous`` (the last ``artifacts.json``, whose checkpoint entries and hashes are kept). ``checkpoint``
    (the ``meta`` a save was started with, plus ``step``) adds or replaces that step's entry even before its
    directory is complete; ``summary`` stands in for ``summary.json``."""
    run_dir = Path(run_dir)
    previous = previous if isinstance(previous, dict) else {}
    info = _read_json(run_dir / "run_info.json") or {}
    config_path = run_dir / "train_config.json"
    config = _read_json(config_path) or previous.get("config") or {}
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "updated_at": _now(),
        "run_dir": str(run_dir.absolute()),
        "stage": config.get("stage"),
    }
    for key in ("started_at", "command", "seed", "git_commit", "versions", "devices"):
        out[key] = info.get(key, previous.get(key))
    out["resumes"] = len(list(run_dir.glob("run_info.resume-*.json")))
    out["config"] = config
    if config_path.is_file():
        out["config_sha256"] = file_sha256(config_path)[0]
    out["config_files"] = sorted(p.name for p in run_dir.glob("train_config*.json"))
    out["data"] = _data(info, run_dir) or previous.get("data") or {}
    out["tokenizer"] = _tokenizer(info, run_dir, previous.get("tokenizer"))
    out["model"] = _model_source(config, info, previous.get("model"))
    step = None if checkpoint is None else int(checkpoint["step"])
    entries = _checkpoints(run_dir, list(previous.get("checkpoints") or []), step)
    if checkpoint is not None:
        entries = [e for e in entries if e["step"] != step] + [_checkpoint_entry(step, checkpoint, _now())]
        entries.sort(key=lambda e: e["step"])
    out["checkpoints"] = entries
    out["final"] = _final(summary if summary is not None else _read_json(run_dir / SUMMARY_NAME))
    return out


def read_artifacts(run_dir: str | Path) -> dict[str, Any] | None:
    """``<run_dir>/artifacts.json`` as written, or None when it is missing or unreadable."""
    found = _read_json(Path(run_dir) / ARTIFACTS_NAME)
    return found if isinstance(found, dict) else None


def write_artifacts(
    run_dir: str | Path, *, checkpoint: dict | None = None, summary: dict | None = None
) -> Path | None:
    """Rewrites ``<run_dir>/artifacts.json`` on process 0 (see ``collect_artifacts``); returns its path,
    or None when it could not be written (a warning is printed: the registry never stops a run)."""
    path = Path(run_dir) / ARTIFACTS_NAME
    if jax.process_index() != 0:
        return path
    try:
        registry = collect_artifacts(run_dir, read_artifacts(run_dir), checkpoint=checkpoint, summary=summary)
        _write_atomic(path, _dumps(registry))
    except Exception as err:  # noqa: BLE001 - a registry problem is reported, never fatal to training
        print(f"warning: {path} not written: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return None
    return path


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The complete checkpoints' steps in ``<run_dir>/checkpoints`` (in-progress saves excluded)."""
    folder = Path(run_dir) / DIRNAME
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())
