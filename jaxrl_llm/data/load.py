"""One entry point from a source to canonical records: read, convert, validate, filter, count, version.

Every record read ends in exactly one of three places, and the counts always satisfy
``read == accepted + rejected + sum(filtered.values())``:

- rejected: the reader could not parse it, or it does not convert to / validate as the dataset's kind.
  With ``on_error="raise"`` the first one raises its ``RecordError`` (file, line or index, field path);
  with ``"skip"`` it is counted and, when ``rejects_path`` is given, written there as one JSON line
  ``{"location", "reason", "field", "raw"}``, ``raw`` being the record as read (JSON), or the line's text
  (a string, cut at 500 characters) when it was not JSON at all. The rejects file is written (truncated)
  even when nothing is rejected, so a run's artifacts never hold a stale one from an earlier run; in raise
  mode it is not written at all, and the error ends with how to skip bad records or list them all.
- filtered: valid but dropped by a quality filter, counted by reason (see ``filters``).
- accepted: kept, in source order.

With a renderer, every valid record is rendered once at load time, and one the chat template cannot
render is rejected like an invalid one, with the template's error.

The dataset's kind is the source's when the format fixes it (alpaca is conversation, LLaMA-Factory
``ranking`` is preference, ...), else ``kind`` when given, else the kind of the first valid record; every
record must then be of that kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from .filters import DEFAULT_FILTERS, FilterConfig, Filters
from .manifest import build_manifest, file_sha256, source_entry, write_manifest
from .records import KINDS, DataError, Location, RawRecord, RecordError
from .schema import KIND_KEYS, detect_kind, validate_record

ON_ERROR = ("raise", "skip")
REJECTS_NAME = "rejects.jsonl"
MAX_ERRORS = 10  # error messages kept in LoadedDataset.errors; the rest are only counted (and in rejects)


class SourceLike(Protocol):
    """What ``jaxrl_llm.data.sources.open_source`` returns: where the records are and how to convert them."""

    path: str
    format: str
    kind: str | None

    def records(self) -> Iterator[RawRecord]: ...

    def convert(self, value: Any) -> dict: ...


class UnreadableRecord(RecordError):
    """A record the reader could not parse (broken JSON line, bytes that are not UTF-8, ...)."""

    def __init__(self, reason: str, location: Location):
        super().__init__("", reason, location=location)
        # RecordError phrases "expected X"; a reader's reason already says what is wrong.
        self.args = (f"{location}: {reason}",)


@dataclasses.dataclass
class Counts:
    """Where the records read went; ``filtered`` maps a filter reason to its count."""

    read: int = 0
    accepted: int = 0
    rejected: int = 0
    filtered: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "filtered": dict(sorted(self.filtered.items())),
        }

    def check(self) -> None:
        """Raises AssertionError when a record was lost or counted twice (a bug, never a data problem)."""
        total = self.accepted + self.rejected + sum(self.filtered.values())
        if self.read != total:
            raise AssertionError(f"record counts do not add up: {self.as_dict()}")


@dataclasses.dataclass(frozen=True)
class LoadedDataset:
    """Accepted canonical records in source order, their kind, the counts, the manifest, the first
    ``MAX_ERRORS`` rejection messages (each naming the file, the record and the field), and where each
    accepted record came from (``locations[i]`` for ``records[i]``)."""

    records: list[dict]
    kind: str | None
    counts: Counts
    manifest: dict[str, Any]
    errors: list[str]
    locations: list[Location] = dataclasses.field(default_factory=list)

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]


def no_records_reason(
    loaded: LoadedDataset, rejects_path: str | os.PathLike | None = None, option: str = ""
) -> str | None:
    """Why ``loaded`` holds no records, naming its source (as ``option=PATH`` when the config ``option``
    named it); None when it holds some.

    An empty source, every record rejected (with the first error, and ``rejects_path`` when the rejected
    records were written there), or every record dropped by a filter (counted by reason).
    """
    if loaded.records:
        return None
    path = loaded.manifest["sources"][0]["path"]
    named = f"{option}={path}" if option else path
    c = loaded.counts
    if c.read == 0:
        what = "the file is empty" if os.path.isfile(path) else "the dataset is empty"
        return f"{named}: {what}: there are no records in it"
    filtered = sum(c.filtered.values())
    if c.rejected == c.read:
        where = f"; they are written to {os.fspath(rejects_path)}" if rejects_path is not None else ""
        first = f"; the first: {loaded.errors[0]}" if loaded.errors else ""
        return f"{named}: all {c.read} records were rejected{where}{first}"
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(c.filtered.items()))
    rejected = f"{c.rejected} rejected, " if c.rejected else ""
    return (
        f"{named}: no record was accepted: of {c.read} read, {rejected}{filtered} were dropped by the "
        f"quality filters ({reasons})"
    )


def require_records(
    loaded: LoadedDataset, rejects_path: str | os.PathLike | None = None, option: str = ""
) -> None:
    """Raises DataError with ``no_records_reason`` when ``loaded`` holds no records."""
    reason = no_records_reason(loaded, rejects_path, option)
    if reason is not None:
        raise DataError(reason)


def open_source(source: str | os.PathLike | None, **kwargs: Any) -> SourceLike:
    """``jaxrl_llm.data.sources.open_source``, imported on use (the readers live there)."""
    from jaxrl_llm.data.sources import open_source as _open

    return _open(source, **kwargs)


class _Loader:
    """The per-record bookkeeping of one ``load_dataset`` call."""

    def __init__(
        self,
        source: SourceLike,
        kind: str | None,
        on_error: str,
        filters: Filters,
        rejects: IO | None,
        hint: str = "",
    ):
        self.source, self.kind, self.on_error = source, kind, on_error
        self.filters, self.rejects, self.hint = filters, rejects, hint
        self.counts = Counts()
        self.records: list[dict] = []
        self.locations: list[Location] = []
        self.errors: list[str] = []

    def take(self, raw: RawRecord) -> None:
        self.counts.read += 1
        try:
            record = self._canonical(raw)
            reason = self.filters(record)  # raises UnrenderableRecord for a record the template cannot render
        except RecordError as err:
            self._reject(raw, err if err.location is not None else err.at(raw.location))
            return
        except RecursionError:  # a value nested too deeply for the converters (json.loads stops ~1000 deep)
            self._reject(
                raw, RecordError("", "a record nested less deeply (too deep to process)").at(raw.location)
            )
            return
        if reason is not None:
            self.counts.filtered[reason] = self.counts.filtered.get(reason, 0) + 1
        else:
            self.counts.accepted += 1
            self.records.append(record)
            self.locations.append(raw.location)

    def _canonical(self, raw: RawRecord) -> dict:
        if raw.error is not None:
            raise UnreadableRecord(raw.error, raw.location)
        value = self.source.convert(raw.value)
        kind = self.kind or detect_kind(value)
        if kind is None:
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            keys = ", ".join(repr(k) for k in ("messages", "prompt", "chosen", "completion", "text"))
            raise RecordError("", f"a record of one of the kinds {list(KINDS)} (keys such as {keys})", got)
        record = validate_record(kind, value)
        self.kind = kind  # the first valid record fixes the kind of the rest
        return record

    def _reject(self, raw: RawRecord, err: RecordError) -> None:
        if self.on_error == "raise":
            err.args = (f"{err}; {self.hint}",) if self.hint else err.args
            raise err
        self.counts.rejected += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(str(err))
        if self.rejects is not None:
            entry = {
                "location": str(raw.location),
                "reason": str(err).removeprefix(f"{raw.location}: "),
                "field": err.field,
                "raw": raw.text if raw.error is not None else raw.value,
            }
            self.rejects.write(_json_line(entry) + "\n")


def _json_line(entry: dict[str, Any]) -> str:
    try:  # default=str: a reader's value is plain JSON-like, but a custom source's may not be
        return json.dumps(entry, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):  # nested too deeply to serialise, or a circular reference
        return json.dumps({**entry, "raw": None}, ensure_ascii=False)


def _check_arguments(kind: str, on_error: str, filters: Any, renderer: Any) -> None:
    if not isinstance(filters, FilterConfig):
        raise DataError(
            f"filters={filters!r}: expected a jaxrl_llm.data.filters.FilterConfig (FilterConfig(**options) "
            f"builds one), got {type(filters).__name__}"
        )
    if renderer is not None and not all(hasattr(renderer, a) for a in ("render_ids", "identity")):
        raise DataError(
            f"renderer={renderer!r}: expected a jaxrl_llm.render.Renderer "
            f"(Renderer(load_tokenizer(DIR), template)), got {type(renderer).__name__}"
        )
    if kind != "auto" and kind not in KIND_KEYS:
        raise DataError(f"kind={kind!r}: expected 'auto' or one of {', '.join(repr(k) for k in KINDS)}")
    if on_error not in ON_ERROR:
        raise DataError(f"on_error={on_error!r}: expected 'raise' or 'skip'")


def load_dataset(
    source: str | os.PathLike | SourceLike | None,
    *,
    format: str = "auto",
    kind: str = "auto",
    dataset_info: str | os.PathLike | None = None,
    name: str | None = None,
    on_error: str = "raise",
    rejects_path: str | os.PathLike | None = None,
    filters: FilterConfig = DEFAULT_FILTERS,
    renderer: Any = None,
) -> LoadedDataset:
    """Reads ``source`` (a path, or an already opened source) into validated, filtered canonical records.

    Args:
      source: a file or directory (read by ``jaxrl_llm.data.sources.open_source`` with ``format``,
        ``dataset_info`` and ``name``; None or empty with ``dataset_info`` reads the registry entry's
        file), or an object with ``path``, ``format``, ``kind``, ``records()`` and ``convert()``.
      kind: ``"auto"`` or one of ``KINDS``; it must agree with the source's kind when the format fixes one.
      on_error: ``"raise"`` (the first bad record raises) or ``"skip"`` (count it, write it to rejects).
      rejects_path: where ``"skip"`` writes rejected records (parent directories are created).
      filters: which quality filters run.
      renderer: a ``jaxrl_llm.render.Renderer``, needed by the token-length bounds of ``filters``; when
        given, every record is rendered once (one it cannot render is rejected), and its identity
        (template name and sha256, tokenizer) is recorded in the manifest.

    Raises:
      DataError: the source cannot be read, or the arguments are wrong.
      RecordError: with ``on_error="raise"``, the first record that cannot be read, validated or rendered.
    """
    _check_arguments(kind, on_error, filters, renderer)
    checks = Filters(filters, renderer)  # before the source opens: a bound without a renderer fails fast
    opened = _opened(source, format=format, kind=kind, dataset_info=dataset_info, name=name)
    out: IO | contextlib.nullcontext = contextlib.nullcontext()
    if on_error == "skip" and rejects_path is not None:
        try:
            Path(rejects_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"{rejects_path}: cannot create its directory ({err.strerror})") from None
        # backslashreplace: a lone surrogate in a path or message must not lose the whole file.
        try:
            out = open(rejects_path, "w", encoding="utf-8", errors="backslashreplace")
        except OSError as err:  # a directory, no permission, ...
            raise DataError(f"{rejects_path}: cannot write the rejects file here ({err.strerror})") from None
    with out as rejects:
        hint = _raise_hint(source, opened, format, kind, dataset_info, name)
        loader = _Loader(opened, opened.kind if kind == "auto" else kind, on_error, checks, rejects, hint)
        for raw in opened.records():
            loader.take(raw)
    loader.counts.check()
    manifest = build_manifest(
        kind=loader.kind,
        sources=[source_entry(opened.path, opened.format)],
        counts=loader.counts.as_dict(),
        filters=filters,
        records=loader.records,
        on_error=on_error,
        dataset_info=_registry_entry(dataset_info, name),
    )
    if renderer is not None:  # it decided which records were rejected
        manifest["render"] = renderer.identity()
    return LoadedDataset(
        loader.records, loader.kind, loader.counts, manifest, loader.errors, loader.locations
    )


def _opened(source: Any, *, format: str, kind: str, dataset_info: Any, name: str | None) -> SourceLike:
    if source is None or isinstance(source, str | os.PathLike):
        wanted = {"kind": kind} if kind != "auto" else {}  # overrides the kind a format implies, if it can
        opened = open_source(source, format=format, dataset_info=dataset_info, name=name, **wanted)
    else:
        opened = source
    if kind != "auto" and opened.kind and kind != opened.kind:
        raise DataError(
            f"{opened.path}: the kind asked for is {kind!r}, but this {opened.format} source holds "
            f"{opened.kind} records"
        )
    return opened


def _raise_hint(source: Any, opened: SourceLike, format: str, kind: str, dataset_info: Any, name: Any) -> str:
    """What ends an ``on_error="raise"`` error: how to skip bad records, and the ``validate`` command that
    lists them all (for the same source, registry entry, format and kind)."""
    given = os.fspath(source) if isinstance(source, str | os.PathLike) and source else None
    args = [given] if given else ([] if dataset_info is not None else [opened.path])
    for flag, value in (("--dataset-info", dataset_info), ("--name", name)):
        args += [flag, os.fspath(value)] if value is not None else []
    for flag, value in (("--format", format), ("--kind", kind)):
        args += [flag, value] if value != "auto" else []
    command = " ".join(["python -m jaxrl_llm.data validate", *map(shlex.quote, args)])
    return (
        "to skip bad records and count them, set data.on_error=skip (on_error='skip' in Python); "
        f"to list every bad record, run: {command}"
    )


def _registry_entry(dataset_info: str | os.PathLike | None, name: str | None) -> dict[str, Any] | None:
    if dataset_info is None:
        return None
    return {"path": os.fspath(dataset_info), "name": name, "sha256": file_sha256(dataset_info)}


def load_from_config(cfg: Any, renderer: Any = None, *, write: bool = True) -> LoadedDataset:
    """Loads ``cfg.data`` as a run does: rejects to ``<run_dir>/rejects.jsonl`` with ``on_error="skip"``,
    and the manifest to ``<run_dir>/data_manifest.json``; DataError saying why when no record is accepted
    (``no_records_reason``). With ``write=False`` (processes other than the first of a multi-process run,
    which read the same data) neither file is written.

    With a ``renderer`` (``jaxrl_llm.render.Renderer.from_config``), ``data.min_tokens``/``max_tokens``
    filter by rendered length and the parity check runs on ``render.parity_sample`` accepted records
    (seeded by ``seed``), raising ``RenderError`` with the first failing record's file and line.
    """
    data = cfg.data
    if not data.path and not data.dataset_info:
        raise DataError("data.path is empty: set it to the dataset file or directory")
    run_dir = Path(cfg.run_dir)
    rejects = run_dir / REJECTS_NAME if data.on_error == "skip" and write else None
    loaded = load_dataset(
        data.path,
        format=data.format,
        kind=data.kind,
        dataset_info=data.dataset_info or None,
        name=data.name or None,
        on_error=data.on_error,
        rejects_path=rejects,
        filters=FilterConfig.from_config(cfg),
        renderer=renderer,
    )
    if write:
        write_manifest(loaded.manifest, run_dir)
    require_records(loaded, rejects, "data.path" if data.path else "")
    if renderer is not None and cfg.render.parity_sample > 0:
        from jaxrl_llm.render.records import check_parity_sample

        check_parity_sample(
            loaded.records, renderer, cfg.render.parity_sample, cfg.seed, locations=loaded.locations
        )
    return loaded
