"""The e-commerce world (onerec_jax/data/mall.py): its events follow its own exact model, its
scenarios, behaviour pathways and per-scenario evaluation."""

import dataclasses

import numpy as np
import pytest

from onerec_jax.config import ConfigError, validate
from onerec_jax.configs import default
from onerec_jax.data import schema
from onerec_jax.data.mall import MallWorld
from onerec_jax.data.mall_config import MallConfig
from onerec_jax.data.sources import open_source
from onerec_jax.evaluate import _drop_seen, _metrics

SPEC = schema.SchemaSpec(
    short_len=8, pos_len=8, life_len=64, scenarios=True, click_len=8, cart_len=4, order_len=4
)


@pytest.fixture(scope="module")
def world():
    return open_source("world:mall-tiny", split="validation")


@pytest.fixture(scope="module")
def raw(world):
    return world.raw_batch(np.arange(3000), SPEC.history_window)


def test_events_follow_the_exact_behaviour_model(world, raw):
    """The realised clicks, carts and orders of the target exposures match the exact
    expectations `true_engagement` states for the same (request, product) within sampling error
    (per scenario too): the generator and the oracle are one model."""
    n = np.diff(raw["target_offsets"])
    rows = np.repeat(np.arange(len(n)), n)
    e = world.true_engagement(
        raw["user_id"][rows], raw["request_ts"][rows], raw["target_item"][:, None]
    )
    flags = raw["target_flags"]
    scen = raw["scenario"][rows]
    for name, bit in (("click", schema.CLICK), ("cart", schema.CART), ("order", schema.ORDER)):
        for k in (1, 2, 3):
            at = scen == k
            p = e[name][at, 0]
            seen = ((flags[at] & bit) != 0).sum()
            assert abs(seen - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum()) + 1, (name, k)
    # A step of the funnel only after the one before it.
    assert not ((flags & schema.CART) & ~((flags & schema.CLICK) * 2)).any()
    assert not ((flags & schema.ORDER) & ~((flags & schema.CART) * 2)).any()
    np.testing.assert_allclose(e["gmv"][:, 0], world.price[raw["target_item"]] * e["order"][:, 0])


def test_scenarios_show_only_their_products(world, raw):
    # Every logged exposure is of a product its scenario shows; history events carry their
    # session's scenario and the request its own.
    assert world.shown_in(raw["hist_scenario"], raw["hist_item"][:, None]).all()
    rows = np.repeat(np.arange(len(raw["user_id"])), np.diff(raw["target_offsets"]))
    assert world.shown_in(raw["scenario"][rows], raw["target_item"][:, None]).all()
    assert set(np.unique(raw["scenario"])) == {1, 2, 3}
    # A product the scenario does not show earns nothing.
    u, ts = raw["user_id"][:64], raw["request_ts"][:64]
    items = np.tile(np.arange(1, world.n_items + 1), (64, 1))
    e = world.true_engagement(u, ts, items)
    hidden = ~world.shown_in(raw["scenario"][:64], items)
    assert hidden.any() and (e["order"][hidden] == 0).all() and (e["reward"][hidden] == 0).all()
    assert (e["click"][~hidden] > 0).all()


def test_logging_policy_is_a_distribution_and_its_entropy_is_exact(world, raw):
    u, ts = raw["user_id"][:32], raw["request_ts"][:32]
    items = np.tile(np.arange(1, world.n_items + 1), (32, 1))
    lp = world.logging_logprob(u, ts, items)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, rtol=1e-9)
    h = world.next_item_entropy(u, ts)
    np.testing.assert_allclose(h, -(np.exp(lp) * np.where(np.isfinite(lp), lp, 0)).sum(1))
    # The first exposure of each request is drawn from that distribution: its mean surprisal
    # is the mean entropy within sampling error.
    first = raw["target_item"][raw["target_offsets"][:-1]]
    s = -world.logging_logprob(raw["user_id"], raw["request_ts"], first[:, None])[:, 0]
    hh = world.next_item_entropy(raw["user_id"], raw["request_ts"])
    assert abs(s.mean() - hh.mean()) < 4 * s.std() / np.sqrt(len(s))


