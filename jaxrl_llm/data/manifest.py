"""Dataset versioning: the content hash of the canonical records, and the manifest written beside a run.

The content hash is the dataset's version. It covers exactly the records training sees, in order, in
their canonical form, so it is equal for equal data whatever file format or column names they came from,
and differs for any change to a record, to their order, or to which records the filters kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .filters import FilterConfig, conversations, turns
from .records import SCHEMA_VERSION

MANIFEST_NAME = "data_manifest.json"
_CHUNK = 1 << 20


def canonical_json(record: dict) -> str:
    """One record as the content hash serialises it (sorted keys, no spaces, UTF-8 text kept as is)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_hash(records: Iterable[dict]) -> str:
    """sha256 (hex) over ``canonical_json(record) + "\\n"`` for each record, in order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(canonical_json(record).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a file; of a directory, over its files' relative paths and bytes in sorted order (a HF
    ``save_to_disk`` folder, a TFDS folder); None when ``path`` is neither (e.g. a dataset name)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _update_file(digest, path)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            # The name is hashed too, so renaming or moving a shard changes the digest.
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            _update_file(digest, file)
    else:
        return None
    return digest.hexdigest()


def _update_file(digest: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


def _spread(values: Sequence[int]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {"min": min(values), "mean": round(sum(values) / len(values), 3), "max": max(values)}


def _chars(record: dict) -> int:
    if "text" in record:
        return len(record["text"])
    # Each message once: the prompt of a preference record is counted once, not once per conversation.
    seen = {id(m): m for c in conversations(record) for m in c}
    return sum(len(m["content"]) + len(m.get("reasoning", "")) for m in seen.values())


def statistics(records: Sequence[dict]) -> dict[str, Any]:
    """Sizes of the accepted records: turns (messages in the longest conversation) and characters
    (content + reasoning) per record as min/mean/max, messages per role, tool calls, labels."""
    roles: dict[str, int] = {}
    tool_calls = with_tools = 0
    labels = {"true": 0, "false": 0}
    for record in records:
        seen = {id(m): m for c in conversations(record) for m in c}
        for msg in seen.values():
            roles[msg["role"]] = roles.get(msg["role"], 0) + 1
            tool_calls += len(msg.get("tool_calls", ()))
        with_tools += "tools" in record
        if "label" in record:
            labels["true" if record["label"] else "false"] += 1
    stats: dict[str, Any] = {
        "records": len(records),
        "turns": _spread([turns(r) for r in records if "text" not in r]),
        "chars": _spread([_chars(r) for r in records]),
        "messages_by_role": dict(sorted(roles.items())),
        "tool_calls": tool_calls,
        "records_with_tools": with_tools,
    }
    if any("label" in r for r in records):
        stats["labels"] = labels
    return stats


def source_entry(path: str | os.PathLike, format: str) -> dict[str, Any]:
    """A manifest's description of one source: its path, format and sha256 (see ``file_sha256``)."""
    return {"path": os.fspath(path), "format": format, "sha256": file_sha256(path)}


def build_manifest(
    *,
    kind: str | None,
    sources: Sequence[dict[str, Any]],
    counts: dict[str, Any],
    filters: FilterConfig,
    records: Sequence[dict],
    on_error: str = "raise",
    dataset_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of one loaded dataset.

    Args:
      kind: the records' canonical kind (None when no record was accepted and the source did not say).
      sources: one ``source_entry`` per source file.
      counts: ``{"read", "accepted", "rejected", "filtered": {reason: n}}``.
      filters: the quality-filter settings the records passed.
      records: the accepted canonical records, in order.
      dataset_info: for a LLaMA-Factory registry source, ``{"path", "name", "sha256"}``.
    """
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "content_hash": content_hash(records),
        "sources": list(sources),
        "counts": counts,
        "on_error": on_error,
        "filters": filters.as_dict(),
        "statistics": statistics(records),
    }
    if dataset_info is not None:
        manifest["dataset_info"] = dataset_info
    return manifest


def write_manifest(manifest: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Writes ``<run_dir>/data_manifest.json`` (creating ``run_dir``) and returns its path."""
    path = Path(run_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
