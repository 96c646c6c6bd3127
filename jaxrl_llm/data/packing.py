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


PAIR_KEYS = (*ROW_KEYS, "shared")


def shared_prompt_row(prompt: np.ndarray, answers: Sequence[Example], length: int) -> Row:
    """``prompt | answer 1 | answer 2`` as one row of ``length`` (a preference pair, or a KTO example and its
    mismatched completion): the prompt is read once and both answers attend to it.

    ``segment_ids`` are 1 on the prompt and 2, 3 on the answers; ``shared`` (bool) marks the prompt, which
    every later segment sees (``models.attention.make_mask``); ``positions`` restart after the prompt for
    each answer, so each answer sits exactly where it would after the prompt alone; ``loss_mask`` is the
    answers' own. Predicting an answer's first token reads the prompt's last position (see
    ``pair_targets``). The caller makes sure ``len(prompt) + answers`` fits ``length``.
    """
    row = {k: np.zeros(length, ROW_DTYPES[k]) for k in ROW_KEYS}
    p = len(prompt)
    row["tokens"][:p] = prompt
    row["segment_ids"][:p] = 1
    row["positions"][:p] = np.arange(p, dtype=np.int32)
    start = p
    for i, answer in enumerate(answers):
        n = len(answer["ids"])
        row["tokens"][start : start + n] = answer["ids"]
        row["loss_mask"][start : start + n] = answer["loss_mask"]
        row["segment_ids"][start : start + n] = 2 + i
        row["positions"][start : start + n] = np.arange(p, p + n, dtype=np.int32)
        start += n
    row["shared"] = row["segment_ids"] == 1
    return row


def _split(example: Example, prompt_len: int, max_side: int) -> tuple[np.ndarray, Example, bool]:
    """``(prompt ids, answer, truncated)`` of ``prompt + answer`` cut to ``max_side`` tokens."""
    fitted, truncated = fit_length(example, max_side, "truncate")
    p = min(prompt_len, len(fitted["ids"]))
    return fitted["ids"][:p], {k: v[p:] for k, v in fitted.items()}, truncated


def pad_pair(
    chosen: Example,
    rejected: Example,
    buckets: Sequence[int],
    *,
    prompt_len: int,
    max_side: int | None = None,
    overlong: str = "truncate",
) -> Row | None:
    """A preference pair as one ``prompt | chosen | rejected`` row (``shared_prompt_row``) padded to the
    smallest bucket that holds it; None when it is dropped.

    ``chosen`` and ``rejected`` are whole sequences (prompt + answer) that start with the same
    ``prompt_len`` tokens. Each side longer than ``max_side`` (default: the largest bucket) is cut to it
    (``num_truncated`` counts the sides cut) or, with ``overlong="drop"``, drops the pair.
    """
    check_overlong(overlong)
    max_side = max_side or buckets[-1]
    sides = [as_example(chosen), as_example(rejected)]
    if overlong == "drop" and any(len(side["ids"]) > max_side for side in sides):
        return None
    if not np.array_equal(sides[0]["ids"][:prompt_len], sides[1]["ids"][:prompt_len]):
        raise ValueError("the chosen and rejected sequences must start with the same prompt_len tokens")
    (prompt, a, ta), (_, b, tb) = (_split(side, prompt_len, max_side) for side in sides)
    total = len(prompt) + len(a["ids"]) + len(b["ids"])
    if total > buckets[-1]:
        raise ValueError(f"a pair of {total} tokens does not fit the largest bucket {buckets[-1]}")
    row = shared_prompt_row(prompt, [a, b], bucket_length(total, buckets))
    row["num_truncated"] = np.int32(ta + tb)
    return row


def kto_rows(
    examples: Sequence[Example], prompt_lens: Sequence[int], buckets: Sequence[int], max_side: int
) -> list[Row]:
    """One batch of KTO rows ``prompt_i | completion_i | completion_{i-1}``, all of one bucket length.

    Each example (prompt + its completion, already fitted to ``max_side``) is followed by the completion of
    the batch's previous example (the last one's for the first), cut so that prompt + it fits ``max_side``:
    the mismatched (prompt, completion) pairs whose policy/reference log-ratio estimates KTO's KL reference
    point. Rotating the completions by one inside the batch (TRL's ``(x_1, y_n), (x_2, y_1), ...``) makes
    them the same completions as the batch's own, paired with other prompts. A batch of one pairs its
    example with itself.
    """
    parts = []
    for i, example in enumerate(examples):
        p = min(int(prompt_lens[i]), len(example["ids"]))
        other, start = examples[i - 1], int(prompt_lens[i - 1])
        own = {k: v[p:] for k, v in example.items() if k in ("ids", "loss_mask")}
        room = max(max_side - p, 0)
        mismatched = {k: other[k][start:][:room] for k in ("ids", "loss_mask")}
        parts.append((example["ids"][:p], own, mismatched))
    total = max(len(pr) + len(a["ids"]) + len(b["ids"]) for pr, a, b in parts)
    length = bucket_length(total, buckets)
    rows = []
    for prompt, own, mismatched in parts:
        row = shared_prompt_row(prompt, [own, mismatched], length)
        row["num_truncated"] = np.int32(0)  # the caller counts its examples' truncation
        rows.append(row)
    return rows


def pair_buckets(seq_len: int) -> tuple[int, ...]:
    """Row lengths of pair batches: a side (prompt + answer) holds at most ``seq_len`` tokens, so a
    ``prompt | chosen | rejected`` row at most ``2 * seq_len``."""
    return default_buckets(2 * seq_len)


def next_token_targets(tokens: Any, loss_mask: Any, segment_ids: Any) -> tuple[Any, Any]:
    """``(targets, weights)``, both [B, T-1], for ``logits[:, :-1]`` of a [B, T] row batch.

    ``weights[b, t]`` is True when token ``t + 1`` is a target and belongs to the same document as token
    ``t``. Only slicing and operators are used, so numpy and jax arrays both work (inside jit too).
    """
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return tokens[:, 1:], loss_mask[:, 1:] & same_doc
