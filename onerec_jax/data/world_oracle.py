"""The session world's probability model, and what logs cannot tell but the world can: the
logging policy over topics and the exact engagement probabilities of any (request, item) (the
generator samples its events from them), the exact expected reward of any recommendation, the
log-probability of an item under the logging policy, and the entropy of the next exposure.

A mixin of `World` (onerec_jax/data/world.py): it reads the world's user model (`_user`,
`_interest`, `session_of`, `_session_start`, `requests`), its config and its item tables
(`topic`, `topic2`, `quality`, `dur_ms`, `_log_q`, `topic_entropy`).
"""

from __future__ import annotations

import numpy as np

from onerec_jax.data import hashing as hs
from onerec_jax.data.world_config import ENGAGEMENT, REWARD_WEIGHTS


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class WorldOracle:
    """Exact expectations of the world's generative model (see the module docstring)."""

    def _logging_policy(self, user: dict, pi: np.ndarray) -> np.ndarray:
        """pi_log over all topics, [..., T], from interests pi [..., K]."""
        c = self.config
        out = np.full((int(np.prod(pi.shape[:-1])), c.n_topics), c.explore / c.n_topics)
        topics = user["topics"].reshape(len(out), -1)
        rows = np.arange(len(out))[:, None]
        # add.at, not fancy assignment: two interests may share a topic and must accumulate.
        np.add.at(out, (rows, topics), (1 - c.explore) * pi.reshape(len(out), -1))
        return out.reshape((*pi.shape[:-1], c.n_topics))

    def _logged_topic(self, h: np.ndarray, topics: np.ndarray, pi: np.ndarray) -> np.ndarray:
        """The logging policy's topic of each event (hash h): a uniform one with probability
        `explore`, else one of the user's interest topics by their weights pi."""
        c = self.config
        explore_u, pick_u = hs.unit32_pair(hs.stream(h, 0))
        pick = (pick_u[:, None] > np.cumsum(pi, -1)[:, :-1]).sum(-1)
        return np.where(
            explore_u < c.explore,
            np.floor(pick_u * c.n_topics).astype(np.int64),
            np.take_along_axis(topics, pick[:, None], -1)[:, 0],
        )

    def _probs(self, t: np.ndarray, pi: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Exact engagement expectations for items [..., N] given interest topics t and weights
        pi [..., K]."""
        ti, t2 = self.topic[items][..., None], self.topic2[items][..., None]
        aff = (pi[..., None, :] * ((t[..., None, :] == ti) + 0.5 * (t[..., None, :] == t2))).sum(-1)
        q = self.quality[items].astype(np.float64)
        ldur = np.log(self.dur_ms[items].astype(np.float64) / 30_000.0)
        out = {}
        for name, (b, wa, wq, wd) in ENGAGEMENT.items():
            out[name] = _sigmoid(b + wa * aff + wq * q + wd * ldur)
        return out

    def true_engagement(
        self, user_ids: np.ndarray, request_ts: np.ndarray, item_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Expected engagement of recommending `item_ids` [B, N] to the requests (user_ids [B],
        request_ts [B]): probabilities of each action, expected play fraction, and `reward`."""
        user_ids, request_ts = np.asarray(user_ids), np.asarray(request_ts)
        items = np.asarray(item_ids)
        if items.min(initial=1) < 1 or items.max(initial=1) > self.n_items:
            raise ValueError(f"item ids must be in [1, {self.n_items}]")
        user = self._user(user_ids)
        pi = self._interest(user, self.session_of(user_ids, request_ts))
        p = self._probs(user["topics"], pi, items)
        p["reward"] = sum(REWARD_WEIGHTS[n] * p[n] for n in REWARD_WEIGHTS)
        return p

    def logging_distribution(self, user_ids: np.ndarray, request_ts: np.ndarray) -> np.ndarray:
        """pi_log over topics [B, T] at the given requests."""
        user = self._user(np.asarray(user_ids))
        pi = self._interest(user, self.session_of(user_ids, request_ts))
        return self._logging_policy(user, pi)

    def logging_logprob(
        self, user_ids: np.ndarray, request_ts: np.ndarray, item_ids: np.ndarray
    ) -> np.ndarray:
        """log p(item | request) under the logging policy, [B, N] (nats)."""
        items = np.asarray(item_ids)
        pt = self.logging_distribution(user_ids, request_ts)
        return (
            np.log(np.take_along_axis(pt, self.topic[items].astype(np.int64), -1))
            + self._log_q[items]
        )

    def next_item_entropy(self, user_ids: np.ndarray, request_ts: np.ndarray) -> np.ndarray:
        """Exact entropy (nats) of the next exposure given the requests' latent state, [B]."""
        pt = self.logging_distribution(user_ids, request_ts)
        return -(pt * np.log(pt)).sum(-1) + pt @ self.topic_entropy

    def entropy_floor(self, n_samples: int = 4096) -> tuple[float, float]:
        """Mean next-item entropy over this split's first `n_samples` requests (distinct ones,
        each a sample of the split) and its standard error (nats/item). Interests drift with
        the session index, so the floor depends on the split: compare a validation loss with the
        validation split's floor.

        It is a floor for a model's per-item loss: the model sees only the logged history, not the
        latent (u, s), and with a bijective semantic-id tokenisation the summed per-level NTP loss
        of an item equals its item-level log-loss.
        """
        u, s = self.requests(np.arange(n_samples))
        ts = self._session_start(u, self._user(u), s)
        h = self.next_item_entropy(u, ts)
        return float(h.mean()), float(h.std(ddof=1) / np.sqrt(n_samples))
