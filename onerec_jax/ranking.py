"""Ranking metrics and the two baselines every model is compared with, on one protocol.

The protocol belongs to the source, never to a model's config (`protocol_of`):
  * logged sources where a user meets an item once (MovieLens-100k: one rating per movie) drop
    every item of the user's *whole* history before the target from the ranking - the standard
    full-ranking protocol; the model's context window plays no part in it (`seen_items`);
  * sources where users come back to items (the world's short-video feed re-exposes 40-50 % of
    its targets; a log with a repeated (user, item)) rank all items, so every target is
    reachable and a re-exposure is a recommendation like any other.
A source may state its own rule with a `drop_seen` attribute. Leave-last-out on logs; full
ranking, no sampled negatives; ties in time were broken by item id when the log was built.

Recall@K = |top-K ∩ targets| / |targets|; NDCG@K = sum over hits of 1 / log2(rank + 2),
divided by the ideal DCG of the targets; both averaged over requests, K in (1, 5, 10, 50).
`targets` is the set of a request's distinct targets: an item logged twice in one session is
one item to recall (the ranked list holds it once).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from onerec_jax.data import schema

KS = (1, 5, 10, 50)


def _users_repeat_items(log: Any) -> bool:
    """Whether some user of an `EventLog` has one item in two events."""
    pair = log.user_of_event().astype(np.int64) * (log.n_items + 1) + log.item
    return len(np.unique(pair)) < len(pair)


def protocol_of(source: Any) -> dict[str, Any]:
    """The evaluation protocol of a source (see the module docstring); recorded in eval JSON."""
    drop = getattr(source, "drop_seen", None)
    if drop is None:
        if source.kind == "world":
            drop = False  # a feed re-exposes items: every target stays reachable
        elif source.kind == "log":
            # Consume-once data (MovieLens) drops the history; a log of re-watches must not,
            # or its repeat targets would be unreachable yet counted.
            drop = not _users_repeat_items(source.log)
        else:
            raise ValueError(f"no evaluation protocol for a source of kind {source.kind!r}")
    return {
        "drop_seen": bool(drop),
        "seen_window": "full history" if drop else "none",
        "dedup_targets": True,
    }


def seen_items(
    source: Any, indices: np.ndarray, protocol: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The items each request may not be recommended, ragged as `hist_offsets`/`hist_item`: the
    user's whole history before the target under drop-seen (whatever window a model reads),
    else none."""
    protocol = protocol_of(source) if protocol is None else protocol
    idx = np.asarray(indices, np.int64).reshape(-1)
    if not protocol["drop_seen"]:
        return {
            "hist_offsets": np.zeros(len(idx) + 1, np.int64),
            "hist_item": np.zeros(0, np.int64),
        }
    raw = source.raw_batch(idx, None)  # no window, no spec: the full history
    return {"hist_offsets": raw["hist_offsets"], "hist_item": raw["hist_item"]}


def rank_metrics(
    ranked_BxK: np.ndarray, targets_BxM: np.ndarray, mask_BxM: np.ndarray, ks=KS
) -> dict[str, float]:
    """Recall@K and NDCG@K of ranked item lists against (padded) target sets."""
    ranked = np.asarray(ranked_BxK)
    targets = np.where(mask_BxM, targets_BxM, -1)
    # Distinct valid targets per request: a repeat must not add to the denominator or the IDCG,
    # since a ranked list (unique items) can hit it only once.
    t_sorted = np.sort(targets, axis=1)
    first = np.concatenate([np.ones_like(t_sorted[:, :1], bool), np.diff(t_sorted, axis=1) != 0], 1)
    n_t = np.maximum((first & (t_sorted >= 0)).sum(1), 1)
    keep = mask_BxM.any(1)
    hit = (ranked[:, :, None] == targets[:, None, :]).any(-1) & (ranked > 0)  # [B, K]
    gain = hit / np.log2(np.arange(ranked.shape[1]) + 2)[None, :]
    out = {}
    for k in ks:
        ideal = np.array([np.sum(1 / np.log2(np.arange(min(t, k)) + 2)) for t in n_t])
        out[f"recall@{k}"] = float((hit[:, :k].sum(1) / n_t)[keep].mean())
        out[f"ndcg@{k}"] = float((gain[:, :k].sum(1) / ideal)[keep].mean())
    return out


def training_events(log: Any) -> tuple[np.ndarray, np.ndarray]:
    """(events per user [n_users], log positions of every training event in order): a user's
    last two events are validation and test when the user has >= 3 (the LogSource rule)."""
    n_ev = np.diff(log.offsets)[1:]
    kept = n_ev - np.where(n_ev >= 3, 2, 0)
    return kept, schema.ranges(log.offsets[1:-1], kept)


