import json
import subprocess
import sys

import numpy as np
import pytest

from onerec_jax.data import schema
from onerec_jax.data.stats import popularity_slope
from onerec_jax.data.world import PRESETS, World, WorldConfig

SPEC = schema.SchemaSpec(short_len=8, pos_len=16, life_len=64)


def _digest(world: World, idx) -> list:
    b = schema.build_batch(world.raw_batch(np.asarray(idx), SPEC.history_window), SPEC)
    return [[k, np.nan_to_num(v.astype(np.float64)).sum().item()] for k, v in sorted(b.items())]


def test_random_access_is_order_free_and_seeded():
    w = World("tiny", seed=3)
    a = w.raw_batch(np.array([5, 17, 3]), 100)
    for j, i in enumerate([5, 17, 3]):
        one = w.raw(i, 100)
        sl = slice(a["hist_offsets"][j], a["hist_offsets"][j + 1])
        np.testing.assert_array_equal(one["hist_item"], a["hist_item"][sl])
        np.testing.assert_array_equal(one["hist_ts"], a["hist_ts"][sl])
    again = World("tiny", seed=3).raw_batch(np.array([5, 17, 3]), 100)
    for k in a:
        np.testing.assert_array_equal(a[k], again[k])
    other = World("tiny", seed=4).raw_batch(np.array([5, 17, 3]), 100)
    assert not np.array_equal(a["target_item"], other["target_item"])
    # The targets (expanded in one call with the history) are the request's own session as
    # `session_events` realises it alone.
    sessions = w.session_of(a["user_id"], a["request_ts"])
    for j in range(3):
        alone = w.session_events(int(a["user_id"][j]), sessions[j : j + 1])
        sl = slice(a["target_offsets"][j], a["target_offsets"][j + 1])
        for f in schema.TARGET_FIELDS:
            np.testing.assert_array_equal(a[f"target_{f}"][sl], alone[f], err_msg=f)
    with pytest.raises(IndexError):
        w.raw(len(w))


