import numpy as np

from onerec_jax.data import movielens, schema
from onerec_jax.data.events import LogSource


def test_counts_and_features():
    log = movielens.load()
    assert (log.n_events, log.n_users, log.n_items) == (100_000, 943, 1682)
    assert log.n_tags == 19  # genres; the first listed one is the tag
    assert ((log.flags & schema.LIKE) != 0).sum() == 55_375  # ratings 4 and 5
    assert log.item_text[1].startswith("Toy Story (1995) | Animation")
    s = log.static[1:]
    assert s[:, 0].min() >= 1 and s[:, 0].max() <= 7 and set(s[:, 1]) == {1, 2}
    assert s[:, 3].max() == 21  # occupations


def test_order_is_time_then_item():
    log = movielens.load()
    u = log.user_of_event()
    same_user = u[1:] == u[:-1]
    dt = np.diff(log.ts)
    assert (dt[same_user] >= 0).all()
    tie = same_user & (dt == 0)
    assert tie.any() and (np.diff(log.item)[tie] > 0).all()


def test_leave_last_out_split():
    log = movielens.load()
    val, test, train = (LogSource(log, s) for s in ("validation", "test", "train"))
    assert len(val) == len(test) == 943
    last = log.offsets[2:] - 1
    np.testing.assert_array_equal(test.target_start, last)
    np.testing.assert_array_equal(val.target_start, last - 1)
    # Training targets never reach a user's last two events; history ends where the target starts.
    assert (train.target_end <= log.offsets[train.user + 1] - 2).all()
    assert (train.target_end - train.target_start <= 5).all()
    lengths = train.target_end - train.target_start
    covered = np.zeros(log.n_events, int)
    np.add.at(covered, schema.ranges(train.target_start, lengths), 1)
    assert covered.max() == 1  # each event is the target of at most one example
    # Uncovered train-region events are exactly each user's leading session (it has no history).
    user = log.user_of_event()
    first_target = np.full(log.n_users + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_target, train.user, train.target_start)
    pos = np.arange(log.n_events)
    region = pos < log.offsets[user + 1] - 2
    np.testing.assert_array_equal(covered[region] == 0, pos[region] < first_target[user[region]])
    assert (covered[~region] == 0).all()
    raw = test.raw(0)
    assert len(raw["hist_item"]) == np.diff(log.offsets)[1] - 1
    assert raw["target_item"][0] == log.item[last[0]]
