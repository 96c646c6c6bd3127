"""Grain input pipelines: canonical records -> encoded examples -> packed or bucketed batches -> devices.

``make_pipeline`` builds, for this JAX process::

    MapDataset.source(records)[process shard]     process_split="records": a disjoint, equal shard each
      .shuffle(seed).repeat(num_epochs)           Grain reshuffles each epoch (seed + epoch)
      .map(encode)                                render/tokenize: the expensive, picklable part
      .to_iter_dataset() [.mp_prefetch(workers)]  encode runs in worker processes when worker_count > 0
      -> pack: fit to seq_len, FirstFitPackIterDataset, batch (padded with empty rows)
      -> bucket: pad each example to its length bucket, batch examples of one bucket together
      -> pairs: the same with a preference pair per row, ``prompt | chosen | rejected`` (the prompt read once)
      -> kto: the same with rows built per batch: ``prompt | completion | the batch's previous completion``
         (the mismatched pair of KTO's KL term), ``desirable`` [B_local]
      -> [process_split="rows": this process's slice of every global batch's rows]

Everything stateful (truncation, packing, bucketing) runs after ``mp_prefetch``, in the main process, as
Grain advises: the batches are then the same for any ``worker_count``. Batches are dicts of numpy arrays
``tokens``, ``loss_mask``, ``segment_ids``, ``positions`` (all [B_local, T]) and ``num_truncated``
([B_local]); see ``packing`` for what they mean and the next-token target convention. ``T`` is
``seq_len`` when packing, one of the bucket lengths when bucketing.

The iterator (``iter(pipeline)``) is a Grain ``DatasetIterator``: ``get_state()`` is a JSON-serialisable
dict and ``set_state`` resumes at exactly the next batch, inside a half-emitted packing group or with
examples waiting in bucket buffers (both are rebuilt by replaying the stream from a saved point), so it
can be saved with ``grain.checkpoint.CheckpointSave`` in an Orbax checkpoint.

Several processes split the data one of two ways (``process_split``):

- ``"rows"``: every process reads and encodes every record, builds the same global batches and keeps its
  own slice of their rows (as accelerate's batch-sampler shards do). The batches, and so the training run,
  are the same for any number of processes, every mode works (each bucketed step has one row length
  everywhere) and a finite ``num_epochs`` ends on the same step everywhere. The cost: each host encodes
  all the data.
- ``"records"``: each process reads a disjoint, equal shard of the records and packs its own rows: no
  host encodes more than its share, but the batches depend on the process count. Only ``mode="pack"``
  with ``num_epochs=None`` is accepted (bucketing would let processes emit different row lengths on the
  same step; a finite ``num_epochs`` different numbers of batches, leaving the others hanging), so such a
  run is a fixed number of steps over the endless stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jaxrl_llm.errors import UserError
from jaxrl_llm.parallel import DEFAULT_RULES, batch_axes, named_sharding

from .packing import (
    ROW_KEYS,
    as_example,
    bucket_length,
    check_buckets,
    check_overlong,
    default_buckets,
    fit_length,
    kto_rows,
    pad_pair,
    pad_to_bucket,
    pair_buckets,
)
from .records import DataError

MODES = ("pack", "bucket", "pairs", "kto")
# Per-example integers an encoder (or the pipeline) may add beside the token arrays. Bucketed batches carry
# BATCH_SCALARS as [B_local] arrays (0 in filler rows); prompt_len only lays out pair and KTO rows.
SCALARS = ("desirable", "prompt_len", "index")
PROCESS_SPLITS = ("rows", "records")
BATCH_SCALARS = ("desirable", "index")
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Encode:
    """``encode(record)`` normalised to ``{"ids": int32[L], "loss_mask": bool[L]}``; a picklable class,
    not a closure, because Grain sends it to spawned worker processes."""

    encode: Callable[[Any], Any]
    indexed: bool = False  # items are (record index, record): the example gets "index"

    def __call__(self, item: Any) -> dict[str, Any]:
        index, record = item if self.indexed else (None, item)
        encoded = self.encode(record)
        if isinstance(encoded, Mapping) and "chosen" in encoded:  # a preference pair (PairEncoder)
            out = {side: self._example(encoded[side], record) for side in ("chosen", "rejected")}
        else:
            out = self._example(encoded, record)
        if isinstance(encoded, Mapping):
            out.update({k: int(encoded[k]) for k in SCALARS if k in encoded})
        if index is not None:
            out["index"] = int(index)
        return out

    @staticmethod
    def _example(encoded: Any, record: Any) -> dict[str, np.ndarray]:
        try:
            example = as_example(encoded)
        except UserError:  # the encoder's own message (a RenderError, say) already says what is wrong
            raise
        except ValueError as err:
            raise DataError(f"encode's output for record {str(record)[:200]}: {err}") from err
        if not len(example["ids"]):
            raise DataError(f"encode returned no tokens for record {str(record)[:200]}")
        return example


@dataclasses.dataclass(frozen=True)
class _WithIndex:
    def __call__(self, index: int, record: Any) -> tuple[int, Any]:
        return index, record


@dataclasses.dataclass(frozen=True)
class _Truncate:
    seq_len: int

    def __call__(self, example: dict[str, np.ndarray]) -> dict[str, Any]:
        fitted, truncated = fit_length(example, self.seq_len, "truncate")
        assert fitted is not None
        return {"tokens": fitted["ids"], "loss_mask": fitted["loss_mask"], "num_truncated": int(truncated)}


def _from_packer(element: dict[str, Any]) -> dict[str, Any]:
    """Grain's packer names its outputs ``<feature>_segment_ids``/``_positions`` and returns non-sequence
    features as one list per row; rename to the row contract and count the truncated documents."""
    return {
        "tokens": element["tokens"],
        "loss_mask": element["loss_mask"],
        "segment_ids": element["tokens_segment_ids"],
        "positions": element["tokens_positions"],
        "num_truncated": np.int32(sum(element["num_truncated"])),
    }


@dataclasses.dataclass(frozen=True)
class _StackPadded:
    """Stacks rows into a batch of exactly ``batch_size``, filling a short last batch with empty rows so
    the train step sees one shape (a smaller batch would recompile)."""

    batch_size: int

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> Batch:
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        missing = self.batch_size - len(rows)
        if missing:  # all-zero rows are empty: padding tokens, no targets, segment 0
            batch = {
                k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
            }
        return batch


@dataclasses.dataclass
class _Waiting:
    offset: int  # position of the example in the parent stream
    state_before: Any  # the parent's state just before it, to replay from
    row: dict[str, np.ndarray]


class _BucketBatchIterator(grain.DatasetIterator):
    """Emits a batch as soon as one bucket holds ``batch_size`` examples; at the end of the stream the
    partly filled buckets follow, smallest first, padded with empty rows.

    State: the parent's state before the oldest waiting example, how many parent elements to replay from
    there, and which of them are still waiting. Replaying re-encodes at most the examples read since the
    oldest waiting one, and reproduces the buffers exactly.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        buckets: tuple[int, ...],
        batch_size: int,
        overlong: str,
        mode: str = "bucket",
        max_side: int | None = None,
    ):
        super().__init__(parent)
        self._buckets, self._batch_size, self._overlong, self._mode = buckets, batch_size, overlong, mode
        self._max_side = max_side or buckets[-1]
        self._reset()

    def _reset(self) -> None:
        self._waiting: dict[int, list[_Waiting]] = {b: [] for b in self._buckets}
        self._consumed = 0

    def _add(self, offset: int, state_before: Any, example: dict[str, np.ndarray]) -> int | None:
        """Buffers one example; returns its bucket, or None when it is dropped as overlong.

        kto examples wait unpadded (their rows depend on the batch they end up in: ``_emit``)."""
        if self._mode == "pairs":
            if "prompt_len" not in example:
                raise DataError('mode="pairs" needs encode to return "prompt_len" (PairEncoder does)')
            try:
                row = pad_pair(
                    example["chosen"],
                    example["rejected"],
                    self._buckets,
                    prompt_len=example["prompt_len"],
                    max_side=self._max_side,
                    overlong=self._overlong,
                )
            except ValueError as err:
                raise DataError(f"a preference pair: {err}") from err
        elif self._mode == "kto":
            if "prompt_len" not in example or "desirable" not in example:
                raise DataError(
                    'mode="kto" needs encode to return "prompt_len" and "desirable" beside the tokens '
                    "(KTOEncoder does)"
                )
            fitted, truncated = fit_length(as_example(example), self._max_side, self._overlong)
            row = None if fitted is None else {**fitted, "num_truncated": np.int32(truncated)}
            if row is not None:
                row["prompt_len"] = int(example["prompt_len"])
        else:
            row = pad_to_bucket(example, self._buckets, overlong=self._overlong)
        if row is None:
            return None
        row.update({k: np.int32(example[k]) for k in BATCH_SCALARS if k in example})
        bucket = (
            bucket_length(len(row["ids"]), self._buckets) if self._mode == "kto" else row["tokens"].shape[-1]
        )
        self._waiting[bucket].append(_Waiting(offset, state_before, row))
        return bucket

    def __next__(self) -> Batch:
        while True:
            state_before = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                break
            self._consumed += 1
            bucket = self._add(self._consumed - 1, state_before, example)
            if bucket is not None and len(self._waiting[bucket]) == self._batch_size:
                return self._emit(bucket)
        for bucket in self._buckets:
            if self._waiting[bucket]:
                return self._emit(bucket)
        raise StopIteration

    def _emit(self, bucket: int) -> Batch:
        waiting, self._waiting[bucket] = self._waiting[bucket], []
        rows = [w.row for w in waiting]
        if self._mode == "kto":
            built = kto_rows(rows, [r["prompt_len"] for r in rows], self._buckets, self._max_side)
            keep = ("num_truncated", *BATCH_SCALARS)
            rows = [{**b, **{k: r[k] for k in keep if k in r}} for b, r in zip(built, rows, strict=True)]
        return _StackPadded(self._batch_size)(rows)

    def get_state(self) -> dict[str, Any]:
        waiting = sorted((w for ws in self._waiting.values() for w in ws), key=lambda w: w.offset)
        if not waiting:
            return {"parent": self._parent.get_state(), "replay": 0, "keep": []}
        first = waiting[0].offset
        return {
            "parent": waiting[0].state_before,
            "replay": self._consumed - first,
            "keep": [w.offset - first for w in waiting],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._reset()
        keep = set(state["keep"])
        for offset in range(state["replay"]):
            state_before = self._parent.get_state() if offset in keep else None
            example = next(self._parent)
            if offset in keep:
                self._add(offset, state_before, example)
        self._consumed = state["replay"]


class _BucketBatchIterDataset(grain.IterDataset):
    def __init__(
        self,
        parent: grain.IterDataset,
        buckets: tuple[int, ...],
        batch_size: int,
        overlong: str,
        mode: str,
        max_side: int | None = None,
    ):
        super().__init__(parent)
        self._buckets, self._batch_size, self._overlong, self._mode = buckets, batch_size, overlong, mode
        self._max_side = max_side

    def __iter__(self) -> _BucketBatchIterator:
        return _BucketBatchIterator(
            self._parent.__iter__(),
            self._buckets,
            self._batch_size,
            self._overlong,
            self._mode,
            self._max_side,
        )

    def __str__(self) -> str:
        return f"BucketBatchIterDataset(buckets={self._buckets}, batch_size={self._batch_size})"


def _mark_flags_parsed() -> None:
    """Grain's worker start-up reads absl flags and raises ``UnparsedFlagAccessError`` unless a command
    line was parsed; our entry points do not use absl, so its defaults are what we mean."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise DataError(f"process_index={index} must be in [0, {count}) for process_count={count}")
    return index, count


@dataclasses.dataclass(frozen=True)
class _RowsOf:
    """Process ``index`` of ``count``'s slice of a global batch's rows (``process_split="rows"``)."""

    index: int
    count: int

    def __call__(self, batch: Batch) -> Batch:
        size = len(next(iter(batch.values()))) // self.count
        return {k: v[self.index * size : (self.index + 1) * size] for k, v in batch.items()}


def _check_arguments(records: Any, encode: Any, *, batch_size: Any, seq_len: Any) -> None:
    """Clear errors for the mistakes that would otherwise surface as an AttributeError deep in Grain."""
    indexable = hasattr(records, "__len__") and hasattr(records, "__getitem__")
    if not indexable or isinstance(records, (str, bytes, Mapping)):
        hint = "; pass its records: make_pipeline(loaded.records, ...)" if hasattr(records, "records") else ""
        raise DataError(f"records: expected a sequence of records, got a {type(records).__name__}{hint}")
    if not callable(encode):
        raise DataError(
            f"encode: expected a callable record -> {{'ids', 'loss_mask'}} (e.g. SFTEncoder(renderer)), "
            f"got a {type(encode).__name__}"
        )
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"{name}={value!r}: expected a positive integer")


def make_pipeline(
    records: Sequence[Any],
    encode: Callable[[Any], Any],
    *,
    batch_size: int,
    seq_len: int,
    mode: str = "pack",
    buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    worker_count: int = 0,
    overlong: str = "truncate",
    num_packing_bins: int | None = None,
    process_split: str = "records",
    process_index: int | None = None,
    process_count: int | None = None,
    with_index: bool = False,
) -> grain.IterDataset:
    """This process's batches of ``records``, as a Grain ``IterDataset`` (iterate it for batches).

    Args:
      records: canonical records (``LoadedDataset.records``), or anything ``encode`` accepts.
      encode: picklable ``record -> {"ids": int[L], "loss_mask": bool[L]}`` (or an object with those
        attributes, e.g. a renderer's ``Rendered``). A module-level function or a class instance; not a
        lambda when ``worker_count > 0``.
      batch_size: the global batch; each of ``process_count`` processes gets ``batch_size / process_count``.
      seq_len: row length when packing; the longest bucket (and the default buckets' top) when bucketing.
      mode: ``"pack"`` (several documents per row, segment ids keep them apart), ``"bucket"`` (one
        document per row, padded to the smallest of ``buckets`` that holds it) or ``"pairs"`` (``encode``
        returns ``{"chosen", "rejected", "prompt_len"}``, e.g. ``PairEncoder``: each pair is one row
        ``prompt | chosen | rejected``, ``packing.pad_pair``, with a ``shared`` key marking the prompt) or
        ``"kto"`` (``encode`` returns an example with ``prompt_len`` and ``desirable``, e.g. ``KTOEncoder``:
        rows ``prompt | completion | previous completion`` built per batch by ``packing.kto_rows``, with
        ``desirable`` [B]). In these two modes ``seq_len`` bounds each side (prompt + answer) and the rows
        are up to twice as long (default buckets ``packing.pair_buckets``).
      buckets: bucket lengths, each at most ``seq_len``; default powers of two from 64 up to ``seq_len``.
      seed: shuffling (records each epoch, and packed rows within a packing group).
      num_epochs: passes over the data; None repeats forever.
      worker_count: Grain worker processes running ``encode`` (0: in this process). Batches do not
        depend on it. Workers are spawned and re-import ``__main__``: keep script code under
        ``if __name__ == "__main__":``.
      overlong: ``"truncate"`` (counted in ``num_truncated``) or ``"drop"`` examples longer than a row.
      num_packing_bins: rows packed together before they are emitted (default: the per-process batch);
        more bins waste less padding but reorder data further.
      process_split: how JAX processes share the data (module docstring): ``"records"`` (a disjoint shard
        each) or ``"rows"`` (the same global batches everywhere, each process keeping its rows).
        ``process_index``/``process_count`` override ``jax.process_index()``/``jax.process_count()``
        (tests simulate several processes with them).
      with_index: each example carries ``index``, its position in ``records`` (bucketed batches: an
        ``index`` [B] array), e.g. to look up values precomputed per record.
    """
    _check_arguments(records, encode, batch_size=batch_size, seq_len=seq_len)
    if mode not in MODES:
        raise DataError(f"mode={mode!r}: expected one of {', '.join(map(repr, MODES))}")
    try:
        check_overlong(overlong)
        buckets = None if buckets is None else check_buckets(buckets)
    except ValueError as err:  # packing.py is plain numpy; a bad option is still the user's to fix
        raise DataError(str(err)) from err
    if seq_len < 1 or batch_size < 1 or worker_count < 0 or (num_epochs is not None and num_epochs < 1):
        raise DataError(
            f"seq_len={seq_len}, batch_size={batch_size}, num_epochs={num_epochs} must be >= 1 "
            f"and worker_count={worker_count} >= 0"
        )
    if process_split not in PROCESS_SPLITS:
        raise DataError(
            f"process_split={process_split!r}: expected one of {', '.join(map(repr, PROCESS_SPLITS))}"
        )
    index, count = _process(process_index, process_count)
    if batch_size % count:
        raise DataError(f"batch_size={batch_size} is not divisible by the {count} processes sharing it")
    rows = _RowsOf(index, count) if process_split == "rows" and count > 1 else None
    if rows is not None:  # the one-process pipeline, then this process's rows of each batch
        index, count = 0, 1
    if count > 1 and mode != "pack":
        raise DataError(
            f'mode="{mode}" cannot be used by {count} processes with process_split="records": each picks its '
            "batch's bucket length on its own, so on the same step they would emit rows of different lengths "
            'and the global arrays would not agree; use process_split="rows"'
        )
    if count > 1 and num_epochs is not None:
        raise DataError(
            f'num_epochs={num_epochs} cannot be used by {count} processes with process_split="records": '
            "packing can leave them with different numbers of batches, and the processes that finish first "
            'would leave the others hanging; use num_epochs=None and a fixed number of steps, or process_split="rows"'
        )
    local_batch = batch_size // count

    # Equal shards: a process with one record more would run one step more and hang the others.
    usable = len(records) - len(records) % count
    if usable == 0:
        raise DataError(f"{len(records)} records cannot be shared by {count} processes")
    ds = grain.MapDataset.source(records)
    if with_index:
        ds = ds.map_with_index(_WithIndex())
    if count > 1:
        ds = ds[:usable][index::count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    it = ds.map(Encode(encode, indexed=with_index)).to_iter_dataset()
    if worker_count:
        _mark_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))

    if mode != "pack":
        two_sided = mode in ("pairs", "kto")
        limit = 2 * seq_len if two_sided else seq_len
        buckets = buckets or (pair_buckets(seq_len) if two_sided else default_buckets(seq_len))
        if buckets[-1] > limit:
            raise DataError(f"buckets={buckets}: every bucket must be <= {limit} (seq_len={seq_len})")
        max_side = min(seq_len, buckets[-1]) if two_sided else None
        return _rows_of(_BucketBatchIterDataset(it, buckets, local_batch, overlong, mode, max_side), rows)

    if overlong == "drop":
        it = it.filter(_FitsIn(seq_len))
    packed = grain.experimental.FirstFitPackIterDataset(
        it.map(_Truncate(seq_len)),
        length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_packing_bins or local_batch,
        seed=seed,
        shuffle_bins=shuffle,
        meta_features=("num_truncated",),
    )
    return _rows_of(packed.map(_from_packer).batch(local_batch, batch_fn=_StackPadded(local_batch)), rows)


def _rows_of(batches: grain.IterDataset, rows: _RowsOf | None) -> grain.IterDataset:
    return batches if rows is None else batches.map(rows)


@dataclasses.dataclass(frozen=True)
class _FitsIn:
    seq_len: int

    def __call__(self, example: dict[str, np.ndarray]) -> bool:
        return len(example["ids"]) <= self.seq_len


def to_device(batch: Mapping[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
    """A host batch as global arrays on ``mesh``, rows split over the mesh axes the ``batch`` rule names.

    Each process passes its own rows (``[B_local, ...]``); the global batch is their concatenation in
    process order, ``B_local * process_count`` rows.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        sharding = named_sharding(batch_axes(value.ndim), global_shape, mesh, rules, what=f"batch[{key!r}]")
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


__all__ = ["MODES", "PROCESS_SPLITS", "ROW_KEYS", "Encode", "batch_axes", "make_pipeline", "to_device"]
