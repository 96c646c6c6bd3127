"""Readers: files and datasets on disk -> :class:`RawRecord` items, one per record, nothing dropped.

``read_records(path, format=...)`` reads JSON Lines, JSON arrays, Parquet, plain text (one document a
line), HF ``datasets`` directories written by ``save_to_disk`` and TFDS datasets (through
``tfds.data_source``, which reads ArrayRecord files without TensorFlow). A source that cannot be read at all
raises :class:`DataError` when ``read_records`` is called; a single record that cannot be parsed (a broken
JSON line, bytes that are not UTF-8, a row that is not an object) comes out as ``RawRecord(error=...)`` in
its place, so that counts always add up. Values are plain JSON-like Python (dict, list, str, int, float,
bool, None) whatever the storage: bytes are decoded, NumPy and Arrow scalars unwrapped.

Readers know nothing of the record's meaning; :mod:`jaxrl_llm.data.sources` picks the converter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from jaxrl_llm.data.hub_readers import _BATCH_ROWS, library_batches, read_hf_disk, read_tfds
from jaxrl_llm.data.plain import object_record, plain_record
from jaxrl_llm.data.records import TOO_DEEP, DataError, Location, RawRecord, option

READER_FORMATS = ("auto", "jsonl", "json", "parquet", "text", "hf_disk", "tfds")
_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_UTF8_BOM = b"\xef\xbb\xbf"
_TEXT_LIMIT = 500  # characters of an unparseable line kept for rejects.jsonl


def read_records(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    split: str | None = None,
    data_dir: str | None = None,
) -> Iterator[RawRecord]:
    """Every record of ``path`` in order, as :class:`RawRecord` (a value, or the reason it is unreadable).

    ``format``: one of :data:`READER_FORMATS`; ``auto`` decides by extension (``.jsonl``, ``.json``,
    ``.parquet``, ``.txt``) or by a directory's contents (HF ``save_to_disk`` / TFDS). ``split`` picks a
    split of a ``DatasetDict`` or TFDS dataset (needed only when there are several). For ``tfds``, ``path``
    is a prepared dataset directory or a registered dataset name read from ``data_dir``.

    Raises :class:`DataError` now, not on first iteration, when the source cannot be read at all.
    """
    source = os.fspath(path)
    fmt = resolve_reader_format(source, format)
    if fmt == "tfds":
        return read_tfds(source, split=split, data_dir=data_dir)
    if not os.path.exists(source):
        raise DataError(f"{source}: no such file or directory")
    if fmt == "hf_disk":
        return read_hf_disk(source, split=split)
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory; the {fmt} format reads a file")
    if fmt == "jsonl":
        return _read_jsonl(source)
    if fmt == "text":
        return _read_text(source)
    if fmt == "parquet":
        return _read_parquet(source)
    return _read_json(source)


def resolve_reader_format(source: str, format: str) -> str:
    """The reader format ``auto`` stands for at ``source`` (or ``format`` itself once checked)."""
    if format not in READER_FORMATS:
        raise DataError(f"unknown reader format {format!r}; valid formats: {', '.join(READER_FORMATS)}")
    if format != "auto":
        return format
    if os.path.isdir(source):
        found = detect_directory(source)
        if found is None:
            raise DataError(
                f"{source}: a directory that is neither an HF `save_to_disk` dataset (state.json or "
                "dataset_dict.json) nor a prepared TFDS dataset (features.json)"
            )
        return found
    if not os.path.exists(source):
        raise DataError(f"{source}: no such file or directory")
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in _BY_SUFFIX:
        raise DataError(
            f"{source}: cannot tell the format from the extension {suffix!r}; set {option('format')} to one of "
            f"{', '.join(READER_FORMATS[1:])}"
        )
    if _BY_SUFFIX[suffix] == "json" and _first_line_is_object(source):
        # A `.json` file holding JSON Lines is common (LLaMA-Factory and HF `datasets` accept it).
        return "jsonl"
    return _BY_SUFFIX[suffix]


def _first_line_is_object(source: str) -> bool:
    with open(source, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw.removeprefix(_UTF8_BOM)), dict)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    return False
    return False


def detect_directory(source: str) -> str | None:
    """``hf_disk`` or ``tfds`` when ``source`` is a directory those libraries wrote, else None."""
    names = set(os.listdir(source))
    if "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names:
        return "hf_disk"
    if "features.json" in names:
        return "tfds"
    return None


def _nonblank_lines(source: str) -> Iterator[tuple[Location, bytes]]:
    """Each non-blank line with its location; blank lines are skipped but still counted."""
    index = 0
    # Binary mode splits on b"\n" only: text mode would also split inside strings at \r or U+2028.
    with open(source, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if raw.strip():
                yield Location(source, index, line_no), raw
                index += 1


def _read_jsonl(source: str) -> Iterator[RawRecord]:
    for location, raw in _nonblank_lines(source):
        yield _parse_line(raw, location)


def _parse_line(raw: bytes, location: Location) -> RawRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1]
        shown = _shown(raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n"))
        reason = f"line is not valid UTF-8 (byte {err.start} is {bad!r}){_encoding_hint(raw)}"
        return RawRecord(location, error=reason, text=shown)
    text = text.rstrip("\r\n")  # a column past the line's end would otherwise read as column 1
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        cut = " (the line ends before the record does: cut off?)" if _at_end(err, text) else ""
        reason = f"invalid JSON: {_json_message(err)} at column {err.colno}{cut}"
        return RawRecord(location, error=reason, text=_shown(text))
    except RecursionError:
        return RawRecord(location, error=TOO_DEEP, text=_shown(text))
    return object_record(value, location)


def _json_message(err: json.JSONDecodeError) -> str:
    # "Unterminated string starting at" ends in "at" already; the caller adds "at line/column ...".
    return err.msg.removesuffix(" at")


def _at_end(err: json.JSONDecodeError, text: str) -> bool:
    """Whether the JSON text ran out before its value ended (a truncated file or line)."""
    return err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")


def _encoding_hint(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "; the file looks like UTF-16: save it as UTF-8"
    return ""


def _shown(text: str) -> str:
    """The text of a record that is not JSON, as rejects.jsonl keeps it (a binary line can be huge)."""
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 3] + "..."


def load_json_file(source: str) -> Any:
    """The JSON value of a whole file (``None`` for a blank one); a DataError says where it is broken."""
    with open(source, "rb") as f:
        data = f.read()
    try:
        text = data.removeprefix(_UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not valid UTF-8 (byte {err.start}){_encoding_hint(data)}") from None
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        cut = " (the file ends before the JSON does: cut off?)" if _at_end(err, text) else ""
        raise DataError(
            f"{source}: not valid JSON: {_json_message(err)} at line {err.lineno} column {err.colno}{cut}"
        ) from None
    except RecursionError:
        raise DataError(f"{source}: {TOO_DEEP}") from None


def _read_json(source: str) -> Iterator[RawRecord]:
    value = load_json_file(source)
    if value is None:
        return iter(())
    if not isinstance(value, list):
        raise DataError(
            f"{source}: expected a JSON array of records at the top level, got {type(value).__name__}"
        )
    return (object_record(item, Location(source, i)) for i, item in enumerate(value))


def _read_text(source: str) -> Iterator[RawRecord]:
    # LLaMA-Factory's `.txt` files (wiki_demo.txt): one pre-training document per line.
    for location, raw in _nonblank_lines(source):
        try:
            yield RawRecord(location, value={"text": raw.decode("utf-8").rstrip("\r\n")})
        except UnicodeDecodeError as err:
            reason = f"line is not valid UTF-8 (byte {err.start}){_encoding_hint(raw)}"
            text = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
            yield RawRecord(location, error=reason, text=_shown(text))


def _read_parquet(source: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses that vary by version
        raise DataError(f"{source}: not a readable Parquet file ({err})") from None
    return _parquet_rows(source, parquet)


def _parquet_rows(source: str, parquet: Any) -> Iterator[RawRecord]:
    index = 0
    for rows in library_batches(source, parquet.iter_batches(batch_size=_BATCH_ROWS), "Parquet file"):
        for row in rows:
            yield plain_record(row, Location(source, index))
            index += 1
