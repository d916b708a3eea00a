"""What every baseline is fitted on: the training events of a logged source, per user, in order.

A user's training events are the ones the training split's sessions cover: all but the last two
when the user has >= 3 events (those two are the validation and test targets), else all of
them (`LogSource`'s rule, the one V1 and V2 train under). Nothing of the validation or test
targets is ever read here; a request's history at scoring time comes from the request itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from onerec_jax import ranking


@dataclasses.dataclass(frozen=True)
class TrainData:
    """Training events per user: user u's items are `item[offsets[u]:offsets[u + 1]]` in time
    order (u = 1..n_users; user 0 is padding and owns none)."""

    offsets: np.ndarray  # int64 [n_users + 2]
    item: np.ndarray  # int32 [N], 1..n_items
    n_items: int
    matrix: sp.csr_matrix  # users x items (1..n_items) event counts

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 2

    def sequence(self, u: int) -> np.ndarray:
        return self.item[self.offsets[u] : self.offsets[u + 1]]


def training_data(source: Any) -> TrainData:
    """The training events of a logged source (any split of it: the log is shared)."""
    if getattr(source, "kind", None) != "log":
        raise ValueError(
            "the baselines run on logged sources (movielens-100k, parquet:PATH), whose "
            f"leave-last-out splits they share with V1 and V2; got a {source.kind!r} source"
        )
    log = source.log
    kept, pos = ranking.training_events(log)
    offsets = np.concatenate([[0, 0], np.cumsum(kept)]).astype(np.int64)
    return TrainData(
        offsets, log.item[pos].astype(np.int32), log.n_items, ranking.training_matrix(log)
    )


def last_items(raw: dict[str, Any], length: int) -> np.ndarray:
    """[B, length] int32: each request's `length` most recent history items, right-aligned
    (the newest last), 0-padded on the left."""
    off = raw["hist_offsets"]
    out = np.zeros((len(off) - 1, length), np.int32)
    for i in range(len(off) - 1):
        h = raw["hist_item"][max(off[i], off[i + 1] - length) : off[i + 1]]
        if len(h):
            out[i, length - len(h) :] = h
    return out


class BestEpoch:
    """The epoch count of an iterative fit, chosen on validation: `offer` a scorer after each
    evaluated epoch; `best` is the one of the highest `validate(scorer)` (the last offered
    when there is no `validate`). Each scorer's `chosen` records its epoch and score."""

    def __init__(self, validate: Callable[[Any], float] | None):
        self.validate = validate
        self.best: Any = None
        self._score = -float("inf")

    def offer(self, scorer: Any, epoch: int) -> None:
        scorer.chosen = {"epochs": epoch}
        if self.validate is None:
            self.best = scorer
            return
        v = self.validate(scorer)
        scorer.chosen["validation_ndcg@10"] = v
        if self.best is None or v > self._score:
            self.best, self._score = scorer, v
