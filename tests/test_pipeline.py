import contextlib
import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec_jax.data import pipeline, schema, sources
from onerec_jax.data.events import EventLog, LogSource

SPEC = schema.SchemaSpec(short_len=6, pos_len=8, life_len=16)


def _take(ds, n, state=None):
    with contextlib.closing(iter(ds)) as it:
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(n)]


def _ds(source, shard_index=0, shard_count=1, **kw):
    cfg = pipeline.PipelineConfig(**{"batch_size": 8, **kw})
    return pipeline.make_dataset(
        source, SPEC, cfg, shard_index=shard_index, shard_count=shard_count
    )


def _equal(a, b):
    return all(np.array_equal(a[k], b[k], equal_nan=True) for k in a) and a.keys() == b.keys()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(0, 40), st.booleans()),
        min_size=1,
        max_size=60,
    )
)
def test_no_leakage(events):
    # Every history event of every example precedes its target in the (timestamp, item id) order.
    u, i, t, like = (np.array(c) for c in zip(*events, strict=True))
    log = EventLog.from_columns("h", user=u, item=i, ts=t, flags=like.astype(np.uint8))
    for split in ("train", "validation", "test"):
        src = LogSource(log, split, session_gap_s=10, min_history=0)
        if len(src) == 0:
            continue
        raw = src.raw_batch(np.arange(len(src)))
        ho, to = raw["hist_offsets"], raw["target_offsets"]
        for b in range(len(src)):
            hist = list(
                zip(
                    raw["hist_ts"][ho[b] : ho[b + 1]],
                    raw["hist_item"][ho[b] : ho[b + 1]],
                    strict=True,
                )
            )
            first_target = (raw["request_ts"][b], raw["target_item"][to[b]])
            assert all(h < first_target for h in hist)
            assert hist == sorted(hist)
            assert to[b + 1] > to[b]


def test_batches_have_the_declared_shapes():
    b = _take(_ds(sources.open_source("world:tiny")), 1)[0]
    for k, (shape, dt) in pipeline.batch_shapes(SPEC, 8).items():
        assert b[k].shape == shape and b[k].dtype == dt, k


def test_iterator_state_restores_the_next_batch():
    src = sources.open_source("movielens-100k", split="validation")
    ds = _ds(src, num_epochs=None, seed=3)
    with contextlib.closing(iter(ds)) as it:
        for _ in range(150):  # past the end of the first epoch (943 // 8 = 117 batches)
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        expected = [next(it) for _ in range(3)]
    restored = _take(ds, 3, state)
    assert all(_equal(a, b) for a, b in zip(expected, restored, strict=True))


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    src = sources.open_source("movielens-100k", split="test")
    key = lambda bs: [tuple(b["user_id"]) for b in bs]
    a, b = key(_take(_ds(src, seed=1), 4)), key(_take(_ds(src, seed=1), 4))
    assert a == b and a != key(_take(_ds(src, seed=2), 4))
    epochs = _take(_ds(src, seed=1, batch_size=943, num_epochs=2), 2)
    assert sorted(epochs[0]["user_id"]) == sorted(epochs[1]["user_id"]) == list(range(1, 944))
    assert list(epochs[0]["user_id"]) != list(epochs[1]["user_id"])


def test_process_shards_are_disjoint_equal_and_cover_the_epoch():
    src = sources.open_source("movielens-100k", split="test")
    seen = []
    for shard in range(3):
        ds = _ds(
            src, num_epochs=1, batch_size=1, drop_remainder=False, shard_index=shard, shard_count=3
        )
        with contextlib.closing(iter(ds)) as it:
            seen.append([int(b["user_id"][0]) for b in it])
    # 943 = 3 * 314 + 1: each epoch drops the remainder so that shards stay equal.
    assert [len(s) for s in seen] == [314, 314, 314]
    users = [u for shard in seen for u in shard]
    assert len(set(users)) == 942 and set(users) <= set(range(1, 944))


