"""Rewards into training signals on the host: OneRec-V2's duration-aware shaping, DPO's
preference pairs, RSFT's play-time filter.

Duration-aware shaping (OneRec-V2): a play time means little without the video's length and the
user's habits, so an exposure is judged against the same user's other exposures of similar
length. Durations fall in log buckets b = floor(log_beta(d + eps)); within its bucket an
exposure's play time has the percentile q among the user's history plays of that bucket (the
share of them strictly shorter, ties counting half). The advantage is -1 for a dislike, +1 for
q in the top `top` share (q >= 1 - top) without a dislike, else 0; an exposure whose bucket
holds none of the user's history gets 0 unless disliked.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def duration_bucket(dur_ms: np.ndarray, beta: float = 2.0, eps: float = 1.0) -> np.ndarray:
    """b = floor(log_beta(d + eps)) of durations in seconds (int64, same shape)."""
    if beta <= 1.0:
        raise ValueError(f"duration buckets need a log base beta > 1, got {beta}")
    d = np.asarray(dur_ms, np.float64) / 1000.0
    return np.floor(np.log(np.maximum(d, 0.0) + eps) / np.log(beta)).astype(np.int64)


def play_percentile(
    play_ms_BxG: np.ndarray,
    dur_ms_BxG: np.ndarray,
    hist_play_ms_BxH: np.ndarray,
    hist_dur_ms_BxH: np.ndarray,
    hist_valid_BxH: np.ndarray,
    beta: float = 2.0,
    eps: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(q [B, G], n [B, G]): each exposure's play-time percentile among its user's valid history
    plays in its duration bucket, and how many such plays there are (q is 0 where n is 0)."""
    b_g = duration_bucket(dur_ms_BxG, beta, eps)[:, :, None]
    b_h = duration_bucket(hist_dur_ms_BxH, beta, eps)[:, None, :]
    same = (b_g == b_h) & np.asarray(hist_valid_BxH, bool)[:, None, :]  # [B, G, H]
    p_g = np.asarray(play_ms_BxG, np.float64)[:, :, None]
    p_h = np.asarray(hist_play_ms_BxH, np.float64)[:, None, :]
    below = np.sum(same & (p_h < p_g), -1) + 0.5 * np.sum(same & (p_h == p_g), -1)
    n = np.sum(same, -1)
    return np.where(n > 0, below / np.maximum(n, 1), 0.0), n


def duration_advantage(
    play_ms_BxG: np.ndarray,
    dur_ms_BxG: np.ndarray,
    disliked_BxG: np.ndarray,
    hist_play_ms_BxH: np.ndarray,
    hist_dur_ms_BxH: np.ndarray,
    hist_valid_BxH: np.ndarray,
    top: float = 0.25,
    beta: float = 2.0,
    eps: float = 1.0,
) -> np.ndarray:
    """Advantages in {-1, 0, +1} [B, G] float32 (module docstring)."""
    if not 0.0 < top <= 1.0:
        raise ValueError(f"the top share must be in (0, 1], got {top}")
    q, n = play_percentile(
        play_ms_BxG, dur_ms_BxG, hist_play_ms_BxH, hist_dur_ms_BxH, hist_valid_BxH, beta, eps
    )
    disliked = np.asarray(disliked_BxG, bool)
    good = (n > 0) & (q >= 1.0 - top) & ~disliked
    return np.where(disliked, -1.0, np.where(good, 1.0, 0.0)).astype(np.float32)


def session_play_s(host: dict) -> np.ndarray:
    """Seconds played of each request's logged target session [B] (its valid items)."""
    play = np.nan_to_num(np.asarray(host["target_play_ms"], np.float64))
    return np.sum(np.where(host["target_mask"], play, 0.0), -1) / 1000.0


