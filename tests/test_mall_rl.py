"""OneMall's ranking model and RL on the e-commerce world: the chained funnel heads, the
expected-GMV objective, logged funnel feedback, and (slow) pre-train -> ranking model -> align
-> per-scenario eval end to end."""

import numpy as np
import pytest

from onerec_jax.data import schema
from onerec_jax.data.sources import open_source

SPEC = schema.SchemaSpec(
    short_len=8, pos_len=8, life_len=64, scenarios=True, click_len=8, cart_len=4, order_len=4
)


@pytest.fixture(scope="module")
def world():
    return open_source("world:mall-tiny", split="validation")


def test_ranking_model_chains_the_funnel_and_fits_it_in_full_space():
    import jax.numpy as jnp

    from onerec_jax.feedback import mall_labels
    from onerec_jax.rl import reward_model as rm

    logits = jnp.asarray([[0.3, -1.2, 2.0], [-4.0, 0.5, -0.7]])
    p = np.asarray(rm.probabilities(logits, "mall"))
    s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    np.testing.assert_allclose(p, np.cumprod(s, -1), rtol=1e-6)
    assert (np.diff(p, axis=-1) <= 0).all()  # P(order) <= P(cart) <= P(click)
    y = np.asarray([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    want = -(y * np.log(np.cumprod(s, -1)) + (1 - y) * np.log(1 - np.cumprod(s, -1)))
    np.testing.assert_allclose(np.asarray(rm._chained_bce(logits, jnp.asarray(y))), want, rtol=1e-5)
    np.testing.assert_allclose(
        float(rm.fused(logits[0], "mall")), float(p[0] @ np.asarray([1.0, 3.0, 10.0])), rtol=1e-6
    )
    flags = np.asarray([[schema.CLICK, schema.CLICK | schema.CART | schema.ORDER, 0]], np.uint8)
    lab, known = mall_labels({"target_flags": flags})
    np.testing.assert_array_equal(lab[0], [[1, 0, 0], [1, 1, 1], [0, 0, 0]])
    assert known.all()
    # A saturated wrong prediction (p ~ 1, label 0) still gets a gradient that lowers it.
    import jax

    g = jax.grad(lambda x: rm._chained_bce(x, jnp.zeros(3)).sum())(jnp.full(3, 30.0))
    assert (np.asarray(g) > 0).all() and np.isfinite(np.asarray(g)).all()


def test_gmv_objective_is_price_times_the_order_probability(world):
    """objective='gmv' scores a product by price x P(order): the world's exact one (reward=true)
    and the ranking model's (reward=model; the caller multiplies the model's P(order) by price)."""
    import jax
    import jax.numpy as jnp
    from _models import tiny_encoder

    from onerec_jax.evaluate import true_reward
    from onerec_jax.rl import reward_model as rm

    spec = schema.SchemaSpec(pos_len=4, life_len=8)
    raw_b = world.raw_batch(np.arange(8), spec.history_window)
    b = schema.build_batch(raw_b, spec)
    items = np.tile(np.arange(1, 13), (8, 1))
    items[:, -1] = 0
    eng = world.true_engagement(b["user_id"], b["request_ts"], np.maximum(items, 1))
    gmv = true_reward(world, b, items, "gmv")
    np.testing.assert_allclose(gmv[:, :-1], (world.price[items] * eng["order"])[:, :-1])
    assert np.isnan(gmv[:, -1]).all() and (gmv[:, :-1] >= 0).all()
    assert not np.allclose(gmv[:, :-1], true_reward(world, b, items)[:, :-1])
    model = rm.PScore(rm.PScoreConfig(tiny_encoder(world, 4, 8), hidden=16, tasks="mall"))
    x = {k: jnp.asarray(v) for k, v in b.items() if not k.startswith("target_")}
    params = model.init(jax.random.key(0), rm._inputs(x), jnp.asarray(items))["params"]
    p = rm.probabilities(model.apply({"params": params}, rm._inputs(x), jnp.asarray(items)), "mall")
    got = rm.make_scorer(model, "gmv")(params, x, jnp.asarray(items))
    np.testing.assert_allclose(np.asarray(got), np.asarray(p[..., 2]), rtol=1e-6)
    fused = rm.make_scorer(model)(params, x, jnp.asarray(items))
    np.testing.assert_allclose(np.asarray(fused), np.asarray(p) @ [1.0, 3.0, 10.0], rtol=1e-5)


def test_logged_feedback_counts_the_funnel(world):
    """On e-commerce data a logged target's own click/cart/order is its logged value
    (1 : 3 : 10), so logged_reward@K and reward=logged see the funnel."""
    from onerec_jax.feedback import logged_reward, logged_value

    b = schema.build_batch(world.raw_batch(np.arange(64), SPEC.history_window), SPEC)
    f = b["target_flags"].astype(np.int64)
    bit = {n: ((f & b_) > 0) for n, b_ in schema.BEHAVIOURS.items()}
    want = bit["click"] + 3.0 * bit["cart"] + 10.0 * bit["order"]
    np.testing.assert_allclose(logged_value(b), np.where(b["target_mask"], want, 0.0))
    r = logged_reward(b, b["target_item"][:, :1], 0.0)
    once = ((b["target_item"] == b["target_item"][:, :1]) & b["target_mask"]).sum(1) == 1
    np.testing.assert_allclose(r[once, 0], want[once, 0])  # (a repeat earns the mean)


@pytest.mark.slow
def test_onemall_end_to_end(tmp_path):
    """Pre-train the OneMall config briefly, fit the ranking model, align against it, then
    evaluate per scenario: every command of the README's OneMall section works together."""
    import json
    import subprocess
    import sys

    def onerec(*args):
        out = subprocess.run(
            [sys.executable, "-m", "onerec_jax.cli", *args], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    run, rmdir, al = tmp_path / "run", tmp_path / "rm", tmp_path / "al"
    small = ["--config.steps=30", "--config.eval_every=0", "--config.batch_size=16"]
    onerec("train", "--config", "onemall_tiny", "--workdir", str(run), *small)
    meta = onerec("reward-model", "--init", str(run), "--out", str(rmdir), "--steps", "20")
    assert {"auc/order/live", "auc_true_probability/order"} <= set(meta["eval"])
    summary = onerec(
        *("align", "--method", "ecpo", "--init", str(run), "--workdir", str(al)),
        *("--config.reward=model", f"--config.reward_model={rmdir}", "--config.steps=4"),
        *("--config.eval_requests=32", "--config.eval_beam=8"),
    )
    assert "reward_model@10" in summary["after"] and "orders@10" in summary["after"]
    for reward in ("model", "true"):  # the expected GMV as the reward: estimated, then exact
        gmv = onerec(
            *("align", "--method", "ecpo", "--init", str(run)),
            *("--workdir", str(tmp_path / f"gmv_{reward}"), "--config.objective=gmv"),
            *(f"--config.reward={reward}", f"--config.reward_model={rmdir}"),
            *("--config.steps=2", "--config.eval_requests=16", "--config.eval_beam=8"),
        )
        assert gmv["status"] == "finished" and "gmv@10" in gmv["after"]
    ev = onerec("eval", "--workdir", str(al), "--scenario", "live", "--max-requests", "16",
                "--beam", "8", "--json")  # fmt: skip
    assert ev["scenario"] == "live" and set(ev["scenarios"]) == {"live"}
    assert ev["scenarios"]["live"]["n_requests"] == 16
