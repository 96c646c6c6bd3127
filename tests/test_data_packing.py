"""Packing and bucket padding: every token once and in order, segments, positions, masks, truncation."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.data.packing import (
    as_example,
    bucket_length,
    default_buckets,
    next_token_targets,
    pack_examples,
    pad_to_bucket,
)


def make_examples(lengths, seed=0):
    """Example i holds tokens 1000 * (i + 1) + [0, 1, ...], so every packed token names its example."""
    rng = np.random.default_rng(seed)
    return [
        {"ids": 1000 * (i + 1) + np.arange(n, dtype=np.int32), "loss_mask": rng.random(n) < 0.5}
        for i, n in enumerate(lengths)
    ]


def documents(rows):
    """(row, example index, tokens, loss_mask, positions) of every packed document, checking the row
    layout on the way: segments 1..n in order and contiguous, padding (segment 0) only at the end."""
    docs = []
    for r, seg in enumerate(rows["segment_ids"]):
        real = seg > 0
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any(), "padding inside a row"
        assert np.all(np.diff(seg[:n_real]) >= 0) and np.all(np.diff(seg[:n_real]) <= 1)
        assert seg[0] == 1 or n_real == 0
        pad = ~real
        assert not rows["loss_mask"][r][pad].any() and not rows["positions"][r][pad].any()
        assert not rows["tokens"][r][pad].any()
        for s in range(1, int(seg.max(initial=0)) + 1):
            at = seg == s
            tokens = rows["tokens"][r][at]
            docs.append(
                (r, int(tokens[0]) // 1000 - 1, tokens, rows["loss_mask"][r][at], rows["positions"][r][at])
            )
    return docs


def check_packing(rows, examples, seq_len, overlong="truncate"):
    kept = [i for i, e in enumerate(examples) if overlong == "truncate" or len(e["ids"]) <= seq_len]
    docs = documents(rows)
    assert sorted(d[1] for d in docs) == kept, "an example is missing or packed twice"
    for _, i, tokens, mask, positions in docs:
        n = min(len(examples[i]["ids"]), seq_len)
        np.testing.assert_array_equal(tokens, examples[i]["ids"][:n])
        np.testing.assert_array_equal(mask, examples[i]["loss_mask"][:n])
        np.testing.assert_array_equal(positions, np.arange(n))
    for r in range(len(rows["tokens"])):  # first-fit keeps each row's documents in input order
        in_row = [d[1] for d in docs if d[0] == r]
        assert in_row == sorted(in_row)
    n_long = sum(len(e["ids"]) > seq_len for e in examples)
    assert rows["num_truncated"].sum() == (n_long if overlong == "truncate" else 0)


def test_pack_small_case_exactly():
    rows = pack_examples(make_examples([3, 2, 4]), 6)
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(rows["tokens"][0], [1000, 1001, 1002, 2000, 2001, 0])
    assert rows["tokens"].dtype == np.int32 and rows["loss_mask"].dtype == np.bool_


def test_truncation_is_counted_and_drop_drops():
    examples = make_examples([3, 12, 5, 9])
    rows = pack_examples(examples, 8)
    check_packing(rows, examples, 8)
    assert rows["num_truncated"].sum() == 2
    dropped = pack_examples(examples, 8, overlong="drop")
    check_packing(dropped, examples, 8, overlong="drop")
    with pytest.raises(ValueError, match="overlong='cut'"):
        pack_examples(examples, 8, overlong="cut")


def test_num_bins_closes_the_group_like_grain():
    examples = make_examples([6, 6, 6, 2])
    unbounded = pack_examples(examples, 8)
    grouped = pack_examples(examples, 8, num_bins=2)  # the third example closes the first two rows
    assert [sorted({d[1] for d in documents(unbounded) if d[0] == r}) for r in range(3)] == [[0, 3], [1], [2]]
    assert [sorted({d[1] for d in documents(grouped) if d[0] == r}) for r in range(3)] == [[0], [1], [2, 3]]


@pytest.mark.parametrize("case", range(40))
def test_packing_invariants_on_random_lengths(case):
    rng = np.random.default_rng(case)
    seq_len = int(rng.integers(1, 64))
    lengths = rng.integers(1, 2 * seq_len + 1, size=int(rng.integers(0, 30)))
    examples = make_examples(lengths, seed=case)
    num_bins = None if case % 3 == 0 else int(rng.integers(1, 6))
    overlong = "drop" if case % 4 == 1 else "truncate"
    rows = pack_examples(examples, seq_len, num_bins=num_bins, overlong=overlong)
    assert rows["tokens"].shape[1:] == (seq_len,)
    check_packing(rows, examples, seq_len, overlong)


def test_pad_to_bucket_picks_the_smallest_bucket():
    buckets = (64, 128, 256)
    for n, want in [(1, 64), (64, 64), (65, 128), (256, 256), (300, 256)]:
        (example,) = make_examples([n])
        row = pad_to_bucket(example, buckets)
        assert row["tokens"].shape == row["segment_ids"].shape == (want,)
        kept = min(n, want)
        np.testing.assert_array_equal(row["tokens"][:kept], example["ids"][:kept])
        np.testing.assert_array_equal(row["loss_mask"][:kept], example["loss_mask"][:kept])
        assert not row["loss_mask"][kept:].any()
        np.testing.assert_array_equal(row["segment_ids"], np.arange(want) < kept)
        np.testing.assert_array_equal(row["positions"], np.where(np.arange(want) < kept, np.arange(want), 0))
        assert row["num_truncated"] == (n > 256)
    assert pad_to_bucket(make_examples([300])[0], buckets, overlong="drop") is None
    assert bucket_length(129, buckets) == 256


def test_default_buckets():
    assert default_buckets(300) == (64, 128, 256, 300)
    assert default_buckets(256) == (64, 128, 256)
    assert default_buckets(32) == (32,)


def test_next_token_targets_stop_at_document_boundaries():
    rows = pack_examples([{"ids": [5, 6, 7]}, {"ids": [8, 9]}], 6)  # no loss_mask: every token a target
    targets, weights = next_token_targets(rows["tokens"], rows["loss_mask"], rows["segment_ids"])
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0]])
    # 7 -> 8 crosses into the next document, 9 -> pad is padding: neither is trained on.
    np.testing.assert_array_equal(weights, [[True, True, False, True, False]])
    jt, jw = next_token_targets(*(jnp.asarray(rows[k]) for k in ("tokens", "loss_mask", "segment_ids")))
    np.testing.assert_array_equal(jw, weights)
    np.testing.assert_array_equal(jt, targets)


@dataclasses.dataclass
class Rendered:  # the renderer's output type, duck-typed
    ids: np.ndarray
    loss_mask: np.ndarray


def test_as_example_accepts_mappings_and_rendered_objects():
    example = as_example(Rendered(np.array([1, 2]), np.array([False, True])))
    assert example["ids"].dtype == np.int32 and example["loss_mask"].tolist() == [False, True]
    assert as_example({"ids": [3, 4, 5]})["loss_mask"].all()
    with pytest.raises(ValueError, match="1-D of one length"):
        as_example({"ids": [1, 2], "loss_mask": [True]})
    with pytest.raises(ValueError, match="needs 'ids'"):
        as_example({"tokens": [1]})