def rsft_threshold(run: Any, keep: float, n: int = 2048) -> float:
    """The play time below which RSFT drops a session: the (1 - keep) quantile over `n`
    training requests drawn with a fixed permutation (a property of the data, the same on
    every resume). Refused when the source logs no play time, or when play times tie so much
    that the threshold would keep far more than `keep` of the sessions."""
    from onerec_jax.data import schema

    src = run.source
    n = min(n, len(src))
    # The world's splits hold ~1e12 requests: draw indices, never a permutation of them all.
    big = len(src) > n
    idx = np.unique(np.random.default_rng(0).integers(0, len(src), n)) if big else np.arange(n)
    host = schema.build_batch(src.raw_batch(idx, run.spec.history_window, run.spec), run.spec)
    known = np.isfinite(np.where(host["target_mask"], host["target_play_ms"], 0.0)).all(-1)
    if not known.any():
        raise ValueError(f"{run.cfg.source}: RSFT needs logged play time; this source has none")
    s = session_play_s({k: v[known] for k, v in host.items() if k.startswith("target_")})
    t = float(np.quantile(s, 1.0 - keep))
    if np.mean(s >= t) > keep + 0.25:
        raise ValueError(
            f"{run.cfg.source}: {np.mean(s >= t):.0%} of sessions play at least the RSFT "
            f"threshold ({t:.1f} s), not ~{keep:.0%}: play times tie too much for this filter"
        )
    return t


def preference_pairs(
    reward: np.ndarray, legal: np.ndarray, share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(index [B, 2] of each request's chosen (best reward) and rejected (worst) rollout, mask
    [B]): a pair where the request has two legal rollouts of different rewards, kept for a
    random `share` of the requests."""
    r_hi = np.where(legal, reward, -np.inf)
    r_lo = np.where(legal, reward, np.inf)
    best, worst = np.argmax(r_hi, -1), np.argmin(r_lo, -1)
    rows = np.arange(len(reward))
    ok = (legal.sum(-1) >= 2) & (r_hi[rows, best] > r_lo[rows, worst])
    ok &= rng.random(len(reward)) < share
    return np.stack([best, worst], -1), ok


def world_history(
    world: Any, user_ids: np.ndarray, request_ts: np.ndarray, n_sessions: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(play_ms [B, H], dur_ms [B, H], valid [B, H]): the exposures of each request's user in
    the `n_sessions` sessions before the request (the world regenerates them exactly)."""
    rows = []
    for u, ts in zip(np.asarray(user_ids), np.asarray(request_ts), strict=True):
        s = int(world.session_of(np.asarray([u]), np.asarray([ts]))[0])
        ev = world.session_events(int(u), np.arange(max(0, s - n_sessions), s))
        rows.append((ev["play_ms"], ev["dur_ms"]))
    h = max(1, max(len(p) for p, _ in rows))
    play, dur = np.zeros((len(rows), h)), np.ones((len(rows), h))
    valid = np.zeros((len(rows), h), bool)
    for i, (p, d) in enumerate(rows):
        play[i, : len(p)], dur[i, : len(p)], valid[i, : len(p)] = p, d, True
    return play, dur, valid


def world_duration_advantage(
    world: Any, host: dict, items: np.ndarray, history_sessions: int
) -> np.ndarray:
    """OneRec-V2's shaped advantages [B, G] of point-wise rollouts on the world: each item's
    expected play time (the world's play fraction x its duration) and an expected dislike
    (p >= 1/2) against the user's last `history_sessions` sessions (`duration_advantage`).
    Session rollouts: their first item."""
    first = np.maximum(items[:, :, 0], 1)
    e = world.true_engagement(host["user_id"], host["request_ts"], first)
    dur = world.dur_ms[first].astype(np.float64)
    h_play, h_dur, h_valid = world_history(
        world, host["user_id"], host["request_ts"], history_sessions
    )
    play = e["play_frac"] * dur
    return duration_advantage(play, dur, e["dislike"] >= 0.5, h_play, h_dur, h_valid)