def test_behaviour_pathways_hold_each_users_latest_behaviours(raw):
    b = schema.build_batch(raw, SPEC)
    off = raw["hist_offsets"]
    for i in range(0, 300, 7):
        sl = slice(off[i], off[i + 1])
        for name, bit in schema.BEHAVIOURS.items():
            did = (raw["hist_flags"][sl] & bit) != 0
            want = raw["hist_item"][sl][did][::-1][: SPEC.behaviour_lens()[name]]
            got = b[f"{name}_item"][i][b[f"{name}_mask"][i]]
            np.testing.assert_array_equal(got, want)
            scen = raw["hist_scenario"][sl][did][::-1][: len(want)]
            np.testing.assert_array_equal(b[f"{name}_scenario"][i][: len(want)], scen)
    np.testing.assert_array_equal(b["scenario"], raw["scenario"])
    assert (b["order_mask"].sum(1) > 0).mean() > 0.5  # orders are common enough to fill it


def test_config_and_world_refusals():
    cfg = default.get_config()
    cfg.data.scenarios = True
    with pytest.raises(ConfigError, match=r"data\.scenarios needs an e-commerce source"):
        validate(cfg)
    cfg.source = "world:mall-tiny"
    validate(cfg)
    with pytest.raises(ValueError, match="mall-tiny"):
        open_source("world:mall-huge")
    with pytest.raises(ValueError, match="availability"):
        MallConfig(availability=(0.5, 0.0, 0.5))
    # A category no product of a scenario belongs to is one error naming both.
    sparse = MallConfig(n_items=40, n_topics=16, availability=(1.0, 0.05, 0.05))
    with pytest.raises(ValueError, match="has no product in scenario"):
        MallWorld(sparse)


def test_eval_keeps_shown_products_and_splits_metrics_by_scenario():
    items = np.array([[5, 3, 9, 4, 8], [1, 2, 3, 4, 5]])
    seen = {"hist_offsets": np.array([0, 1, 1]), "hist_item": np.array([3])}
    allowed = np.array([[True, True, False, True, True], [False, True, True, True, True]])
    top = _drop_seen(items, seen, 3, allowed)
    np.testing.assert_array_equal(top, [[5, 4, 8], [2, 3, 4]])
    cols = {
        "ranked": top,
        "targets": np.array([[4, 0], [7, 0]]),
        "masks": np.array([[True, False], [True, False]]),
        "logged": np.zeros((2, 3)),
        "order": np.array([[0.1, 0.2, 0.3], [0.0, 0.5, 0.0]]),
        "gmv": np.array([[1.0, 2.0, 3.0], [0.0, 5.0, 0.0]]),
    }
    m = _metrics(cols)
    assert m["recall@10"] == 0.5
    np.testing.assert_allclose(m["orders@1"], 0.05)
    np.testing.assert_allclose(m["orders@10"], (0.6 + 0.5) / 2)
    np.testing.assert_allclose(m["gmv@5"], (6.0 + 5.0) / 2)


def _encode(enc, batch):
    import jax

    from onerec_jax.model.user_encoder import UserEncoder

    model = UserEncoder(enc, stack=False)
    params = model.init(jax.random.key(0), batch)
    return np.asarray(model.apply(params, batch)[0])


@pytest.mark.parametrize("fusion", ["concat", "cross"])
def test_scenario_token_and_behaviour_fusion(raw, fusion):
    from onerec_jax.model.user_encoder import EncoderConfig

    enc = EncoderConfig(
        d_model=16, n_heads=2, d_ff=32, n_queries=4, n_items=600, n_authors=100, n_tags=30,
        short_len=8, pos_len=8, life_len=64, n_scenarios=3, click_len=8, cart_len=4,
        order_len=4, behaviour_fusion=fusion,
    )  # fmt: skip
    b = schema.build_batch({k: v for k, v in raw.items()}, SPEC)
    b = {k: v[:4] for k, v in b.items() if k not in ("user_id", "request_ts")}
    x = _encode(enc, b)
    assert x.shape[1] == enc.n_tokens
    scen_at = 1 + 8 + 8 + 4  # static, short, pos, queries, then the scenario token
    other = dict(b, scenario=(b["scenario"] % 3) + 1)
    y = _encode(enc, other)
    assert not np.allclose(x[:, scen_at], y[:, scen_at])  # the request's scenario is read
    np.testing.assert_array_equal(x[:, :scen_at], y[:, :scen_at])
    # Orders read the clicks only through the cross-attention fusion.
    clicks = dict(b, click_item=np.roll(b["click_item"], 1, axis=0))
    z = _encode(enc, clicks)
    orders = slice(scen_at + 1 + 8 + 4, None)
    assert np.allclose(x[:, orders], z[:, orders]) == (fusion == "concat")
    # Without scenarios the model has no scenario parameters and ignores the field.
    plain = dataclasses.replace(enc, n_scenarios=0)
    np.testing.assert_array_equal(_encode(plain, b), _encode(plain, other))