def test_the_shards_of_a_batch_are_the_rows_of_one_process_batch_in_order():
    # A multi-host run must train on the single-host batches, row for row.
    src = sources.open_source("world:tiny")
    whole = _take(_ds(src, batch_size=6), 2)
    parts = [_take(_ds(src, batch_size=3, shard_index=i, shard_count=2), 2) for i in range(2)]
    for step in range(2):
        joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in whole[step]}
        assert _equal(whole[step], joined)


def test_workers_give_the_same_batches_and_state():
    src = sources.open_source("world:tiny")
    serial = _take(_ds(src), 6)
    ds = _ds(src, workers=2)
    with contextlib.closing(iter(ds)) as it:
        parallel = [next(it) for _ in range(3)]
        state = it.get_state()
    assert all(_equal(a, b) for a, b in zip(serial[:3], parallel, strict=True))
    resumed = _take(ds, 3, state)
    assert all(_equal(a, b) for a, b in zip(serial[3:], resumed, strict=True))


def test_iterator_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    # The way training will save it: model state and data iterator in one CheckpointManager step.
    import grain
    import orbax.checkpoint as ocp

    ds = _ds(sources.open_source("movielens-100k", split="test"), seed=5)
    with contextlib.closing(iter(ds)) as it:
        for _ in range(5):
            next(it)
        mngr = ocp.CheckpointManager(tmp_path, item_names=("params", "data"))
        save = ocp.args.Composite(
            params=ocp.args.StandardSave({"w": np.arange(3.0)}),
            data=grain.checkpoint.CheckpointSave(it),
        )
        mngr.save(5, args=save)
        mngr.wait_until_finished()
        want = next(it)
    with contextlib.closing(iter(ds)) as fresh:
        restore = ocp.args.Composite(
            params=ocp.args.StandardRestore({"w": np.zeros(3)}),
            data=grain.checkpoint.CheckpointRestore(fresh),
        )
        restored = ocp.CheckpointManager(tmp_path, item_names=("params", "data")).restore(
            5, args=restore
        )
        got = next(fresh)
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))
    assert _equal(want, got)


def test_default_shard_is_this_jax_process():
    import jax

    src = sources.open_source("movielens-100k", split="test")
    cfg = pipeline.PipelineConfig(batch_size=4, seed=1)
    implicit = _take(pipeline.make_dataset(src, SPEC, cfg), 2)
    explicit = _take(
        _ds(
            src,
            batch_size=4,
            seed=1,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        ),
        2,
    )
    assert all(_equal(a, b) for a, b in zip(implicit, explicit, strict=True))


def test_shards_get_equal_batch_counts_and_both_arguments():
    import pytest

    src = sources.open_source("movielens-100k", split="test")  # 943 = 3 * 314 + 1 examples
    counts = []
    for shard in range(3):
        ds = _ds(src, num_epochs=1, batch_size=157, shard_index=shard, shard_count=3)
        with contextlib.closing(iter(ds)) as it:
            counts.append(sum(1 for _ in it))
    assert counts == [2, 2, 2]
    cfg = pipeline.PipelineConfig(batch_size=4)
    with pytest.raises(ValueError, match="both shard_index and shard_count"):
        pipeline.make_dataset(src, SPEC, cfg, shard_index=1)


def test_sparse_positives_still_fill_the_positive_pathway():
    # One user, 6000 events, a like every 20th: the 2000-event window holds only 100 positives.
    n = 6000
    like = (np.arange(n) % 20 == 0).astype(np.uint8)
    log = EventLog.from_columns(
        "sparse",
        user=np.ones(n, int),
        item=np.arange(n) % 50 + 1,
        ts=np.arange(n) * 100,
        flags=like,
    )
    src = LogSource(log, "test")
    spec = schema.SchemaSpec()
    ex = pipeline.BuildBatch(src, spec).map(np.array([0]))
    assert ex["pos_mask"].sum() == 256
    assert ex["life_mask"].sum() == 2000 and ex["short_mask"].sum() == 20
    # The window without the reach-back: what a fixed 2000-event window would give.
    narrow = schema.build_batch(src.raw_batch(np.array([0]), spec.history_window), spec)
    assert narrow["pos_mask"].sum() == 100
    full = schema.build_batch(src.raw_batch(np.array([0])), spec)
    for k in ex:
        np.testing.assert_array_equal(ex[k], full[k], err_msg=k)