def test_same_examples_in_a_new_process():
    code = (
        "import json; from tests.test_world import _digest; "
        "from onerec_jax.data.world import World;"
        "print(json.dumps(_digest(World('tiny', seed=7), range(40, 56))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == _digest(World("tiny", seed=7), range(40, 56))


def test_history_precedes_request_and_sessions_invert():
    w = World("tiny", seed=0)
    r = w.raw_batch(np.arange(200), None)
    off = r["hist_offsets"]
    for b in range(200):
        ts = r["hist_ts"][off[b] : off[b + 1]]
        assert np.all(np.diff(ts) > 0)
        assert len(ts) == 0 or ts[-1] < r["request_ts"][b]
    u, s = w.requests(np.arange(200))
    np.testing.assert_array_equal(w.session_of(u, r["request_ts"]), s)
    np.testing.assert_array_equal(r["user_id"], u)


def test_window_keeps_most_recent_events():
    w = World("tiny", seed=0)
    full, cut = w.raw_batch(np.arange(50), None), w.raw_batch(np.arange(50), 30)
    for b in range(50):
        f = full["hist_item"][full["hist_offsets"][b] : full["hist_offsets"][b + 1]]
        c = cut["hist_item"][cut["hist_offsets"][b] : cut["hist_offsets"][b + 1]]
        np.testing.assert_array_equal(c, f[-30:])


@pytest.mark.parametrize("alpha", [0.8, 1.2])
def test_popularity_follows_zipf(alpha):
    # Stated tolerance: the log-log fit over items seen >= 5 times recovers alpha within 0.1.
    w = World(WorldConfig(n_users=100_000, n_items=5000, n_topics=32, zipf_alpha=alpha), seed=1)
    r = w.raw_batch(np.arange(3000), 256)
    slope = popularity_slope(np.concatenate([r["hist_item"], r["target_item"]]))
    assert abs(slope - alpha) < 0.1, slope


def _rising_share(w: World, users: np.ndarray, sessions: np.ndarray) -> tuple[float, float]:
    """Observed and expected share of exposures in each user's fastest-rising interest."""
    seen, expect = [], []
    for u in users:
        p = w._user(np.asarray([u]))
        k = int(np.argmax(p["slope"][0]))
        ev = w.session_events(int(u), sessions)
        seen.append((w.topic[ev["item"]] == p["topics"][0, k]).mean())
        ts = w._session_start(np.asarray([u]), p, sessions)
        pt = w.logging_distribution(np.full(len(sessions), u), ts)
        expect.append(pt[:, p["topics"][0, k]].mean())  # items of that topic, whichever way chosen
    return float(np.mean(seen)), float(np.mean(expect))


def test_interest_drift_is_measurable():
    # Stated tolerance: the pooled observed share of the rising interest is within 0.03 of the
    # generator's expectation, early and late; with drift 0 early and late agree within 0.03.
    users = np.arange(1, 121)
    early, late = np.arange(0, 20), np.arange(480, 500)
    w = World(WorldConfig(n_users=1000, n_items=2000, n_topics=16, drift=0.5, max_sessions=500))
    e_seen, e_exp = _rising_share(w, users, early)
    l_seen, l_exp = _rising_share(w, users, late)
    assert abs(e_seen - e_exp) < 0.03 and abs(l_seen - l_exp) < 0.03
    assert l_seen - e_seen > 0.15  # drift moved exposure towards the rising interest
    still = World(WorldConfig(n_users=1000, n_items=2000, n_topics=16, drift=0.0, max_sessions=500))
    s_e, _ = _rising_share(still, users, early)
    s_l, _ = _rising_share(still, users, late)
    assert abs(s_l - s_e) < 0.03


def test_entropy_floor_equals_mean_target_surprisal():
    w = World("tiny", seed=2)
    r = w.raw_batch(np.arange(20_000), 0)
    toff = r["target_offsets"]
    b = np.repeat(np.arange(len(toff) - 1), np.diff(toff))
    surprisal = -w.logging_logprob(r["user_id"][b], r["request_ts"][b], r["target_item"][:, None])[
        :, 0
    ]
    entropy = w.next_item_entropy(r["user_id"][b], r["request_ts"][b])
    se = surprisal.std() / np.sqrt(len(b))
    assert abs(surprisal.mean() - entropy.mean()) < 4 * se
    h, h_se = w.entropy_floor(4096)
    assert 0 < h_se < 0.05 and abs(h - entropy.mean()) < 4 * (h_se + se)


def test_true_engagement_is_the_feedback_expectation():
    w = World("tiny", seed=5)
    r = w.raw_batch(np.arange(20_000), 0)
    toff = r["target_offsets"]
    b = np.repeat(np.arange(len(toff) - 1), np.diff(toff))
    p = w.true_engagement(r["user_id"][b], r["request_ts"][b], r["target_item"][:, None])
    frac = r["target_play_ms"] / r["target_dur_ms"]
    n = len(b)
    assert abs(frac.mean() - p["play_frac"].mean()) < 4 * frac.std() / np.sqrt(n)
    for bit, name in zip(
        (schema.LIKE, schema.FOLLOW, schema.DISLIKE), ("like", "follow", "dislike"), strict=True
    ):
        seen = (r["target_flags"] & bit) != 0
        q = p[name][:, 0]
        assert abs(seen.mean() - q.mean()) < 4 * np.sqrt((q * (1 - q)).sum()) / n + 1e-4, name
    weights = {
        "play_frac": 1.0,
        "like": 2.0,
        "follow": 4.0,
        "comment": 2.0,
        "share": 3.0,
        "dislike": -5.0,
    }
    np.testing.assert_allclose(p["reward"], sum(v * p[k] for k, v in weights.items()))
    # A user's own interest topic is worth more than a random item on average.
    with pytest.raises(ValueError, match="item ids"):
        w.true_engagement(r["user_id"][:1], r["request_ts"][:1], np.array([[w.n_items + 1]]))


def test_item_table_is_linear_in_items():
    w = World("small")
    per_item = sum(a.nbytes for a in vars(w).values() if isinstance(a, np.ndarray)) / w.n_items
    assert per_item < 64 * 4  # the bound: O(items x 64) floats
    x = w.item_content(np.arange(1, 101))
    assert x.shape == (100, 64) and np.isfinite(x).all()
    # Content is a noisy view of the topic: same-topic items are closer than others.
    same = w.topic[1:101, None] == w.topic[None, 1:101]
    sim = x @ x.T
    assert sim[same & ~np.eye(100, dtype=bool)].mean() > sim[~same].mean() + 0.2


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="preset"):
        World("huge")
    with pytest.raises(ValueError, match="n_topics"):
        WorldConfig(n_items=4, n_topics=8)
    with pytest.raises(ValueError, match="split"):
        World("tiny", split="dev")
    assert set(PRESETS) == {"tiny", "small", "large"}


@pytest.mark.slow
def test_large_preset_builds_and_serves_full_pathways():
    # 100M users, 4M items: only the item table is stored.
    w = World("large")
    spec = schema.SchemaSpec()
    b = schema.build_batch(w.raw_batch(np.arange(64), spec.history_window), spec)
    assert b["life_mask"].sum(1).max() == spec.life_len
    assert b["short_item"].max() <= w.n_items and b["user_id"].max() <= w.n_users