def test_one_scenarios_requests():
    """world:mall-tiny:SCENARIO keeps exactly the split's requests of that scenario: the three
    partition the split, each example is one of them, and the first N examples are distinct."""
    full = open_source("world:mall-tiny", split="test")
    sizes = 0
    for name in schema.SCENARIOS:
        w = open_source(f"world:mall-tiny:{name}", split="test")
        n = w.n_distinct
        sizes += n
        u, s = w.requests(np.arange(n))
        assert (w.scenario_of_session(u, s) == 1 + schema.SCENARIOS.index(name)).all()
        lo, hi = w.config.split_sessions("test")
        assert len(np.unique(u * hi + s)) == n and s.min() >= lo and s.max() < hi
        raw = w.raw_batch(np.arange(64), 32)
        assert (raw["scenario"] == 1 + schema.SCENARIOS.index(name)).all()
    assert sizes == full.n_distinct
    with pytest.raises(ValueError, match="unknown scenario 'shop'"):
        open_source("world:mall-tiny:shop")


def test_user_log_with_scenario_and_behaviour(tmp_path):
    """A Parquet log may carry `scenario` and `behaviour` (or click/cart/order columns): they
    become the events' scenario and funnel flags, requests take their target's scenario, and
    a bad value is one error naming the column and row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from onerec_jax.data import logs
    from onerec_jax.data.events import LogSource

    rows = {
        "user_id": [1, 1, 1, 1, 2, 2, 2],
        "item_id": [10, 11, 12, 13, 10, 12, 14],
        "timestamp": [1, 2, 3, 4, 1, 2, 3],
        "behaviour": ["click", None, "order", "cart", "exposure", "cart", "click"],
        "scenario": ["live", "card", 3, "video", None, "card", "live"],
    }
    rows["scenario"] = [None if v is None else str(v) for v in rows["scenario"]]
    path = tmp_path / "shop.parquet"
    pq.write_table(pa.table(rows), path)
    log = logs.load(path)
    want_flags = [32, 0, 224, 96, 0, 96, 32]
    np.testing.assert_array_equal(log.flags, want_flags)
    np.testing.assert_array_equal(log.scenario, [3, 1, 3, 2, 0, 1, 3])
    test = LogSource(log, "test")
    raw = test.raw_batch(np.arange(len(test)))
    np.testing.assert_array_equal(raw["scenario"], [2, 3])  # each user's last event's scenario
    b = schema.build_batch(raw, SPEC)
    np.testing.assert_array_equal(b["order_item"][0][b["order_mask"][0]], [3])  # dense id of 12
    # Written back, the same log reads again.
    logs.write(tmp_path / "again.parquet", log)
    again = logs.load(tmp_path / "again.parquet")
    np.testing.assert_array_equal(again.flags, log.flags)
    np.testing.assert_array_equal(again.scenario, log.scenario)
    rows["scenario"] = [3.0, 1.0, float("nan"), 2.0, None, 1.0, 3.0]  # numbers; NaN = unknown
    pq.write_table(pa.table(rows), path)
    np.testing.assert_array_equal(logs.load(path).scenario, [3, 1, 0, 2, 0, 1, 3])
    rows["behaviour"][2] = "bought"
    pq.write_table(pa.table(rows), path)
    with pytest.raises(logs.LogFormatError, match=r"column 'behaviour' row 2: 'bought'"):
        logs.load(path)


def test_log_sessions_keep_one_scenario_and_behaviour_pathways_reach_back():
    """A logged training session never spans two scenarios (its request is served in one), and
    a behaviour pathway fills from orders older than the history window, as the positive
    pathway does from sparse positives."""
    from onerec_jax.data import pipeline
    from onerec_jax.data.events import EventLog, LogSource

    n = 3000
    scen = np.where(np.arange(n) // 3 % 2 == 0, 1, 3)  # alternating runs of 3 events
    order = np.arange(n) % 300 == 0  # 10 orders, every 300 events: sparse behind the window
    flags = np.where(order, schema.CLICK | schema.CART | schema.ORDER, 0).astype(np.uint8)
    log = EventLog.from_columns(
        "shop", user=np.ones(n, int), item=np.arange(n) % 97 + 1, ts=np.arange(n),
        flags=flags, scenario=scen,
    )  # fmt: skip
    train = LogSource(log, "train")
    for t0, t1 in zip(train.target_start, train.target_end, strict=True):
        assert len(set(log.scenario[t0:t1].tolist())) == 1
    # Every run of 3 events is one session: the first has no history (min_history), and the
    # last keeps one event (the user's last two are held out).
    np.testing.assert_array_equal(train.target_start, np.arange(3, n - 2, 3))
    # An unknown scenario (0) between known ones cuts nothing: sessions of m = 5 events.
    log_unknown = EventLog.from_columns(
        "shop", user=np.ones(n, int), item=np.arange(n) % 97 + 1, ts=np.arange(n),
        scenario=np.where(np.arange(n) % 2, 0, 1),
    )  # fmt: skip
    np.testing.assert_array_equal(
        LogSource(log_unknown, "train").target_start, np.arange(5, n - 2, 5)
    )
    spec = schema.SchemaSpec(short_len=4, pos_len=1, life_len=8, scenarios=True, order_len=8)
    test = LogSource(log, "test")
    ex = pipeline.BuildBatch(test, spec).map(np.array([0]))
    assert spec.history_window == 64 and ex["order_mask"].sum() == 8
    full = schema.build_batch(test.raw_batch(np.array([0])), spec)
    for k in ex:
        np.testing.assert_array_equal(ex[k], full[k], err_msg=k)
    # A pathway with fewer selections than its length reaches back to its oldest one only.
    few = dataclasses.replace(spec, order_len=20)
    raw = test.raw_batch(np.array([0]), few.history_window, few)
    assert len(raw["hist_item"]) == n - 1  # the first order is event 0: the whole history
    no_orders = EventLog.from_columns(
        "shop", user=np.ones(n, int), item=np.arange(n) % 97 + 1, ts=np.arange(n),
        flags=np.where(np.arange(n) == n - 500, schema.CLICK | schema.CART | schema.ORDER, 0),
        scenario=scen,
    )  # fmt: skip
    raw = LogSource(no_orders, "test").raw_batch(np.array([0]), few.history_window, few)
    assert len(raw["hist_item"]) == 500 - 1  # back to the one order, not to the first event


def test_tokenizer_pairs_products_bought_together(world):
    """On the e-commerce world the tokenizer's pairs are co-cart / co-purchase pairs by
    default: both products of every pair were carted by the pair's user."""
    from onerec_jax.tokenizer import embed

    train = open_source("world:mall-tiny", split="train")
    cfg = embed.EmbedConfig(world_examples=300, window=2)
    assert embed.has_funnel(train) and not embed.has_funnel(open_source("world:tiny"))
    bought, users = embed.co_occurrence_pairs(train, cfg, "purchase")
    clicked, _ = embed.co_occurrence_pairs(train, cfg, "positive")
    assert 0 < len(bought) < len(clicked)
    # Rebuild the same histories and check each pair against the user's carted products.
    import numpy.testing as npt

    from onerec_jax.data import hashing

    idx = np.asarray(hashing.hash_u64(cfg.seed, 77, np.arange(300)) % np.uint64(len(train)))
    raw = train.raw_batch(idx.astype(np.int64), max_events=64)
    carted = {}
    user_of = np.repeat(raw["user_id"], np.diff(raw["hist_offsets"]))
    for u, item, f in zip(user_of, raw["hist_item"], raw["hist_flags"], strict=True):
        if f & schema.CART:
            carted.setdefault(int(u), set()).add(int(item))
    for (a, b), u in zip(bought[:500], users[:500], strict=True):
        assert {int(a), int(b)} <= carted[int(u)]
    npt.assert_array_equal(bought[:, 0] != bought[:, 1], True)
