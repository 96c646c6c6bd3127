"""Grain pipelines: packing and bucketing contracts, determinism, exact resume, epochs, process shards,
worker processes, Orbax saving of the iterator, and device placement (1 device, and 8 in a subprocess)."""

from __future__ import annotations

import collections
import json
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_llm.data.pipeline import make_pipeline, to_device
from jaxrl_llm.data.records import DataError
from jaxrl_llm.parallel import make_mesh
from jaxrl_llm.render import RenderError
from tests.simulated_devices import run_on_cpu_devices

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("tokens", "loss_mask", "segment_ids", "positions", "num_truncated")


class CharEncoder:
    """Stand-in for the renderer: a record ``{"id": i, "text": s}`` becomes the token 10000 * (i + 1)
    followed by the character codes of ``s``, with every other token a target. A module-level class, so
    Grain's spawned workers can unpickle it."""

    def __call__(self, record):
        ids = np.array([10000 * (record["id"] + 1), *map(ord, record["text"])], np.int32)
        return {"ids": ids, "loss_mask": np.arange(len(ids)) % 2 == 1}


def make_records(n=40, seed=0, max_len=30):
    rng = np.random.default_rng(seed)
    return [
        {"id": i, "text": "".join(rng.choice(list("abcdef"), int(rng.integers(0, max_len))))}
        for i in range(n)
    ]