def test_session_length_bound():
    with pytest.raises(ValueError, match="max_session_len"):
        WorldConfig(max_session_len=9)
    with pytest.raises(ValueError, match="seed"):
        World("tiny", seed=-1)


SPLITS = ("train", "validation", "test")


def _example_digests(w: World, idx: np.ndarray) -> set[bytes]:
    """One digest per example of everything the model and the loss see."""
    b = schema.build_batch(w.raw_batch(idx, SPEC.history_window), SPEC)
    rows = [
        np.ascontiguousarray(v).reshape(len(idx), -1).view(np.uint8) for _, v in sorted(b.items())
    ]
    return {b"".join(r[i].tobytes() for r in rows) for i in range(len(idx))}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_splits_share_no_request_and_no_example(preset):
    worlds = {sp: World(preset, seed=1, split=sp) for sp in SPLITS}
    cfg = worlds["train"].config
    rng = np.random.default_rng(0)
    pairs, digests = {}, {}
    for sp, w in worlds.items():
        # The first examples, and examples from far into the unbounded index range.
        idx = np.concatenate([np.arange(30_000), rng.integers(0, len(w), 30_000)])
        u, s = w.requests(idx)
        lo, hi = cfg.split_sessions(sp)
        assert lo <= s.min() and s.max() < hi and 1 <= u.min() and u.max() <= cfg.n_users
        pairs[sp] = set((u * cfg.max_sessions + s).tolist())
        digests[sp] = _example_digests(w, np.arange(300))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        sa, sb = SPLITS[a], SPLITS[b]
        assert not pairs[sa] & pairs[sb], (sa, sb)
        assert not digests[sa] & digests[sb], (sa, sb)


def test_split_is_a_time_cut_and_enumerates_distinct_requests():
    worlds = {sp: World("tiny", seed=4, split=sp) for sp in SPLITS}
    cfg = worlds["train"].config
    assert [worlds[sp].n_distinct for sp in SPLITS] == [160_000, 20_000, 20_000]
    # The first n_distinct examples of a split are all its requests, each once.
    for sp, w in worlds.items():
        u, s = w.requests(np.arange(w.n_distinct))
        keys = u * cfg.max_sessions + s
        assert len(np.unique(keys)) == w.n_distinct, sp
        # The next pass holds the same requests in another order.
        u2, s2 = w.requests(np.arange(w.n_distinct, 2 * w.n_distinct))
        keys2 = u2 * cfg.max_sessions + s2
        assert set(keys2.tolist()) == set(keys.tolist()) and not np.array_equal(keys, keys2)
    # Every validation/test request of a user starts after all of that user's training sessions.
    r_train = worlds["train"].raw_batch(np.arange(worlds["train"].n_distinct), 0)
    last_train = np.zeros(cfg.n_users + 1, np.int64)
    np.maximum.at(last_train, r_train["user_id"], r_train["request_ts"])
    for sp in ("validation", "test"):
        r = worlds[sp].raw_batch(np.arange(5000), 0)
        assert np.all(r["request_ts"] > last_train[r["user_id"]]), sp
    first_test = worlds["test"].raw_batch(np.arange(5000), 0)
    val = worlds["validation"].raw_batch(np.arange(worlds["validation"].n_distinct), 0)
    last_val = np.zeros(cfg.n_users + 1, np.int64)
    np.maximum.at(last_val, val["user_id"], val["request_ts"])
    assert np.all(first_test["request_ts"] > last_val[first_test["user_id"]])


def test_split_shares_are_checked():
    with pytest.raises(ValueError, match="no training sessions"):
        WorldConfig(max_sessions=2)
    with pytest.raises(ValueError, match="unknown split"):
        WorldConfig().split_sessions("dev")
    assert WorldConfig(max_sessions=10).split_sessions("test") == (9, 10)


def test_repeat_warning_names_both_numbers():
    from onerec_jax.data import sources

    w = World("tiny", split="train")
    assert sources.repeat_warning(w, 160_000) is None
    msg = sources.repeat_warning(w, 320_000)
    assert msg is not None and "320,000" in msg and "160,000" in msg
    ml = sources.open_source("movielens-100k", split="train")
    assert sources.distinct_requests(ml) == len(ml)
    assert sources.repeat_warning(ml, 3 * len(ml)) is not None


def test_order_seed_reorders_the_same_requests():
    a, b = World("tiny", seed=2, order_seed=0), World("tiny", seed=2, order_seed=1)
    n = a.n_distinct
    ka = a.requests(np.arange(n))
    kb = b.requests(np.arange(n))
    assert not np.array_equal(ka[0], kb[0])
    assert set(zip(*ka, strict=True)) == set(zip(*kb, strict=True))
    np.testing.assert_array_equal(a.item_content(np.arange(1, 9)), b.item_content(np.arange(1, 9)))
