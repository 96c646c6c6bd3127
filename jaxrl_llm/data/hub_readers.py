"""Readers for datasets that libraries wrote: HF ``datasets`` ``save_to_disk`` directories and TFDS.

Both libraries are imported only here and only when such a source is read: ``datasets`` is optional, and
TFDS is read through ``data_source`` (ArrayRecord, random access) so TensorFlow is never needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from jaxrl_llm.data.plain import plain_record
from jaxrl_llm.data.records import DataError, Location, RawRecord

_BATCH_ROWS = 1024


def pick_split(source: str, splits: Sequence[str], split: str | None) -> str:
    """``split`` checked against ``splits``; with no ``split``, the only one there is."""
    if split is not None:
        if split not in splits:
            raise DataError(f"{source}: no split {split!r}; it has {', '.join(sorted(splits))}")
        return split
    if len(splits) == 1:
        return splits[0]
    if not splits:
        raise DataError(f"{source}: holds no splits (was it prepared?)")
    raise DataError(f"{source}: holds several splits ({', '.join(sorted(splits))}); pass split=...")


def read_hf_disk(source: str, *, split: str | None = None) -> Iterator[RawRecord]:
    """Rows of a ``Dataset`` or of one split of a ``DatasetDict`` written by ``save_to_disk``; a split can
    also be chosen by pointing ``source`` at its sub-directory."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: reading a `save_to_disk` dataset needs the `datasets` package (pip install datasets)"
        ) from None
    try:
        loaded = datasets.load_from_disk(source)
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid, ...
        raise DataError(f"{source}: cannot be loaded by datasets.load_from_disk ({err})") from None
    name = source
    if isinstance(loaded, datasets.DatasetDict):
        chosen = pick_split(source, list(loaded), split)
        loaded, name = loaded[chosen], os.path.join(source, chosen)
    elif split is not None and str(loaded.split) != split:
        raise DataError(
            f"{source}: is a single Dataset (split {loaded.split}), not a DatasetDict with {split!r}"
        )
    try:  # the Arrow files are memory-mapped unchecked: corrupt offsets would crash the reader, not raise
        loaded.data.table.validate(full=True)
    except Exception as err:  # ArrowInvalid
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{name}: a corrupt `save_to_disk` dataset ({first})") from None
    return _hf_rows(name, loaded)


def library_batches(source: str, batches: Iterator[Any], what: str) -> Iterator[list[Any]]:
    """Each batch of ``batches`` (Arrow record batches or tables) as a list of rows; a library error while
    reading (corrupt or cut-off data past the header) is a DataError naming ``source`` and the row reached."""
    done = 0
    while True:
        try:
            batch = next(batches, None)
            rows = None if batch is None else batch.to_pylist()
        except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ... depending on the damage
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"{source}: a corrupt {what}: reading failed after row {done} ({first})"
            ) from None
        if rows is None:
            return
        yield rows
        done += len(rows)


def _hf_rows(name: str, dataset: Any) -> Iterator[RawRecord]:
    index = 0
    # Arrow batches, not row dicts: `datasets` would otherwise decode features (images, audio) per row.
    tables = iter(dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS))
    for rows in library_batches(name, tables, "`save_to_disk` dataset"):
        for row in rows:
            yield plain_record(row, Location(name, index))
            index += 1


def read_tfds(source: str, *, split: str | None = None, data_dir: str | None = None) -> Iterator[RawRecord]:
    """Examples of a prepared TFDS dataset: ``source`` is its version directory (``.../name/1.0.0``) or a
    dataset name (``name``, ``name:1.0.0``, ``name/config``) under ``data_dir``. Never downloads."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"{source}: reading TFDS needs the `tensorflow-datasets` package") from None
    try:
        if os.path.isdir(source):
            builder = tfds.builder_from_directory(source)
        else:
            builder = tfds.builder(source, data_dir=data_dir)
        chosen = pick_split(source, list(builder.info.splits), split)
        data = builder.as_data_source(split=chosen)
    except DataError:
        raise
    except Exception as err:  # TFDS raises DatasetNotFoundError, ValueError, AssertionError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{source}: cannot open the TFDS dataset ({first})") from None
    return _tfds_rows(f"{source}/{chosen}", data)


def _tfds_rows(name: str, data: Any) -> Iterator[RawRecord]:
    total = len(data)
    for start in range(0, total, _BATCH_ROWS):
        indices = list(range(start, min(start + _BATCH_ROWS, total)))
        # Batched reads are one ArrayRecord call instead of one per example.
        rows = data.__getitems__(indices) if hasattr(data, "__getitems__") else [data[i] for i in indices]
        for i, row in zip(indices, rows, strict=True):
            yield plain_record(row, Location(name, i))
