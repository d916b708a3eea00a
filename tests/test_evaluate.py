"""Ranking metrics (golden values), unseen-item ranking, and the two baselines."""

import numpy as np
import pytest

from onerec_jax import evaluate as ev
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
