"""Run-directory artifacts: ``run_info.json``, ``train_config.json``, ``summary.json`` and a parameter digest.

Files are written by JAX process 0 only, atomically (temporary file, then rename), as JSON with the
conventions of :mod:`jaxrl_llm.observe.metrics` (non-finite floats as ``"nan"``/``"inf"``/``"-inf"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrl_llm.observe.metrics import json_safe

_DISTRIBUTIONS = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "libtpu",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "transformers",
    "tokenizers",
    "numpy",
    "ml-collections",
    "tensorboardX",
)
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on, plus ``python``; missing ones are skipped."""
    versions = {}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def _git(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=False
    )


def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD commit of the git checkout holding ``path``, with ``-dirty`` for uncommitted tracked changes.

    ``path=None`` means the ``jaxrl_llm`` package source, and then the package must be tracked by that
    checkout (an installed copy inside some other repository's ignored folder does not count). None when
    not in a git checkout or git is missing or slow; never raises.
    """
    try:
        where = Path(path) if path is not None else _PACKAGE_DIR
        head = _git(where, "rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return None
        if path is None and _git(where, "ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        commit = head.stdout.strip()
        status = _git(where, "status", "--porcelain", "--untracked-files=no")
        if status.returncode != 0:
            return commit
        return commit + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def device_info(mesh) -> dict[str, Any]:
    """Platform, device kind and counts, process count/index, and the mesh's axis sizes (``{}`` if None)."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "mesh": {str(axis): int(size) for axis, size in mesh.shape.items()} if mesh is not None else {},
    }


def _dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _next_resume_index(run_dir: Path) -> int:
    n = 1
    while (run_dir / f"run_info.resume-{n}.json").exists() or (
        run_dir / f"train_config.resume-{n}.json"
    ).exists():
        n += 1
    return n


def write_run_info(
    run_dir: str | Path,
    *,
    config_dict: dict,
    seed: int,
    mesh,
    tokenizer_identity: dict,
    data_manifests: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Writes ``run_info.json`` and ``train_config.json`` (the resolved config, sorted keys) on process 0.

    ``run_info.json`` holds ``started_at`` (UTC ISO time), ``command`` (``sys.argv``), ``seed``,
    ``git_commit``, ``versions``, ``devices``, ``tokenizer``, ``data_manifests``, ``config_file`` and the
    keys of ``extra`` (which may not replace those). On a resumed run (``run_info.json`` exists) it writes
    ``run_info.resume-<n>.json`` instead, with n the next free integer, and ``train_config.resume-<n>.json`` only
    when the config differs from ``train_config.json``. Returns the run-info path written (on other processes,
    ``<run_dir>/run_info.json``, without writing).
    """
    run_dir = Path(run_dir)
    if jax.process_index() != 0:
        return run_dir / "run_info.json"
    run_dir.mkdir(parents=True, exist_ok=True)

    config_text = _dumps(config_dict)
    info_path, config_path = run_dir / "run_info.json", run_dir / "train_config.json"
    if info_path.exists():
        n = _next_resume_index(run_dir)
        info_path = run_dir / f"run_info.resume-{n}.json"
        if config_path.exists() and json.loads(config_path.read_text(encoding="utf-8")) == json.loads(
            config_text
        ):
            config_path = run_dir / "train_config.json"
            config_text = None  # unchanged: leave train_config.json alone
        elif config_path.exists():
            config_path = run_dir / f"train_config.resume-{n}.json"

    info = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "seed": int(seed),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "devices": device_info(mesh),
        "tokenizer": tokenizer_identity,
        "data_manifests": data_manifests or {},
        "config_file": config_path.name,
    }
    clash = set(info) & set(extra or {})
    if clash:
        raise ValueError(f"extra run-info keys {sorted(clash)} would replace built-in fields")
    info.update(extra or {})

    if config_text is not None:
        _write_atomic(config_path, config_text)
    _write_atomic(info_path, _dumps(info))
    return info_path


SUMMARY_NAME = "summary.json"


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    """Writes ``<run_dir>/summary.json`` (JSON-safe, sorted keys) on process 0; returns its path."""
    path = Path(run_dir) / SUMMARY_NAME
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, _dumps(summary))
    return path


def params_digest(params) -> str:
    """SHA-256 hex digest of a parameter pytree: key paths, dtypes, shapes and element bytes.

    Leaves are taken in the order of their key-path strings. Arrays that are not fully addressable are
    gathered with ``process_allgather``, so on multi-process runs every process must call this together.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keyed = sorted(((jax.tree_util.keystr(path), leaf) for path, leaf in leaves), key=lambda item: item[0])
    digest = hashlib.sha256()
    for key, leaf in keyed:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        header = f"{key}\0{array.dtype}\0{array.shape}\0".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(array.nbytes.to_bytes(8, "little"))
        digest.update(array.tobytes(order="C"))
    return digest.hexdigest()
