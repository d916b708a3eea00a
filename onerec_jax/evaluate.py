"""Ranking metrics and the two baselines every model is compared with, on one protocol.

Protocol (logged sources, e.g. MovieLens-100k): leave-last-out, the held-out target of each user
is ranked against every item the user has not interacted with before the target (full ranking,
no sampled negatives); ties in time were broken by item id when the log was built.

Recall@K = |top-K ∩ targets| / |targets|; NDCG@K = sum over hits of 1 / log2(rank + 2),
divided by the ideal DCG of the targets; both averaged over requests, K in (1, 5, 10, 50).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from onerec_jax.data import schema

KS = (1, 5, 10, 50)


def rank_metrics(
    ranked_BxK: np.ndarray, targets_BxM: np.ndarray, mask_BxM: np.ndarray, ks=KS
) -> dict[str, float]:
    """Recall@K and NDCG@K of ranked item lists against (padded) target sets."""
    ranked = np.asarray(ranked_BxK)
    targets = np.where(mask_BxM, targets_BxM, -1)
    n_t = np.maximum(mask_BxM.sum(1), 1)
    keep = mask_BxM.any(1)
    hit = (ranked[:, :, None] == targets[:, None, :]).any(-1) & (ranked > 0)  # [B, K]
    gain = hit / np.log2(np.arange(ranked.shape[1]) + 2)[None, :]
    out = {}
    for k in ks:
        ideal = np.array([np.sum(1 / np.log2(np.arange(min(t, k)) + 2)) for t in n_t])
        out[f"recall@{k}"] = float((hit[:, :k].sum(1) / n_t)[keep].mean())
        out[f"ndcg@{k}"] = float((gain[:, :k].sum(1) / ideal)[keep].mean())
    return out


def training_matrix(log: Any) -> sp.csr_matrix:
    """Users x items (1..n_items) counts of training events: a user's last two events are
    validation and test when the user has >= 3 (the LogSource rule)."""
    n_ev = np.diff(log.offsets)[1:]
    held = np.where(n_ev >= 3, 2, 0)
    pos = schema.ranges(log.offsets[1:-1], n_ev - held)
    users = np.repeat(np.arange(1, len(n_ev) + 1), n_ev - held)
    m = sp.coo_matrix(
        (np.ones(len(pos), np.float32), (users, log.item[pos])),
        shape=(len(n_ev) + 1, log.n_items + 1),
    )
    return m.tocsr()


def _history(raw: dict[str, Any]) -> sp.csr_matrix:
    off = raw["hist_offsets"]
    b = len(off) - 1
    rows = np.repeat(np.arange(b), np.diff(off))
    # The row count is explicit: a trailing request with no history must still get its row.
    width = int(raw["hist_item"].max(initial=0)) + 1
    return sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, raw["hist_item"])), shape=(b, width)
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
        h = _history(raw)
        h.resize((h.shape[0], self.sim.shape[0]))
        return np.asarray(h @ self.sim)


def rank_unseen(scores_BxN: np.ndarray, raw: dict[str, Any], k: int) -> np.ndarray:
    """Top-k item ids per request, excluding padding and the request's history items."""
    s = np.array(scores_BxN, np.float64)
    s[:, 0] = -np.inf
    off = raw["hist_offsets"]
    rows = np.repeat(np.arange(len(off) - 1), np.diff(off))
    s[rows, raw["hist_item"]] = -np.inf
    # Stable order: higher score first, ties by item id (argsort of -score is stable).
    part = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(s, part, 1)), axis=1)
    return np.take_along_axis(part, order, 1)


def evaluate_scorer(source: Any, scorer: Any, k_max: int = 50, batch: int = 512) -> dict:
    """Metrics of `scorer.scores(raw) -> [B, n_items + 1]` over every example of `source`."""
    ranked, targets, masks = [], [], []
    for start in range(0, len(source), batch):
        idx = np.arange(start, min(start + batch, len(source)))
        raw = source.raw_batch(idx)
        ranked.append(rank_unseen(scorer.scores(raw), raw, k_max))
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
    return out
