"""Sequential item-kNN: what followed each of the user's last few items in training sequences.

T[a, b] counts, over every user's training sequence, how often item b came `d` = 1..window
steps after item a, each occurrence weighted `gap_decay ** (d - 1)`; rows are divided by
(row sum) ** norm (norm 0: raw counts, 1: transition probabilities), so a popular
predecessor does not drown the rest. A request's score of item b is
    sum over its n most recent items h_1 (newest) .. h_n of  recency ** (k - 1) * T[h_k, b],
the strong simple baseline of session-based recommendation (item-to-item transitions with
recency weighting). Deterministic; `neighbours` keeps each row's largest entries only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from onerec_jax.baselines.data import TrainData, last_items

GRID = {
    "last": [1, 3, 10, 30],
    "window": [1, 3, 10, 30],
    "gap_decay": [0.25, 0.5, 1.0],
    "recency": [0.25, 0.5, 0.8, 1.0],
    "norm": [0.0, 0.5],
}
DEFAULT = {"last": 10, "window": 3, "gap_decay": 1.0, "recency": 0.8, "norm": 0.5}


def distinct(p: dict) -> bool:
    """Whether a grid point is not a copy of another: gap_decay means nothing with window 1,
    recency nothing with last 1 (only the value 1.0 is kept there)."""
    return not (p["window"] == 1 and p["gap_decay"] != 1.0) and not (
        p["last"] == 1 and p["recency"] != 1.0
    )


def transitions(data: TrainData, window: int, gap_decay: float) -> sp.csr_matrix:
    """[n_items + 1, n_items + 1] weighted counts of item b following item a within `window`."""
    rows, cols, vals = [], [], []
    user = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    for d in range(1, window + 1):
        same = user[d:] == user[:-d]  # pairs within one user's sequence only
        rows.append(data.item[:-d][same])
        cols.append(data.item[d:][same])
        vals.append(np.full(int(same.sum()), gap_decay ** (d - 1), np.float64))
    n = data.n_items + 1
    t = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    return t.tocsr()  # duplicates summed


class SeqKNN:
    """Scores from the transitions out of the request's most recent items (module docstring)."""

    def __init__(
        self,
        data: TrainData,
        last: int = 10,
        window: int = 3,
        gap_decay: float = 1.0,
        recency: float = 0.8,
        norm: float = 0.5,
        neighbours: int = 0,
    ):
        t = transitions(data, window, gap_decay).toarray()
        total = t.sum(1, keepdims=True)
        t = t / np.where(total > 0, total, 1.0) ** norm
        if 0 < neighbours < t.shape[1]:
            cut = -np.partition(-t, neighbours, axis=1)[:, neighbours : neighbours + 1]
            t = np.where(t > cut, t, 0.0)
        self.t = t
        self.last = last
        self.weights = recency ** np.arange(last)[::-1].astype(np.float64)  # newest weight 1

    def scores(self, raw: dict[str, Any]) -> np.ndarray:
        recent = last_items(raw, self.last)  # [B, last], newest last; 0 = padding (row 0 is 0)
        out = np.zeros((len(recent), self.t.shape[1]))
        for k, w in enumerate(self.weights):  # `last` row gathers, not one [B, last, N] block
            out += w * self.t[recent[:, k]]
        return out


def fit(data: TrainData, params: dict, seed: int = 0, validate: Any = None) -> SeqKNN:
    del seed, validate  # deterministic, nothing to stop early
    return SeqKNN(data, **params)
