"""One entry point from "a dataset the user named" to raw records and the converter for them.

``open_source`` decides three things and fixes them in a :class:`Source`: which file (or dataset) to read,
which reader reads it (``jsonl``, ``json``, ``parquet``, ``text``, ``hf_disk``, ``tfds``), and which record
format converts it (``alpaca``, ``sharegpt``, ``openai``, ``gsm8k``, ``canonical``). ``format`` may name
either a reader or a record format; whatever it leaves open is decided from the file's extension or
directory contents and from its first readable record. With a LLaMA-Factory ``dataset_info.json`` and a
``name``, the registry entry decides the file and the conversion. A ``synthetic:NAME?key=value&...`` path
names records generated in-process (see ``jaxrl_llm.data.synthetic``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from typing import Any

from jaxrl_llm.data import llamafactory
from jaxrl_llm.data.formats import (
    RECORD_FORMATS,
    canonical_passthrough,
    detect_format,
    gsm8k_to_prompt,
    spec_for_format,
)
from jaxrl_llm.data.llamafactory import DatasetInfo, DatasetSpec
from jaxrl_llm.data.readers import READER_FORMATS, detect_directory, read_records, resolve_reader_format
from jaxrl_llm.data.records import DataError, Location, RawRecord, listed, option
from jaxrl_llm.data.synthetic import SYNTHETIC, is_synthetic, parse_synthetic, synthetic_records

FORMATS = READER_FORMATS + RECORD_FORMATS
# Said to both users: the command line's flag and the training config's key.
NAME_HINT = f"pick a dataset with {option('name')}"
_SNIFF_LIMIT = 1000  # records looked at for the first readable one before giving up on detection


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened source: ``path`` (the file, directory or TFDS name read), ``format`` (the record format
    that converts it), ``kind`` (the canonical kind it yields; None when only the records can tell),
    ``reader`` (the reader format), and the LLaMA-Factory ``spec`` behind alpaca/sharegpt/openai."""

    path: str
    format: str
    kind: str | None
    reader: str
    spec: DatasetSpec | None = None
    split: str | None = None
    data_dir: str | None = None

    def records(self) -> Iterator[RawRecord]:
        """Every record, readable or not, in order (a fresh pass on each call)."""
        return read_records(self.path, format=self.reader, split=self.split, data_dir=self.data_dir)

    def convert(self, value: Any) -> dict:
        """``value`` (a RawRecord's value) as a canonical record; :class:`RecordError` naming the field in
        the source's own terms."""
        if self.format == "gsm8k":
            return gsm8k_to_prompt(value)
        if self.format == "canonical":
            return canonical_passthrough(value)
        assert self.spec is not None, self.format
        return llamafactory.convert(value, self.spec)


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """A ``synthetic:`` path (``path``), whose records are generated in-process, already canonical."""

    path: str
    kind: str | None
    format: str = "canonical"
    reader: str = "synthetic"

    def records(self) -> Iterator[RawRecord]:
        """Every generated record, in order; ``Location(path, index)`` names each one."""
        values = synthetic_records(self.path)
        return (RawRecord(Location(self.path, i), value=v) for i, v in enumerate(values))

    def convert(self, value: Any) -> dict:
        return canonical_passthrough(value)


def open_source(
    source: str | os.PathLike[str] | None,
    *,
    format: str = "auto",
    dataset_info: str | os.PathLike[str] | None = None,
    name: str | None = None,
    split: str | None = None,
    data_dir: str | None = None,
    kind: str = "auto",
) -> Source | SyntheticSource:
    """Opens ``source`` for reading; :class:`DataError` when it cannot be read at all.

    Args:
      source: a file, a directory (HF ``save_to_disk``, prepared TFDS), a TFDS dataset name (with
        ``format="tfds"``), a ``synthetic:NAME?key=value&...`` dataset, or with ``name`` and no
        ``dataset_info``, a ``dataset_info.json`` or the directory holding it. With ``dataset_info``, a data file here replaces the entry's ``file_name``;
        empty or None uses the entry's.
      format: ``auto``, a reader format (``jsonl``, ``json``, ``parquet``, ``text``, ``hf_disk``, ``tfds``)
        or a record format (``alpaca``, ``sharegpt``, ``openai``, ``gsm8k``, ``canonical``).
      dataset_info, name: a LLaMA-Factory registry and the dataset in it.
      split, data_dir: for ``DatasetDict`` and TFDS sources.
      kind: ``auto``, or the canonical kind wanted; it overrides the kind an alpaca/sharegpt/openai spec
        implies where the conversion can yield it (alpaca ``text`` <-> ``conversation``), and is left for
        the caller to check against ``Source.kind`` otherwise.
    """
    opened = _open(source, format, dataset_info, name, split, data_dir)
    if kind != "auto" and isinstance(opened, Source) and opened.spec is not None:
        spec = llamafactory.with_kind(opened.spec, kind)
        if spec is not None:
            opened = dataclasses.replace(opened, kind=kind, spec=spec)
    return opened


