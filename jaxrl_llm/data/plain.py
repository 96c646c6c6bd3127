"""Values from columnar and tensor stores (Arrow, HF ``datasets``, TFDS) as plain JSON-like Python.

Converters and the schema only ever see dict, list, str, int, float, bool and None, so that a record read
from Parquet and the same record read from JSON Lines are equal and hash equally.
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any

from jaxrl_llm.data.records import Location, RawRecord


class NotPlainError(ValueError):
    """A value with no JSON-like form (bytes that are not UTF-8, an image object, ...), with its path."""


def plain_row(value: Any) -> Any:
    """``value`` with bytes decoded as UTF-8, NumPy scalars/arrays and tuples unwrapped, recursively."""
    return _plain(value, "")


def _plain(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise NotPlainError(
                f"{path or 'record'}: expected UTF-8 text, got bytes not valid UTF-8 at byte {err.start}"
            ) from None
    # NumPy without importing it: scalars have .item(), arrays .tolist().
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return _plain(value.tolist(), path)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    raise NotPlainError(f"{path or 'record'}: expected a JSON-like value, got a {type(value).__name__}")


def object_record(value: Any, location: Location) -> RawRecord:
    """``value`` as a RawRecord when it is a JSON object; every record format is one, so anything else is
    reported here rather than by each converter."""
    if isinstance(value, dict):
        return RawRecord(location, value=value)
    text = repr(value)
    shown = text if len(text) <= 60 else text[:57] + "..."
    return RawRecord(location, error=f"expected a JSON object, got {type(value).__name__} {shown}")


def plain_record(row: Any, location: Location) -> RawRecord:
    """``row`` (from Arrow, HF ``datasets`` or TFDS) as a RawRecord of plain values, or why it is not one."""
    try:
        return object_record(plain_row(row), location)
    except NotPlainError as err:
        return RawRecord(location, error=str(err))
