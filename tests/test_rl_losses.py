"""The alignment losses against values and gradients worked out by hand (onerec_jax/rl/losses.py),
including every clipping case: A > 0 and A < 0, the ratio below, inside and above the bounds."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.data import schema
from onerec_jax.rl import losses, shaping


def value_and_grad(fn, p: float, p_old: float, adv: float, **kw) -> tuple[float, float]:
    """The loss of one rollout of probability p (old p_old) and advantage adv, and its
    derivative with respect to log p."""
    old = jnp.full((1, 1), math.log(p_old))
    a = jnp.full((1, 1), adv)
    loss, g = jax.value_and_grad(lambda lp: fn(lp, old, a, **kw))(jnp.full((1, 1), math.log(p)))
    return float(loss), float(g[0, 0])


# (p, p_old, A) -> (loss, d loss / d log p), eps = 0.2, delta = 0.1
ECPO_CASES = [
    # inside the band: ratio 0.55 / 0.5 = 1.1
    ((0.55, 0.5, 1.0), (-1.1, -1.1)),
    ((0.45, 0.5, -1.0), (0.9, 0.9)),
    # above the band, A > 0: pi'_old = max(0.7 / 1.3, 0.5) = 0.538, ratio 1.3 -> clipped 1.2
    ((0.7, 0.5, 1.0), (-1.2, 0.0)),
    # A < 0 and an old policy that found the item improbable: PPO's ratio would be 50; the
    # early clip makes it 1 + eps + delta = 1.3, unclipped by min(-1.3, -1.2)
    ((0.5, 0.01, -1.0), (1.3, 1.3)),
    # below the band: ratio 0.6; A > 0 keeps it (min(0.6, 0.8)), A < 0 clips to 0.8
    ((0.3, 0.5, 1.0), (-0.6, -0.6)),
    ((0.3, 0.5, -1.0), (0.8, 0.0)),
]


@pytest.mark.parametrize(("args", "want"), ECPO_CASES)
def test_ecpo_by_hand(args, want):
    loss, grad = value_and_grad(losses.ecpo_loss, *args, eps=0.2, delta=0.1)
    np.testing.assert_allclose([loss, grad], want, atol=1e-5)


# eps_low = 0.2, eps_high = 0.28; ratio = p / p_old
GPPO_CASES = [
    ((0.55, 0.5, 2.0), (-2.2, -2.2)),  # inside: plain r A
    # above the band with A > 0: PPO's value 1.28 A and no gradient; GPPO keeps 1.28 A d logp
    ((0.75, 0.5, 1.0), (-1.28, -1.28)),
    # below the band with A < 0: value 0.8 A, gradient 0.8 A d logp (PPO: none)
    ((0.25, 0.5, -1.0), (0.8, 0.8)),
    # the unclipped branch wins the min: r A with its own gradient
    ((0.25, 0.5, 1.0), (-0.5, -0.5)),
    ((0.75, 0.5, -1.0), (1.5, 1.5)),
]


@pytest.mark.parametrize(("args", "want"), GPPO_CASES)
def test_gppo_by_hand(args, want):
    loss, grad = value_and_grad(losses.gppo_loss, *args, eps_low=0.2, eps_high=0.28)
    np.testing.assert_allclose([loss, grad], want, atol=1e-5)


GBPO_CASES = [
    ((0.3, 0.6, 1.0), (-0.5, -0.5)),  # A >= 0: pi'_old = max(0.6, 0.3)
    ((0.6, 0.2, 1.0), (-1.0, -1.0)),  # A >= 0: pi'_old = max(0.2, 0.6): ratio capped at 1
    ((0.3, 0.1, -1.0), (0.3 / 0.7, 0.3 / 0.7)),  # A < 0: pi'_old = max(0.1, 1 - 0.3)
    ((0.3, 0.9, -1.0), (1 / 3, 1 / 3)),  # A < 0: pi'_old = max(0.9, 0.7)
    ((0.3, 0.1, 0.0), (0.0, 0.0)),  # A = 0 counts as A >= 0 and contributes nothing
]


@pytest.mark.parametrize(("args", "want"), GBPO_CASES)
def test_gbpo_by_hand(args, want):
    loss, grad = value_and_grad(losses.gbpo_loss, *args)
    np.testing.assert_allclose([loss, grad], want, atol=1e-5)


def test_gbpo_gradient_is_bounded_whatever_the_old_policy():
    """d ratio / d log p <= 1 for A >= 0 and <= pi / (1 - pi) for A < 0, even when the old
    policy gave the rollout probability 1e-30 (where pi / pi_old would be 1e29)."""
    lp = jnp.log(jnp.asarray([[0.2, 0.4, 0.2, 0.4]]))
    old = jnp.full((1, 4), -69.0)  # ~1e-30
    adv = jnp.asarray([[1.0, 1.0, -1.0, -1.0]])
    g = jax.grad(lambda x: losses.gbpo_loss(x, old, adv))(lp) * 4  # undo the mean over 4
    np.testing.assert_allclose(g[0], [-1.0, -1.0, 0.25, 0.4 / 0.6], rtol=1e-5)


def test_dpo_by_hand():
    """margin = (-1 - -2) - (-3 - -2.5) = 1.5; beta 0.5: loss = log(1 + e^-0.75), gradients
    -/+ beta * sigmoid(-0.75) for the chosen / rejected log-probabilities."""
    args = [jnp.asarray([v]) for v in (-1.0, -3.0, -2.0, -2.5)]
    loss, (gw, gl) = jax.value_and_grad(
        lambda w, lo: losses.dpo_loss(w, lo, args[2], args[3], beta=0.5), argnums=(0, 1)
    )(args[0], args[1])
    s = 1 / (1 + math.exp(0.75))
    np.testing.assert_allclose(
        [float(loss), float(gw[0]), float(gl[0])],
        [math.log1p(math.exp(-0.75)), -0.5 * s, 0.5 * s],
        rtol=1e-5,
    )


def testmasked_mean_ignores_masked_rollouts_and_an_empty_mask_gives_zero():
    lp = jnp.log(jnp.asarray([[0.55, 0.3]]))
    old = jnp.log(jnp.asarray([[0.5, 0.5]]))
    adv = jnp.asarray([[1.0, 5.0]])
    mask = jnp.asarray([[True, False]])
    np.testing.assert_allclose(losses.ecpo_loss(lp, old, adv, mask), -1.1, atol=1e-5)
    for fn in (losses.ecpo_loss, losses.gbpo_loss, losses.gppo_loss):
        none = fn(lp, old, adv, jnp.zeros((1, 2), bool))
        assert float(none) == 0.0
        g = jax.grad(lambda x, f=fn: f(x, old, adv, jnp.zeros((1, 2), bool)))(lp)
        assert np.all(np.asarray(g) == 0.0)


def test_ratios_in_log_space_survive_tiny_probabilities():
    lp = jnp.full((1, 1), -200.0)  # exp underflows to 0 in float32
    for fn in (losses.ecpo_loss, losses.gppo_loss):
        loss = fn(lp, lp, jnp.ones((1, 1)))
        np.testing.assert_allclose(float(loss), -1.0, atol=1e-6)  # ratio 1, not 0 / 0


def test_group_advantages_by_hand():
    adv = losses.group_advantages(jnp.asarray([[1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.0, 7.0]]))
    s = math.sqrt(1.25)
    np.testing.assert_allclose(adv[0], [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], rtol=1e-5)
    np.testing.assert_allclose(adv[1], 0.0)  # one reward for the whole group: no signal
    masked = losses.group_advantages(
        jnp.asarray([[1.0, 2.0, 3.0, 100.0]]), jnp.asarray([[True, True, True, False]])
    )
    np.testing.assert_allclose(masked[0], [-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], rtol=1e-5)


def test_duration_shaping_by_hand():
    """beta 2, eps 1 s: 30 s videos fall in bucket floor(log2 31) = 4, 10 s ones in bucket 3,
    300 s ones in bucket 8. The user's history in bucket 4 played 5, 10, 20, 25 s (one padded
    slot, invalid, must not count); in bucket 3, 8 s."""
    hist_play = np.asarray([[5e3, 10e3, 20e3, 25e3, 8e3, 0.0]])
    hist_dur = np.asarray([[30e3, 30e3, 30e3, 30e3, 10e3, 30e3]])
    valid = np.asarray([[True, True, True, True, True, False]])
    assert shaping.duration_bucket(np.asarray([30e3, 10e3, 300e3])).tolist() == [4, 3, 8]
    play = np.asarray([[26e3, 22e3, 15e3, 26e3, 200e3, 20e3, 9e3]])
    dur = np.asarray([[30e3, 30e3, 30e3, 30e3, 300e3, 30e3, 10e3]])
    disliked = np.asarray([[False, False, False, True, False, False, False]])
    q, n = shaping.play_percentile(play, dur, hist_play, hist_dur, valid)
    # 26 s beats all 4; 22 s beats 3 (q 0.75, the top quarter's edge); 15 s beats 2;
    # 20 s beats 2 and ties 1 (2.5 / 4); bucket 8 is empty; 9 s beats the one 8 s play
    np.testing.assert_allclose(q[0], [1.0, 0.75, 0.5, 1.0, 0.0, 0.625, 1.0])
    assert n[0].tolist() == [4, 4, 4, 4, 0, 4, 1]
    adv = shaping.duration_advantage(play, dur, disliked, hist_play, hist_dur, valid)
    assert adv[0].tolist() == [1.0, 1.0, 0.0, -1.0, 0.0, 0.0, 1.0]


def test_duration_shaping_rejects_bad_parameters():
    with pytest.raises(ValueError, match="beta > 1"):
        shaping.duration_bucket(np.asarray([1e3]), beta=1.0)
    one = np.ones((1, 1))
    with pytest.raises(ValueError, match="top share"):
        shaping.duration_advantage(one, one, one > 0, one, one, one > 0, top=0.0)


def test_improbable_rollouts_give_finite_losses_and_gradients():
    """Log-probabilities of -95 (a long session's) and log-ratios of -120 / +100: no method may
    go through exp and back (0 / 0, log 0)."""
    lp = jnp.asarray([[-95.0, -95.0, -120.0, 100.0]])
    old = jnp.asarray([[-95.0, -95.0, 0.0, 0.0]])
    adv = jnp.asarray([[1.0, -1.0, -1.0, 1.0]])
    for fn in (losses.ecpo_loss, losses.gbpo_loss, losses.gppo_loss):
        loss, g = jax.value_and_grad(lambda x, f=fn: f(x, old, adv))(lp)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g))), fn.__name__
    # GBPO at equal tiny probabilities: pi'_old = pi for A >= 0 (ratio 1), and
    # max(pi_old, 1 - pi) ~ 1 for A < 0 (ratio ~ e^-95 ~ 0).
    gb = jax.grad(lambda x: losses.gbpo_loss(x, old[:, :2], adv[:, :2]))(lp[:, :2]) * 2
    np.testing.assert_allclose(np.asarray(gb)[0], [-1.0, 0.0], atol=1e-6)


def test_preference_pairs_by_hand():
    """Chosen = the best legal rollout, rejected = the worst; no pair with fewer than two legal
    rollouts or one reward for all; `share` keeps a random subset."""
    reward = np.asarray([[0.3, 0.9, 0.1, 5.0], [0.2, 0.2, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0]])
    legal = np.asarray([[True, True, True, False], [True] * 4, [True, False, False, False]])
    pair, ok = shaping.preference_pairs(reward, legal, 1.0, np.random.default_rng(0))
    assert pair[0].tolist() == [1, 2]  # 5.0 is illegal
    assert ok.tolist() == [True, False, False]
    _, none = shaping.preference_pairs(reward, legal, 1e-9, np.random.default_rng(0))
    assert not none.any()


def test_session_play_time_counts_valid_items_only():
    host = {
        "target_play_ms": np.asarray([[1e3, 2e3, np.nan], [4e3, 8e3, 16e3]], np.float32),
        "target_mask": np.asarray([[True, True, False], [True, False, True]]),
    }
    np.testing.assert_allclose(shaping.session_play_s(host), [3.0, 20.0])


def test_world_history_is_the_users_sessions_before_the_request():
    from onerec_jax.data import sources

    world = sources.open_source("world:tiny")
    spec = schema.SchemaSpec(pos_len=8, life_len=16)
    raw = world.raw_batch(np.arange(3), None, spec)
    play, dur, valid = shaping.world_history(world, raw["user_id"], raw["request_ts"], 4)
    for i, (u, ts) in enumerate(zip(raw["user_id"], raw["request_ts"], strict=True)):
        s = int(world.session_of(np.asarray([u]), np.asarray([ts]))[0])
        ev = world.session_events(int(u), np.arange(max(0, s - 4), s))
        n = len(ev["play_ms"])
        assert valid[i].sum() == n and valid[i, :n].all()
        np.testing.assert_array_equal(play[i, :n], ev["play_ms"])
        np.testing.assert_array_equal(dur[i, :n], ev["dur_ms"])
        # the request's own history ends with these events (the same world, the same order)
        h = raw["hist_play_ms"][raw["hist_offsets"][i] : raw["hist_offsets"][i + 1]]
        np.testing.assert_array_equal(h[-n:], ev["play_ms"])