def pipeline(records, **kw):
    kw = {"batch_size": 4, "seq_len": 32, "seed": 0, **kw}
    return make_pipeline(records, CharEncoder(), **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def doc_ids(batches):
    """Record ids of every document, in emission order (a document starts with its id token)."""
    out = []
    for b in batches:
        starts = (b["positions"] == 0) & (b["segment_ids"] > 0)
        out.extend(int(t) // 10000 - 1 for t in b["tokens"][starts])
    return out


def check_batch(batch, records, local_batch):
    """Each document is its record's encoding (truncated to the row), positions restart per document."""
    assert set(batch) == set(KEYS)
    assert batch["num_truncated"].shape == (local_batch,)
    enc = CharEncoder()
    for r in range(local_batch):
        seg = batch["segment_ids"][r]
        for s in range(1, int(seg.max(initial=0)) + 1):
            tokens = batch["tokens"][r][seg == s]
            want = enc(records[int(tokens[0]) // 10000 - 1])
            n = len(tokens)
            np.testing.assert_array_equal(tokens, want["ids"][:n])
            np.testing.assert_array_equal(batch["loss_mask"][r][seg == s], want["loss_mask"][:n])
            np.testing.assert_array_equal(batch["positions"][r][seg == s], np.arange(n))
        assert not batch["loss_mask"][r][seg == 0].any()


@pytest.mark.parametrize("mode", ["pack", "bucket"])
def test_batches_follow_the_row_contract(mode):
    records = make_records(seed=1)
    batches = list(pipeline(records, mode=mode, buckets=(8, 16, 32) if mode == "bucket" else None))
    for b in batches:
        assert b["tokens"].shape[0] == 4 and b["tokens"].shape[1] in (
            (32,) if mode == "pack" else (8, 16, 32)
        )
        assert all(b[k].shape == b["tokens"].shape for k in KEYS[:4])
        check_batch(b, records, 4)
    assert sorted(doc_ids(batches)) == list(range(len(records)))  # one epoch: every record exactly once
    if mode == "bucket":
        assert max(b["segment_ids"].max() for b in batches) == 1  # one document per row


def test_overlong_examples_are_truncated_and_counted_or_dropped():
    records = make_records(n=30, seed=2, max_len=60)
    n_long = sum(len(r["text"]) + 1 > 32 for r in records)
    assert n_long > 0
    for mode in ("pack", "bucket"):
        batches = list(pipeline(records, mode=mode))
        assert sum(int(b["num_truncated"].sum()) for b in batches) == n_long
        assert sorted(doc_ids(batches)) == list(range(len(records)))
        dropped = list(pipeline(records, mode=mode, overlong="drop"))
        assert sorted(doc_ids(dropped)) == [r["id"] for r in records if len(r["text"]) + 1 <= 32]
        assert sum(int(b["num_truncated"].sum()) for b in dropped) == 0


@pytest.mark.parametrize("mode", ["pack", "bucket"])
def test_same_seed_same_batches_other_seed_other_order(mode):
    records = make_records()
    first = list(pipeline(records, mode=mode, seed=3))
    assert_same(first, list(pipeline(records, mode=mode, seed=3)))
    assert doc_ids(first) != doc_ids(list(pipeline(records, mode=mode, seed=4)))
    assert doc_ids(list(pipeline(records, mode="bucket", shuffle=False, batch_size=1))) == list(range(40))


@pytest.mark.parametrize(
    "mode, kw",
    [
        ("pack", {}),
        ("pack", {"num_packing_bins": 12}),  # 3 batches per packing group: resume inside a group
        ("bucket", {"buckets": (8, 16, 32)}),
    ],
)
def test_restored_iterator_continues_with_exactly_the_next_batch(mode, kw):
    records = make_records(n=60)
    for k in (0, 1, 4):
        it = iter(pipeline(records, mode=mode, num_epochs=2, **kw))
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
        if k and kw.get("num_packing_bins"):
            assert state["next_row"] > 0, "meant to resume in a partly emitted packing group"
        if k and mode == "bucket":
            assert state["keep"], "meant to resume with examples waiting in bucket buffers"
        expected = list(it)
        restored = iter(pipeline(records, mode=mode, num_epochs=2, **kw))
        restored.set_state(state)
        assert_same(list(restored), expected)


def test_epochs_repeat_every_record_and_reshuffle():
    records = make_records(n=20)
    ids = doc_ids(list(pipeline(records, mode="bucket", num_epochs=3, batch_size=1)))
    assert collections.Counter(ids) == {i: 3 for i in range(20)}
    assert ids[:20] != ids[20:40] != ids[40:]
    forever = iter(pipeline(records, num_epochs=None))
    assert len(doc_ids(take(forever, 40))) > 3 * len(records)


def test_processes_get_disjoint_equal_shards_covering_the_data():
    records = make_records(n=41)  # one record too many for 2 processes: dropped, so both run equal steps
    shards = [
        take(iter(pipeline(records, process_index=i, process_count=2, batch_size=4, num_epochs=None)), 40)
        for i in (0, 1)
    ]
    assert all(b["tokens"].shape == (2, 32) for s in shards for b in s)  # 4 global rows = 2 per process
    ids = [set(doc_ids(s)) for s in shards]
    assert not ids[0] & ids[1]
    assert len(ids[0]) == len(ids[1]) == 20 and len(ids[0] | ids[1]) == 40
    with pytest.raises(DataError, match="batch_size=3 is not divisible by the 2 processes"):
        pipeline(records, process_index=0, process_count=2, batch_size=3, num_epochs=None)


def test_several_processes_refuse_bucketing_and_finite_epochs():
    """Bucketing lets processes pick different row lengths on one step, finite epochs different step
    counts: both would break multi-host training, so both are refused with what to use instead."""
    records = make_records(n=40)
    shard = {"process_index": 0, "process_count": 2}
    with pytest.raises(DataError, match='mode="bucket" cannot be used by 2 processes.*process_split="rows"'):
        pipeline(records, mode="bucket", num_epochs=None, **shard)
    for epochs in (1, 3):
        with pytest.raises(DataError, match=f"num_epochs={epochs} cannot be used by 2 processes.*None"):
            pipeline(records, num_epochs=epochs, **shard)
    with pytest.raises(DataError, match="process_split='shards'"):
        pipeline(records, process_split="shards")
    pipeline(records, num_epochs=None, **shard)  # the multi-host form
    pipeline(records, mode="bucket", process_index=0, process_count=1)  # one process: all modes


@pytest.mark.parametrize("mode", ["pack", "bucket"])
def test_rows_split_gives_every_process_its_rows_of_the_one_process_batches(mode):
    """process_split="rows": whatever the process count, the global batches (the processes' rows in
    process order) are the one-process batches, in every mode and with a finite number of epochs."""
    records = make_records(n=41)
    kw = {"mode": mode, "batch_size": 4, "num_epochs": 2, "process_split": "rows"}
    whole = list(pipeline(records, process_index=0, process_count=1, **kw))
    parts = [list(pipeline(records, process_index=i, process_count=2, **kw)) for i in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for one, first, second in zip(whole, *parts, strict=True):
        assert first["tokens"].shape[0] == second["tokens"].shape[0] == 2
        for key, value in one.items():
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), value)


def test_bad_arguments_are_clear_errors():
    records = make_records(n=4)
    with pytest.raises(DataError, match="mode='packed'"):
        pipeline(records, mode="packed")
    with pytest.raises(DataError, match=r"every bucket must be <= 32 \(seq_len=32\)"):
        pipeline(records, mode="bucket", buckets=(16, 64))
    with pytest.raises(DataError, match="encode returned no tokens"):
        next(iter(make_pipeline(records, lambda r: {"ids": []}, batch_size=2, seq_len=8)))
    with pytest.raises(DataError, match="overlong='cut'"):
        pipeline(records, overlong="cut")
    with pytest.raises(DataError, match="ids and loss_mask must be 1-D"):
        next(
            iter(make_pipeline(records, lambda r: {"ids": [1, 2], "loss_mask": [1]}, batch_size=2, seq_len=8))
        )


def _raise_render_error(record):
    raise RenderError("messages[1]: the template cannot render this")


def test_an_encoders_user_error_keeps_its_message():
    records = make_records(n=4)
    with pytest.raises(RenderError) as info:
        next(iter(make_pipeline(records, _raise_render_error, batch_size=2, seq_len=8)))
    assert str(info.value) == "messages[1]: the template cannot render this"


def test_wrong_argument_types_are_clear_errors():
    records = make_records(n=4)

    class Loaded:  # what load_dataset returns: the records are an attribute
        def __init__(self):
            self.records = records

    with pytest.raises(DataError, match=r"got a Loaded; pass its records: make_pipeline\(loaded.records"):
        pipeline(Loaded())
    with pytest.raises(DataError, match="records: expected a sequence of records, got a dict"):
        pipeline(records[0])
    with pytest.raises(DataError, match="encode: expected a callable"):
        make_pipeline(records, "sft", batch_size=2, seq_len=8)
    for kw, name in (({"batch_size": 0}, "batch_size=0"), ({"seq_len": 2.5}, "seq_len=2.5")):
        with pytest.raises(DataError, match=f"{name}: expected a positive integer"):
            pipeline(records, **kw)
    with pytest.raises(DataError, match="batch_size='4'"):
        pipeline(records, batch_size="4")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pack", "bucket"])
def test_worker_processes_give_the_same_batches_and_resume(mode):
    records = make_records(n=24)
    expected = list(pipeline(records, mode=mode, num_epochs=2))
    it = iter(pipeline(records, mode=mode, num_epochs=2, worker_count=2))
    head = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert_same(head + list(it), expected)
    restored = iter(pipeline(records, mode=mode, num_epochs=2, worker_count=2))
    restored.set_state(state)
    assert_same(list(restored), expected[3:])
    it.close()
    restored.close()


def test_iterator_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    records = make_records()
    it = iter(pipeline(records, num_epochs=None))
    take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 3)
    restored = iter(pipeline(records, num_epochs=None))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same(take(restored, 3), expected)


def test_to_device_places_the_batch_on_a_one_device_mesh():
    batch = next(iter(pipeline(make_records())))
    mesh = make_mesh(devices=jax.devices()[:1])
    arrays = to_device(batch, mesh)
    assert arrays["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert arrays["num_truncated"].sharding.spec == P(("data", "fsdp"))
    for k in KEYS:
        assert isinstance(arrays[k], jax.Array) and arrays[k].dtype == batch[k].dtype
        np.testing.assert_array_equal(np.asarray(arrays[k]), batch[k])


EIGHT_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from jaxrl_llm.data.pipeline import make_pipeline, to_device
    from jaxrl_llm.parallel import make_mesh
    from tests.test_data_pipeline import CharEncoder, make_records

    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    batch = next(iter(make_pipeline(make_records(), CharEncoder(), batch_size=8, seq_len=32, seed=0)))
    arrays = to_device(batch, mesh)
    tokens = arrays["tokens"]
    assert tokens.sharding.spec == P(("data", "fsdp"), None), tokens.sharding.spec
    rows = {d: s.index[0] for s in tokens.addressable_shards for d in [s.device]}
    assert all(s.data.shape == (2, 32) for s in tokens.addressable_shards)  # 8 rows over 4 data shards
    assert len({(r.start, r.stop) for r in rows.values()}) == 4  # tensor replicates, data x fsdp split
    for k, v in batch.items():
        np.testing.assert_array_equal(np.asarray(arrays[k]), v)
    print("8-device to_device checks passed")
    """
)


def test_to_device_shards_rows_over_data_and_fsdp_on_8_devices():
    run_on_cpu_devices(["-c", EIGHT_DEVICES], 8, "8-device to_device checks passed", timeout=300)


def _pair_encode(record):
    """A picklable stand-in for PairEncoder: prompt tokens then the answer, the answer the target."""
    prompt = [1] * record["p"]
    return {
        "prompt_len": record["p"],
        **{
            side: {
                "ids": prompt + [2 + i for i in range(record[side])],
                "loss_mask": [0] * record["p"] + [1] * record[side],
            }
            for side in ("chosen", "rejected")
        },
    }


def test_pairs_mode_keeps_each_pair_in_one_row_and_resumes_exactly():
    rs = np.random.RandomState(0)
    records = [
        {"p": int(rs.randint(1, 20)), "chosen": int(rs.randint(1, 40)), "rejected": int(rs.randint(1, 100))}
        for _ in range(37)
    ]
    kwargs = dict(batch_size=4, seq_len=128, mode="pairs", buckets=(32, 64, 128, 256), seed=3, num_epochs=1)
    batches = list(make_pipeline(records, _pair_encode, **kwargs))
    seen = 0
    for batch in batches:
        b, t = batch["tokens"].shape
        assert b == 4 and t in (32, 64, 128, 256)
        # what the pair stages compile for (train.pairs.pair_spec): prompt_len only lays the rows out
        assert set(batch) == {"tokens", "loss_mask", "segment_ids", "positions", "shared", "num_truncated"}
        for row in range(b):
            if not batch["loss_mask"][row].any():
                continue  # filler
            seen += 1
            seg = batch["segment_ids"][row]
            record = next(
                r
                for r in records
                if (r["p"], r["chosen"], r["rejected"]) == tuple((seg == s).sum() for s in (1, 2, 3))
            )
            length = (seg > 0).sum()  # prompt once, then both answers
            assert length == record["p"] + record["chosen"] + record["rejected"]
            assert (batch["shared"][row] == (seg == 1)).all()
            assert length <= t and (t == 32 or length > t // 2)  # the row's bucket
    assert seen == len(records)
    # Resume mid-stream: the rest of the batches are the same.
    it = iter(make_pipeline(records, _pair_encode, **kwargs))
    for _ in range(3):
        next(it)
    state = it.get_state()
    again = iter(make_pipeline(records, _pair_encode, **kwargs))
    again.set_state(state)
    for want, got in zip(batches[3:], again, strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
