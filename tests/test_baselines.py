"""The sequential baselines: what they are fitted on, their scores by hand, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onerec_jax import cli, ranking
from onerec_jax.baselines import data as bdata
from onerec_jax.baselines import knn, mf, sasrec, tune
from onerec_jax.data import logs, movielens
from onerec_jax.data.events import EventLog, LogSource


def _log(seqs: list[list[int]]) -> EventLog:
    """One user per sequence, events one minute apart in the listed order."""
    user = np.concatenate([[u] * len(s) for u, s in enumerate(seqs)])
    item = np.concatenate([np.asarray(s) for s in seqs])
    ts = np.concatenate([60 * np.arange(len(s)) for s in seqs])
    return EventLog.from_columns("t", user=user, item=item, ts=ts)


def test_training_data_holds_no_validation_or_test_target():
    log = _log([[1, 2, 3, 4, 5], [2, 3], [5, 4, 3, 2, 1, 6]])
    d = bdata.training_data(LogSource(log, "train"))
    # Users with >= 3 events lose their last two; the two-event user keeps both.
    assert [d.sequence(u).tolist() for u in (1, 2, 3)] == [[1, 2, 3], [2, 3], [5, 4, 3, 2]]
    for split in ("validation", "test"):
        src = LogSource(log, split)
        for u, t0 in zip(src.user, src.target_start, strict=True):
            assert t0 >= log.offsets[u] + len(d.sequence(u))
    assert d.matrix.sum() == len(d.item)


def test_training_data_refuses_the_world():
    from onerec_jax.data.world import World

    with pytest.raises(ValueError, match="logged sources"):
        bdata.training_data(World("tiny", seed=0, split="validation"))


def test_seq_knn_scores_by_hand():
    d = bdata.training_data(
        LogSource(_log([[1, 2, 3, 8, 8], [1, 2, 4, 8, 8], [3, 1, 4, 9, 9]]), "train")
    )
    # Training sequences: [1, 2, 3], [1, 2, 4], [3, 1, 4]; transitions within 2 steps, the
    # second step weighted 0.5: 1->2 x2, 2->3, 2->4, 3->1, 1->4; 1->3, 1->4, 3->4 at 0.5 each.
    t = knn.transitions(d, window=2, gap_decay=0.5).toarray()
    want = np.zeros_like(t)
    for a, b, w in [(1, 2, 2), (2, 3, 1), (2, 4, 1), (3, 1, 1), (1, 4, 1.5), (1, 3, 0.5)]:
        want[a, b] += w
    want[3, 4] += 0.5
    np.testing.assert_allclose(t, want)
    sc = knn.SeqKNN(d, last=2, window=2, gap_decay=0.5, recency=0.5, norm=0.0)
    raw = {"hist_offsets": np.array([0, 2, 3]), "hist_item": np.array([3, 1, 2])}
    s = sc.scores(raw)  # request 0: newest 1 (weight 1), then 3 (weight 0.5); request 1: 2
    np.testing.assert_allclose(s[0], want[1] + 0.5 * want[3])
    np.testing.assert_allclose(s[1], want[2])
    rows = knn.SeqKNN(d, last=1, window=2, gap_decay=0.5, norm=1.0).t
    np.testing.assert_allclose(rows[1:4].sum(1), 1.0)  # norm 1: transition probabilities


def test_ease_equals_per_column_ridge():
    rng = np.random.default_rng(0)
    seqs = [[*rng.choice(np.arange(1, 9), size=4, replace=False), 9, 9] for _ in range(30)]
    d = bdata.training_data(LogSource(_log(seqs), "train"))
    lam = 3.0
    b = mf.EASE(d, lam=lam).b
    x = (d.matrix > 0).toarray().astype(np.float64)
    for j in range(1, 9):  # EASE's column j is the ridge regression of item j on the others
        others = [k for k in range(x.shape[1]) if k != j]
        xo = x[:, others]
        coef = np.linalg.solve(xo.T @ xo + lam * np.eye(len(others)), xo.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], coef, atol=1e-8)
        assert b[j, j] == 0.0


def test_bpr_negatives_avoid_training_items_and_fit_learns():
    rng = np.random.default_rng(0)
    # Two tastes: odd users take items 1-5, even users items 6-10 (each a random subset).
    seqs = [list(rng.permutation(np.arange(1, 6) + 5 * (u % 2))) for u in range(40)]
    d = bdata.training_data(LogSource(_log(seqs), "train"))
    users = np.repeat(np.arange(1, d.n_users + 1), 50)
    j = mf._negatives(np.random.default_rng(1), d.matrix, users)
    assert not np.asarray(d.matrix[users, j]).ravel().any()
    sc = mf.fit_bpr(
        d, {"dim": 8, "epochs": 30, "eval_every": 30, "learning_rate": 0.05}, 0, None, batch=32
    )
    s = sc.scores({"user_id": np.arange(1, d.n_users + 1)})
    own = np.where((np.arange(d.n_users) % 2 == 0)[:, None], s[:, 1:6], s[:, 6:11])
    other = np.where((np.arange(d.n_users) % 2 == 0)[:, None], s[:, 6:11], s[:, 1:6])
    assert (own.mean(1) > other.mean(1)).mean() > 0.9


def test_sasrec_windows_and_batches_make_every_event_one_target():
    d = bdata.training_data(
        LogSource(_log([list(range(1, 13)), [3, 4, 5, 6, 1, 2], [7, 8]]), "train")
    )
    wins = sasrec.windows(d, maxlen=4)
    tgts = sorted(int(t) for w in wins for t in w[1:])
    want = sorted(int(t) for u in (1, 2, 3) for t in d.sequence(u)[1:])
    assert tgts == want
    for inp, tgt in sasrec.batches(wins, 2, 4, np.random.default_rng(0)):
        assert inp.shape[1] <= 4
        # Inputs and targets are one window shifted by one step.
        np.testing.assert_array_equal(inp[:, 1:][tgt[:, :-1] > 0], tgt[:, :-1][tgt[:, :-1] > 0])


def test_sasrec_is_causal_and_learns_a_cycle():
    import jax
    import jax.numpy as jnp

    model = sasrec.SASRec(n_items=6, maxlen=8, d_model=16, n_blocks=2, n_heads=2, dropout=0.0)
    x = jnp.array([[0, 0, 1, 2, 3, 4, 5, 6]], jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x, False)["params"]
    h1 = model.apply({"params": params}, x, False)
    h2 = model.apply({"params": params}, x.at[0, 6].set(2), False)
    np.testing.assert_allclose(h1[0, :6], h2[0, :6], atol=1e-6)  # the past ignores the future
    assert not np.allclose(h1[0, 6], h2[0, 6])
    # Users cycling through 1..6 from different starts: the next item is always determined.
    seqs = [[1 + (s + k) % 6 for k in range(10)] for s in range(6) for _ in range(4)]
    d = bdata.training_data(LogSource(_log(seqs), "train"))
    p = {"maxlen": 8, "d_model": 16, "n_blocks": 1, "n_heads": 1, "dropout": 0.0}
    p.update(learning_rate=1e-2, batch_size=8, epochs=40, eval_every=40)
    sc = sasrec.fit(d, p, seed=0)
    hist = [1 + (s + k) % 6 for s in range(6) for k in range(5)]
    raw = {"hist_offsets": np.arange(0, 31, 5), "hist_item": np.array(hist)}
    top = sc.scores(raw)[:, 1:].argmax(1) + 1
    np.testing.assert_array_equal(top, [1 + (s + 5) % 6 for s in range(6)])


def _walk_log(tmp_path) -> str:
    """A Parquet user log in which every user walks a 30-item catalogue in order."""
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 30
    rows = []
    for u in range(n_users):
        start = rng.integers(n_items)
        rows += [(f"u{u}", f"i{(start + k) % n_items}", 100 * k) for k in range(8)]
    user, item, ts = (np.array(c) for c in zip(*rows, strict=True))
    log = EventLog.from_columns("p", user=user, item=item, ts=ts)
    path = tmp_path / "log.parquet"
    logs.write(path, log)
    return f"parquet:{path}"


def test_cli_on_a_parquet_log(tmp_path, capsys):
    src = _walk_log(tmp_path)
    assert (
        cli.main(["baseline", "seq-knn", "--source", src, "--json", "--out", str(tmp_path / "o")])
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["selected_by"] == "validation ndcg@10"
    # Every grid point once; none that only repeats another (gap_decay with window 1, ...).
    assert len(res["grid"]) == sum(knn.distinct(c) for c in tune.combinations(knn.GRID))
    assert len(res["grid"]) < len(tune.combinations(knn.GRID))
    chosen = next(r for r in res["grid"] if r["params"] == res["params"])
    assert chosen["validation"]["ndcg@10"] == max(r["validation"]["ndcg@10"] for r in res["grid"])
    # Every user walks the catalogue in order: the transition baseline must find it.
    assert res["test_mean"]["recall@10"] > 0.9
    assert json.loads((tmp_path / "o" / "result.json").read_text())["params"] == res["params"]
    pop = tune.run("popularity", src, tune=False, seeds=1, say=lambda m: None)
    assert pop["test_mean"]["recall@10"] < res["test_mean"]["recall@10"]


def test_cli_refuses_bad_input(capsys):
    assert cli.main(["baseline", "seq-knn", "--source", "world:tiny"]) == 2
    assert "logged sources" in capsys.readouterr().err
    assert cli.main(["baseline", "bpr", "--source", "movielens-100k", "--set", "dims=3"]) == 2
    assert "FIELD one of" in capsys.readouterr().err
    assert cli.main(["baseline", "bpr", "--source", "movielens-100k", "--seeds", "0"]) == 2


def test_movielens_smoke():
    """The transition baseline on MovieLens-100k, untuned: ahead of popularity (seconds)."""
    pop = tune.run("popularity", "movielens-100k", tune=False, seeds=1, say=lambda m: None)
    seq = tune.run("seq-knn", "movielens-100k", tune=False, seeds=1, say=lambda m: None)
    assert seq["n_test_requests"] == 943
    assert seq["protocol"] == ranking.protocol_of(LogSource(movielens.load(), "test"))
    assert seq["test_mean"]["ndcg@10"] > 2 * pop["test_mean"]["ndcg@10"]


def test_rank_unseen_on_a_catalogue_smaller_than_k():
    """A user's log of 5 items ranked to depth 10: every allowed item once, then padding."""
    s = np.array([[0.0, 0.1, 0.5, 0.3, 0.2, 0.4]])
    seen = {"hist_offsets": np.array([0, 2]), "hist_item": np.array([2, 4])}
    ranked = ranking.rank_unseen(s, seen, 10)
    np.testing.assert_array_equal(ranked, [[5, 3, 1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(ranking.rank_unseen(s, seen, 2), [[5, 3]])


def test_movielens_exported_as_a_user_log_scores_the_same(tmp_path, capsys):
    """`onerec data export` writes MovieLens-100k as a Parquet user log; read back through
    `parquet:PATH` it gives the same splits, protocol and baseline scores."""
    path = tmp_path / "ml.parquet"
    assert cli.main(["data", "export", "--source", "movielens-100k", "--out", str(path)]) == 0
    assert "100,000 events" in capsys.readouterr().out
    assert cli.main(["data", "export", "--source", "movielens-100k", "--out", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    a, b = (
        tune.run("seq-knn", s, tune=False, seeds=1, say=lambda m: None)
        for s in ("movielens-100k", f"parquet:{path}")
    )
    assert a["test_mean"] == b["test_mean"] and a["protocol"] == b["protocol"]


def test_a_seeded_baseline_is_tested_on_fresh_seeds(tmp_path):
    """The grid's winning fit (seed 0) is never the one scored on test: its validation luck
    would follow it there."""
    src = _walk_log(tmp_path)
    sets = {"epochs": 2, "eval_every": 1, "dim": 8}
    res = tune.run("bpr", src, tune=False, seeds=2, sets=sets, say=lambda m: None)
    assert [t["seed"] for t in res["test"]] == [1, 2]
    assert res["seeds"] == 2
    vals = [t["ndcg@10"] for t in res["test"]]
    assert res["test_sd"]["ndcg@10"] == pytest.approx(np.std(vals, ddof=1))
    det = tune.run("ease", src, tune=False, seeds=3, say=lambda m: None)
    assert [t["seed"] for t in det["test"]] == [0] and det["test_sd"]["ndcg@10"] == 0.0


def test_best_epoch_keeps_the_best_validation_score():
    class S:
        pass

    scores = iter([0.1, 0.3, 0.2])
    pick = bdata.BestEpoch(lambda sc: next(scores))
    offered = [S(), S(), S()]
    for epoch, sc in zip((5, 10, 15), offered, strict=True):
        pick.offer(sc, epoch)
    assert pick.best is offered[1]
    assert pick.best.chosen == {"epochs": 10, "validation_ndcg@10": 0.3}
    last = bdata.BestEpoch(None)
    for epoch, sc in zip((5, 10), offered[:2], strict=True):
        last.offer(sc, epoch)
    assert last.best is offered[1] and last.best.chosen == {"epochs": 10}
