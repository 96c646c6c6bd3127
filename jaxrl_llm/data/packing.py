"""Packing and bucket padding of tokenized examples into fixed-shape rows (pure numpy).

An *example* is what an encoder (the renderer) produces for one record: ``{"ids": int32[L], "loss_mask":
bool[L]}``. A *row* is what the model consumes, always ``T`` tokens long:

- ``tokens``: int32[T], padding is ``PAD_ID`` (0);
- ``loss_mask``: bool[T], ``loss_mask[t]`` says that token ``t`` is a *target*: the model is trained to
  predict it (it is an assistant token, or any token for plain text). It is the example's own mask, not
  shifted, and False on padding;
- ``segment_ids``: int32[T], 1..n for the n documents packed in the row, 0 on padding. Attention never
  crosses segments and never sees segment 0;
- ``positions``: int32[T], restarting at 0 at each document (RoPE positions), 0 on padding.

Target convention (the trainer's side): the model reads the whole row, and its logits at position ``t``
predict token ``t + 1``. So the targets of ``logits[:, :-1]`` are ``tokens[:, 1:]``, weighted by
``loss_mask[:, 1:]`` and only where ``t`` and ``t + 1`` belong to the same document (the first token of
a document is never predicted from the previous one). :func:`next_token_targets` computes exactly this.

Examples longer than the row are truncated (keeping their start; counted per row in ``num_truncated``)
or dropped, as ``overlong`` says. The Grain pipeline (``pipeline.py``) packs with Grain's own first-fit
packer; :func:`pack_examples` is the same algorithm in plain numpy, for offline use and as its reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

PAD_ID = 0
OVERLONG = ("truncate", "drop")
ROW_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")
ROW_DTYPES = {"tokens": np.int32, "loss_mask": np.bool_, "segment_ids": np.int32, "positions": np.int32}

Example = dict[str, np.ndarray]  # {"ids": int32[L], "loss_mask": bool[L]}
Row = dict[str, np.ndarray]  # ROW_KEYS -> [T] arrays (and "num_truncated" where noted)


def as_example(value: Any) -> Example:
    """Normalises an encoder's output: a mapping, or an object with attributes (the renderer's
    ``Rendered``), holding ``ids`` and optionally ``loss_mask`` (default: every token is a target)."""
    get = value.get if isinstance(value, Mapping) else lambda k, d=None: getattr(value, k, d)
    ids = get("ids")
    if ids is None:
        raise ValueError(f"an encoded example needs 'ids' (int[L]); got {type(value).__name__}")
    ids = np.asarray(ids, dtype=np.int32)
    mask = get("loss_mask")
    mask = np.ones(ids.shape, np.bool_) if mask is None else np.asarray(mask, dtype=np.bool_)
    if ids.ndim != 1 or mask.shape != ids.shape:
        raise ValueError(f"ids and loss_mask must be 1-D of one length; got {ids.shape} and {mask.shape}")
    return {"ids": ids, "loss_mask": mask}


def check_overlong(overlong: str) -> None:
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: expected one of {', '.join(map(repr, OVERLONG))}")


def fit_length(example: Example, max_len: int, overlong: str = "truncate") -> tuple[Example | None, bool]:
    """``(example cut to max_len, whether it was cut)``; ``(None, False)`` when it is dropped."""
    check_overlong(overlong)
    if len(example["ids"]) <= max_len:
        return example, False
    if overlong == "drop":
        return None, False
    return {k: v[:max_len] for k, v in example.items()}, True


def empty_rows(n: int, length: int) -> Row:
    """``n`` all-padding rows (segment 0 everywhere), with a zero ``num_truncated``."""
    rows = {k: np.zeros((n, length), ROW_DTYPES[k]) for k in ROW_KEYS}
    rows["num_truncated"] = np.zeros((n,), np.int32)
    return rows


def pack_examples(
    examples: Iterable[Example], seq_len: int, *, num_bins: int | None = None, overlong: str = "truncate"
) -> Row:
    """First-fit packing: each example goes into the first open row with room for it.

    With ``num_bins`` set, at most that many rows are open at a time: when an example fits none of them,
    they are all closed and a fresh group starts with that example (Grain's ``FirstFitPackIterDataset``,
    which bounds how far the packer reorders data). With None every row stays open.

    Returns rows stacked as ``[N, seq_len]`` arrays (see the module docstring) plus ``num_truncated``:
    int32[N], how many of each row's documents were cut to ``seq_len``.
    """
    check_overlong(overlong)
    closed: list[Row] = []
    group: list[Row] = []
    fill: list[int] = []  # tokens used in each open row
    for raw in examples:
        example, truncated = fit_length(as_example(raw), seq_len, overlong)
        if example is None:
            continue
        n = len(example["ids"])
        row = next((i for i, used in enumerate(fill) if used + n <= seq_len), None)
        if row is None and num_bins is not None and len(group) == num_bins:
            closed.extend(group)
            group, fill = [], []
        if row is None:
            group.append({k: v[0] for k, v in empty_rows(1, seq_len).items()})
            fill.append(0)
            row = len(group) - 1
        _place(group[row], example, fill[row])
        group[row]["num_truncated"] += truncated
        fill[row] += n
    closed.extend(group)
    if not closed:
        return empty_rows(0, seq_len)
    return {k: np.stack([r[k] for r in closed]) for k in closed[0]}


def _place(row: Row, example: Example, start: int) -> None:
    n = len(example["ids"])
    end = start + n
    row["tokens"][start:end] = example["ids"]
    row["loss_mask"][start:end] = example["loss_mask"]
    row["segment_ids"][start:end] = row["segment_ids"].max() + 1
    row["positions"][start:end] = np.arange(n, dtype=np.int32)


def default_buckets(seq_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to (and ending at) ``seq_len``: 64, 128, ..., seq_len."""
    out = []
    length = smallest
    while length < seq_len:
        out.append(length)
        length *= 2
    return (*out, seq_len)


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted, deduplicated, positive bucket lengths."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"buckets={tuple(buckets)}: expected a non-empty list of positive lengths")
    return out


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens (the largest one when none does)."""
    return next((b for b in buckets if b >= length), buckets[-1])


def pad_to_bucket(example: Example, buckets: Sequence[int], *, overlong: str = "truncate") -> Row | None:
    """One example padded to the smallest bucket length that holds it; None when it is dropped.

    Padding keeps jit shapes to ``len(buckets)`` values. Examples longer than the largest bucket are cut
    to it (``num_truncated`` = 1) or dropped, per ``overlong``.
    """
    example = as_example(example)
    fitted, truncated = fit_length(example, buckets[-1], overlong)
    if fitted is None:
        return None
    n = len(fitted["ids"])
    row = {k: v[0] for k, v in empty_rows(1, bucket_length(n, buckets)).items()}
    _place(row, fitted, 0)
    row["num_truncated"] = np.int32(truncated)
    return row


def pad_pair(
    chosen: Example, rejected: Example, buckets: Sequence[int], *, overlong: str = "truncate"
) -> Row | None:
    """A preference pair as one row of ``[2, T]`` arrays (side 0 chosen, side 1 rejected), both padded to
    the bucket that holds the longer side, so a batch of pairs never splits one; None when dropped."""
    sides = [as_example(chosen), as_example(rejected)]
    fitted = [fit_length(side, buckets[-1], overlong) for side in sides]
    if any(f is None for f, _ in fitted):
        return None
    length = bucket_length(max(len(f["ids"]) for f, _ in fitted), buckets)
    row = empty_rows(2, length)
    for i, (side, _) in enumerate(fitted):
        _place({k: row[k][i] for k in ROW_KEYS}, side, 0)  # views: writes land in ``row``
    row["num_truncated"] = np.int32(sum(t for _, t in fitted))
    return row


def next_token_targets(tokens: Any, loss_mask: Any, segment_ids: Any) -> tuple[Any, Any]:
    """``(targets, weights)``, both [B, T-1], for ``logits[:, :-1]`` of a [B, T] row batch.

    ``weights[b, t]`` is True when token ``t + 1`` is a target and belongs to the same document as token
    ``t``. Only slicing and operators are used, so numpy and jax arrays both work (inside jit too).
    """
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return tokens[:, 1:], loss_mask[:, 1:] & same_doc


def kto_rows(examples: Sequence[Example], prompt_lens: Sequence[int], length: int) -> list[Row]:
    """One batch of KTO rows ``[2, length]``: side 0 an example itself (prompt + its completion), side 1
    its prompt followed by the completion of the batch's previous example (the last one's for the first),
    cut to ``length`` when it is longer.

    The side-1 sequences are the mismatched (prompt, completion) pairs whose policy/reference log-ratio
    estimates KTO's KL reference point; rotating the completions by one inside the batch (TRL's
    ``(x_1, y_n), (x_2, y_1), ...``) makes them the same completions as the batch's own, paired with other
    prompts. ``examples`` are already fitted to ``length``; ``prompt_lens[i]`` is where example ``i``'s
    completion starts. A batch of one pairs its example with itself.
    """
    rows = []
    for i, example in enumerate(examples):
        other, start = examples[i - 1], int(prompt_lens[i - 1])
        prompt = int(prompt_lens[i])
        mismatched = {
            "ids": np.concatenate([example["ids"][:prompt], other["ids"][start:]])[:length],
            "loss_mask": np.concatenate(
                [np.zeros(min(prompt, len(example["ids"])), np.bool_), other["loss_mask"][start:]]
            )[:length],
        }
        row = empty_rows(2, length)
        for side, ex in enumerate((example, mismatched)):
            _place({k: row[k][side] for k in ROW_KEYS}, ex, 0)
        row["num_truncated"] = np.int32(0)  # the caller counts its examples' truncation
        rows.append(row)
    return rows