def _open(
    source: str | os.PathLike[str] | None,
    format: str,
    dataset_info: str | os.PathLike[str] | None,
    name: str | None,
    split: str | None,
    data_dir: str | None,
) -> Source | SyntheticSource:
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}; valid formats: {', '.join(FORMATS)}")
    path = os.fspath(source) if source else None
    if is_synthetic(path):
        return _open_synthetic(
            path, format, dataset_info=dataset_info, name=name, split=split, data_dir=data_dir
        )
    if name is not None or dataset_info is not None:
        return _open_registry(path, format, dataset_info, name, split, data_dir)
    if path is None:
        raise DataError("no source given: pass a file or directory, or dataset_info and name")
    registry_dir = os.path.isdir(path) and detect_directory(path) is None
    if (registry_dir or os.path.isfile(path)) and _holds_registry(path):
        names = listed(DatasetInfo.load(path).names())
        what = "dataset directory" if registry_dir else "dataset_info.json"
        raise DataError(f"{path}: this is a LLaMA-Factory {what}: {NAME_HINT} (datasets: {names})")
    reader = resolve_reader_format(path, format if format in READER_FORMATS else "auto")
    first = _first_value(read_records(path, format=reader, split=split, data_dir=data_dir))
    record_format = format if format in RECORD_FORMATS else _detect(path, first)
    spec = spec_for_format(record_format, first, path) if record_format in llamafactory.FORMATTINGS else None
    kind = spec.kind if spec is not None else ("prompt" if record_format == "gsm8k" else None)
    return Source(path, record_format, kind, reader, spec, split, data_dir)


def _open_synthetic(path: str, format: str, **unused: Any) -> SyntheticSource:
    flags = {"dataset_info": option("dataset_info"), "name": option("name")}
    given = " or ".join(flags.get(key, f"{key}=") for key, value in unused.items() if value)
    if given:
        raise DataError(f"{path}: a synthetic dataset takes no {given}; its parameters are in the path")
    if format not in ("auto", "canonical"):
        raise DataError(
            f"{path}: a synthetic dataset is canonical records; set {option('format')} to auto or canonical"
        )
    name, _ = parse_synthetic(path)  # a bad name or parameter fails now, not on the first read
    return SyntheticSource(path, SYNTHETIC[name].kind)


def _first_value(records: Iterator[RawRecord]) -> Any:
    for raw in itertools.islice(records, _SNIFF_LIMIT):
        if raw.error is None:
            return raw.value
    return None


def _detect(path: str, first: Any) -> str:
    if first is None:
        return "canonical"  # no readable record: nothing to convert, and no format to guess
    found = detect_format(first)
    if found is None:
        keys = ", ".join(sorted(map(str, first))[:12])
        raise DataError(
            f"{path}: cannot tell the record format from the first record (keys: {keys}); set "
            f"{option('format')} to one of {', '.join(RECORD_FORMATS)}"
        )
    return found


def _open_registry(
    path: str | None,
    format: str,
    dataset_info: str | os.PathLike[str] | None,
    name: str | None,
    split: str | None,
    data_dir: str | None,
) -> Source:
    registry = dataset_info if dataset_info is not None else path
    if registry is None:
        raise DataError(
            f"dataset name {name!r} needs a dataset_info.json: set {option('dataset_info')}, or give it as "
            "the source"
        )
    info = DatasetInfo.load(registry)
    if name is None:
        raise DataError(f"{info.path}: {NAME_HINT} (datasets: {listed(info.names())})")
    spec = info.entry(name)
    if format in RECORD_FORMATS and format != spec.formatting:
        raise DataError(
            f"the format asked for is {format!r}, but {info.path} says dataset {name!r} is {spec.formatting}"
        )
    data = spec.path
    if dataset_info is not None and path and not _holds_registry(path):
        data, spec = path, dataclasses.replace(spec, path=path)
    elif not os.path.exists(data):
        raise DataError(f"{info.path}: dataset {name!r}: its file {data} does not exist")
    reader = resolve_reader_format(data, format if format in READER_FORMATS else "auto")
    if spec.kind == "text":
        # `{"prompt": ...}` alone is pre-training text, unless the records have the default answer column.
        first = _first_value(read_records(data, format=reader, split=split, data_dir=data_dir))
        if isinstance(first, dict) and llamafactory.ALPACA_COLUMNS["response"] in first:
            spec = llamafactory.with_kind(spec, "conversation") or spec
    return Source(data, spec.formatting, spec.kind, reader, spec, split, data_dir)


def _holds_registry(path: str) -> bool:
    return os.path.basename(path) == "dataset_info.json" or os.path.isfile(
        os.path.join(path, "dataset_info.json")
    )
