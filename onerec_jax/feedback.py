"""Logged feedback as labels and as a reward: what a source logged about each target exposure
(the played share of the video, like, follow, comment, share, dislike), and the one number the
world's reward weights make of them; on the e-commerce world the labels are the funnel's
click, add-to-cart and order (`MALL_LABELS`). The reward model learns these labels
(onerec_jax/rl/reward_model.py); `reward=logged` alignment and every evaluation's
`logged_reward@K` score recommendations with them."""

from __future__ import annotations

import numpy as np

from onerec_jax.data import schema
from onerec_jax.data.mall_config import MALL_REWARD_WEIGHTS
from onerec_jax.data.world_config import REWARD_WEIGHTS

LABELS = ("play_frac", "like", "follow", "comment", "share", "dislike")
_BITS = {
    "like": schema.LIKE,
    "follow": schema.FOLLOW,
    "comment": schema.COMMENT,
    "share": schema.SHARE,
    "dislike": schema.DISLIKE,
}
WEIGHTS = np.asarray([REWARD_WEIGHTS[k] for k in LABELS], np.float32)
# E-commerce: each exposure's click, add-to-cart and order (each only after the one before).
MALL_LABELS = ("click", "cart", "order")
MALL_WEIGHTS = np.asarray([MALL_REWARD_WEIGHTS[k] for k in MALL_LABELS], np.float32)
_MALL_BITS = (schema.CLICK, schema.CART, schema.ORDER)


def mall_labels(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Label targets [B, M, 3] (click, cart, order) of a batch's target exposures, all known."""
    flags = batch["target_flags"].astype(np.int64)
    y = np.stack([((flags & bit) != 0) for bit in _MALL_BITS], -1).astype(np.float32)
    return y, np.ones(y.shape, bool)


def labels(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Label targets [B, M, 6] of a batch's logged target exposures (play_frac soft), and
    which are known [B, M, 6]: the play share only where the source logs play time and
    duration (NaN where it does not: such a label is left out, not taken as 0)."""
    play = np.asarray(batch["target_play_ms"], np.float64)
    dur = np.asarray(batch["target_dur_ms"], np.float64)
    has_play = np.isfinite(play) & np.isfinite(dur) & (dur > 0)
    frac = np.where(has_play, np.clip(play / np.where(has_play, dur, 1.0), 0.0, 1.0), 0.0)
    flags = batch["target_flags"].astype(np.int64)
    cols = [frac] + [((flags & bit) != 0).astype(np.float32) for bit in _BITS.values()]
    known = np.stack([has_play] + [np.ones_like(has_play)] * len(_BITS), -1)
    return np.stack(cols, -1).astype(np.float32), known


def logged_value(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The fused score of each logged target exposure's own feedback [B, M] (REWARD_WEIGHTS x
    its labels, the ones the source logs; 0 at padding): the P-Score's target, as logged. An
    e-commerce exposure's click, cart and order count with MALL_REWARD_WEIGHTS (a source sets
    either the video labels or the funnel's, so the two sums never mix)."""
    y, known = labels(batch)
    v = np.sum(np.where(known, y, 0.0) * WEIGHTS, -1)
    v = v + np.sum(mall_labels(batch)[0] * MALL_WEIGHTS, -1)
    return np.where(batch["target_mask"], v, 0.0).astype(np.float32)


def logged_reward(batch: dict[str, np.ndarray], items_BxN: np.ndarray, miss: float) -> np.ndarray:
    """Rewards [B, N] of recommending `items` from logged feedback alone: an item that is one
    of the request's logged target exposures earns that exposure's `logged_value` (the mean
    over its exposures, if logged twice); any other item earns `miss` (nothing is known of
    it); NaN for item 0 (no item)."""
    items = np.asarray(items_BxN)
    hit = (items[:, :, None] == batch["target_item"][:, None, :]) & batch["target_mask"][:, None]
    n = hit.sum(-1)
    total = np.einsum("bnm,bm->bn", hit.astype(np.float64), logged_value(batch))
    r = np.where(n > 0, total / np.maximum(n, 1), miss)
    return np.where(items > 0, r, np.nan)