def training_matrix(log: Any) -> sp.csr_matrix:
    """Users x items (1..n_items) counts of training events (`training_events`)."""
    kept, pos = training_events(log)
    users = np.repeat(np.arange(1, len(kept) + 1), kept)
    m = sp.coo_matrix(
        (np.ones(len(pos), np.float32), (users, log.item[pos])),
        shape=(len(kept) + 1, log.n_items + 1),
    )
    return m.tocsr()


def history_matrix(raw: dict[str, Any], n_columns: int) -> sp.csr_matrix:
    """Requests x items [B, n_columns] counts of each request's history events."""
    off = raw["hist_offsets"]
    b = len(off) - 1
    rows = np.repeat(np.arange(b), np.diff(off))
    # The row count is explicit: a trailing request with no history must still get its row.
    return sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, raw["hist_item"])), shape=(b, n_columns)
    )


class Popularity:
    """Score = number of training interactions of the item."""

    def __init__(self, train: sp.csr_matrix):
        self.counts = np.asarray(train.sum(0)).ravel().astype(np.float64)

    def scores(self, raw: dict[str, Any]) -> np.ndarray:
        b = len(raw["hist_offsets"]) - 1
        return np.broadcast_to(self.counts, (b, len(self.counts))).copy()


class ItemKNN:
    """Item-to-item kNN: cosine similarity of item columns of the training matrix, each item
    keeping its `k` nearest neighbours; score = sum of similarities to the user's history."""

    def __init__(self, train: sp.csr_matrix, k: int = 100):
        x = (train > 0).astype(np.float32).tocsc()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(0)).ravel())
        norms[norms == 0] = 1.0
        sim = (x.T @ x).toarray() / norms[:, None] / norms[None, :]
        np.fill_diagonal(sim, 0.0)
        if k < sim.shape[1]:
            cut = -np.partition(-sim, k, axis=1)[:, k : k + 1]
            sim = np.where(sim > cut, sim, 0.0)
        self.sim = sim

    def scores(self, raw: dict[str, Any]) -> np.ndarray:
        return np.asarray(history_matrix(raw, self.sim.shape[0]) @ self.sim)


def rank_unseen(scores_BxN: np.ndarray, seen: dict[str, Any], k: int) -> np.ndarray:
    """Top-k item ids per request, excluding padding and the request's `seen` items (ragged
    `hist_offsets`/`hist_item`, as `seen_items` gives them)."""
    s = np.array(scores_BxN, np.float64)
    s[:, 0] = -np.inf
    off = seen["hist_offsets"]
    rows = np.repeat(np.arange(len(off) - 1), np.diff(off))
    s[rows, seen["hist_item"]] = -np.inf
    # Stable order: higher score first, ties by item id (argsort of -score is stable).
    if k < s.shape[1]:
        part = np.argpartition(-s, k, axis=1)[:, :k]
    else:  # a catalogue smaller than k (a user's own log): every item, padded below
        part = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    order = np.lexsort((part, -np.take_along_axis(s, part, 1)), axis=1)
    ranked = np.take_along_axis(part, order, 1)
    # Excluded items that only fill a short list are padding (0), never a recommendation.
    ranked = np.where(np.isneginf(np.take_along_axis(s, ranked, 1)), 0, ranked)
    if ranked.shape[1] < k:
        ranked = np.pad(ranked, ((0, 0), (0, k - ranked.shape[1])))
    return ranked


def evaluate_scorer(source: Any, scorer: Any, k_max: int = 50, batch: int = 512) -> dict:
    """Metrics of `scorer.scores(raw) -> [B, n_items + 1]` over every example of `source`,
    on the source's protocol (the one `onerec eval` scores models with)."""
    protocol = protocol_of(source)
    ranked, targets, masks = [], [], []
    for start in range(0, len(source), batch):
        idx = np.arange(start, min(start + batch, len(source)))
        raw = source.raw_batch(idx)
        seen = seen_items(source, idx, protocol)
        ranked.append(rank_unseen(scorer.scores(raw), seen, k_max))
        t_off = raw["target_offsets"]
        m = np.diff(t_off)
        width = int(m.max())
        tgt = np.zeros((len(idx), width), np.int64)
        msk = np.arange(width)[None, :] < m[:, None]
        tgt[msk] = raw["target_item"]
        targets.append(tgt)
        masks.append(msk)
    w = max(t.shape[1] for t in targets)
    pad = lambda a, fill: np.pad(a, ((0, 0), (0, w - a.shape[1])), constant_values=fill)
    out = rank_metrics(
        np.concatenate(ranked),
        np.concatenate([pad(t, 0) for t in targets]),
        np.concatenate([pad(m, False) for m in masks]),
    )
    out["n_requests"] = int(sum(len(r) for r in ranked))
    out["protocol"] = protocol
    return out
