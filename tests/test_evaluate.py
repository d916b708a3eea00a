"""Ranking metrics (golden values), unseen-item ranking, and the two baselines."""

import numpy as np
import pytest

from onerec_jax import ranking as ev
from onerec_jax.data import sources
from onerec_jax.data.events import EventLog


def test_rank_metrics_golden_values():
    ranked = np.array([[3, 7, 5], [1, 2, 4], [9, 8, 6]])
    targets = np.array([[7, 0], [4, 2], [5, 0]])
    mask = np.array([[True, False], [True, True], [True, False]])
    m = ev.rank_metrics(ranked, targets, mask, ks=(1, 3))
    # Request 0: hit at rank 2 (1 target). Request 1: hits at ranks 2 and 3 (2 targets).
    # Request 2: no hit.
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@3"] == pytest.approx((1 + 1 + 0) / 3)
    d0 = (1 / np.log2(3)) / 1.0
    d1 = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert m["ndcg@3"] == pytest.approx((d0 + d1 + 0) / 3)


def test_rank_unseen_excludes_history_and_breaks_ties_by_id():
    scores = np.array([[9.0, 1.0, 5.0, 5.0, 7.0, 0.0]])
    raw = {"hist_offsets": np.array([0, 1]), "hist_item": np.array([4])}
    # Item 0 is padding and item 4 was seen; 2 and 3 tie and keep id order.
    np.testing.assert_array_equal(ev.rank_unseen(scores, raw, 3), [[2, 3, 1]])


def test_item_knn_recommends_co_consumed_items():
    # Users 1-3 consume 1 then 2 (then filler); user 4's history is item 1 -> expect item 2.
    users = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 3
    items = [1, 2, 5, 6] * 3 + [1, 3, 4]
    log = EventLog.from_columns("toy", np.array(users), np.array(items), np.arange(15) % 4)
    train = ev.training_matrix(log)
    knn = ev.ItemKNN(train, k=3)
    raw = {"hist_offsets": np.array([0, 1]), "hist_item": np.array([1])}
    assert ev.rank_unseen(knn.scores(raw), raw, 1)[0, 0] == 2
    # A request with no history after one with history keeps its own (all-zero) row.
    two = {"hist_offsets": np.array([0, 1, 1]), "hist_item": np.array([1])}
    scores = knn.scores(two)
    assert scores.shape[0] == 2 and not scores[1].any() and scores[0][2] > 0
    # The last two events of 4-event users are held out of the training matrix.
    assert train[1].toarray()[0].tolist() == [0, 1, 1, 0, 0, 0, 0]


def test_movielens_baselines_run_on_the_full_protocol():
    train = ev.training_matrix(sources.open_source("movielens-100k").log)
    test = sources.open_source("movielens-100k", split="test")
    pop = ev.evaluate_scorer(test, ev.Popularity(train))
    knn = ev.evaluate_scorer(test, ev.ItemKNN(train))
    assert pop["n_requests"] == knn["n_requests"] == 943
    for m in (pop, knn):
        assert 0 < m["recall@10"] <= m["recall@50"] <= 1
        assert 0 < m["ndcg@10"] <= m["recall@10"]


def test_a_repeated_target_counts_once_in_recall_and_idcg():
    # Request 0: targets 7, 7, 5 are two distinct items; hits at ranks 1 and 3.
    # Request 1: target 4 logged twice is one item; hit at rank 2.
    ranked = np.array([[7, 3, 5], [1, 4, 2]])
    targets = np.array([[7, 7, 5], [4, 4, 0]])
    mask = np.array([[True, True, True], [True, True, False]])
    m = ev.rank_metrics(ranked, targets, mask, ks=(1, 3))
    assert m["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@3"] == pytest.approx((2 / 2 + 1 / 1) / 2)
    d0_1 = 1.0 / 1.0  # hit at rank 1, ideal DCG@1 of 2 distinct targets is 1
    d0_3 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    d1_3 = (1 / np.log2(3)) / 1.0  # one distinct target: ideal DCG is 1, not 1 + 1/log2(3)
    assert m["ndcg@1"] == pytest.approx((d0_1 + 0) / 2)
    assert m["ndcg@3"] == pytest.approx((d0_3 + d1_3) / 2)


def _log_with_rewatches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rewatch.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [1] * 5 + [2] * 4,
                "item_id": [1, 2, 1, 3, 2, 4, 5, 6, 4],  # both users come back to an item
                "timestamp": [0, 10, 20, 30, 40, 0, 10, 20, 30],
            }
        ),
        path,
    )
    return path


def test_protocol_is_a_property_of_the_source(tmp_path):
    from onerec_jax.data import logs, movielens

    ml = ev.protocol_of(sources.open_source("movielens-100k", split="test"))
    assert ml["drop_seen"] is True and ml["seen_window"] == "full history"
    assert ml["dedup_targets"] is True
    # The same log read from a file gets the same protocol: it is decided by the data.
    path = tmp_path / "ml.parquet"
    logs.write(path, movielens.load())
    assert ev.protocol_of(sources.open_source(f"parquet:{path}", split="test")) == ml
    # A log where users come back to items keeps them rankable: no drop-seen.
    rewatch = ev.protocol_of(sources.open_source(f"parquet:{_log_with_rewatches(tmp_path)}"))
    assert rewatch["drop_seen"] is False and rewatch["seen_window"] == "none"
    world = ev.protocol_of(sources.open_source("world:tiny", split="test"))
    assert world["drop_seen"] is False and world["seen_window"] == "none"


def test_seen_set_is_the_whole_history_whatever_the_context_length():
    from onerec_jax.data import schema

    src = sources.open_source("movielens-100k", split="test")
    idx = np.arange(0, 943, 97)
    seen = ev.seen_items(src, idx)
    log = src.log
    for j, i in enumerate(idx):
        u, t0 = src.user[i], src.target_start[i]
        want = log.item[log.offsets[u] : t0]
        got = seen["hist_item"][seen["hist_offsets"][j] : seen["hist_offsets"][j + 1]]
        np.testing.assert_array_equal(np.sort(got), np.sort(want))
    # Two runs with different contexts see different windows but are scored on one seen set.
    small = schema.SchemaSpec(short_len=2, pos_len=2, life_len=4, max_targets=1)
    large = schema.SchemaSpec(short_len=20, pos_len=32, life_len=64, max_targets=1)
    win = [src.raw_batch(idx, s.history_window, s)["hist_offsets"] for s in (small, large)]
    assert not np.array_equal(win[0], win[1])
    assert np.diff(seen["hist_offsets"]).sum() > np.diff(win[1]).sum()


def test_world_protocol_ranks_seen_items_too():
    src = sources.open_source("world:tiny", split="test")
    idx = np.arange(16)
    seen = ev.seen_items(src, idx)
    assert len(seen["hist_offsets"]) == 17 and len(seen["hist_item"]) == 0
    raw = src.raw_batch(idx, 64)
    h = raw["hist_item"][raw["hist_offsets"][0] : raw["hist_offsets"][1]]
    scores = np.zeros((16, src.n_items + 1))
    scores[0, h[0]] = 1.0  # the best item of request 0 is one it has seen
    assert ev.rank_unseen(scores, seen, 1)[0, 0] == h[0]
