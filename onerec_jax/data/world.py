"""The session world: a procedural, deterministic generator of short-video logs.

Why a generator: a logged data set can say neither how good a recommendation *would* have been
(RL needs that) nor what loss is irreducible (a scaling fit needs that). Here both are known.

The model of the world (all randomness is hashed from keys, see `hashing.py`):
  * Items 1..n_items, popularity weight w_i = i^-alpha (Zipf; item ids are popularity ranks). Each
    item has a primary and a secondary topic, an author and a tag tied to the primary topic, a
    log-normal duration and a latent quality; `item_content` gives a noisy 64-d view of these for
    the tokenizer. The only per-item state is this table: O(n_items) numbers, no per-user table.
  * User u has K interest topics c_k with logits b_k + drift·g_k·s/100 at session s (interests drift
    linearly in logit space with the session count), a session gap, a start time, static features.
  * Session s of user u starts at t0_u + (s + 0.05 + 0.75·U)·gap_u and shows 1..5 items.
  * Logging policy: topic c ~ pi_log = (1 - explore)·softmax(logits) over c_k + explore·uniform(T);
    item ~ w_i within the topic. Hence the entropy of the next exposure given (u, s) is exactly
    H(pi_log) + sum_c pi_log(c)·H(q(.|c)) - the floor no model seeing only the logged context beats.
  * Engagement: affinity a = sum_k softmax_k·([c_k = topic_i] + 0.5·[c_k = topic2_i]); the
    probabilities below are logistic in (a, quality, log duration). The realised play fraction is
    U^((1-p)/p), whose mean is exactly p, so `true_engagement` returns exact expectations.

Splits are a per-user time cut. Each user's sessions [0, max_sessions) are cut into three
consecutive ranges: the first (1 - validation_share - test_share) of them are training requests,
the next validation_share validation, the last test_share test. So every (user, session) request
belongs to exactly one split, and every test session of a user comes after all of that user's
training and validation sessions: a recommender is judged on the future, as in production. (All
users appear in every split: cold-start users are not what this world evaluates.) A request's
history is the sessions before it, so validation and test histories include training sessions,
as they would in a log; the targets never repeat across splits.

Example i of a split is the request pi(i mod N) of a keyed permutation pi of the split's
N = n_users x sessions-in-split distinct requests, a new permutation for each pass i // N: the
first N examples are N different requests, and `n_distinct` states N so that a run whose sample
budget exceeds it can say that it repeats data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onerec_jax.data import hashing as hs
from onerec_jax.data import schema
from onerec_jax.data.world_config import ENGAGEMENT, PRESETS, REWARD_WEIGHTS, WorldConfig
from onerec_jax.data.world_oracle import WorldOracle

# Re-exported: the world's settings live in world_config.py.
__all__ = ["ENGAGEMENT", "PRESETS", "REWARD_WEIGHTS", "World", "WorldConfig"]

# Salts keep the hash streams of different quantities apart.
_ITEM, _USER, _REQ, _SESS, _EVT, _CONTENT = 11, 12, 13, 14, 15, 16
_SPLIT_SALT = {"train": 101, "validation": 102, "test": 103}

_FLAG_BIT = {
    "like": schema.LIKE,
    "follow": schema.FOLLOW,
    "comment": schema.COMMENT,
    "share": schema.SHARE,
    "dislike": schema.DISLIKE,
}
_MIN_GAP_S, _MAX_GAP_S = 6 * 3600.0, 7 * 86400.0


class World(WorldOracle):
    """A random-access source of requests. Pickles as its config; tables are rebuilt on load."""

    kind = "world"

    def __init__(
        self, config: WorldConfig | str, seed: int = 0, split: str = "train", order_seed: int = 0
    ):
        """`seed` makes the world (items, users, sessions); `order_seed` only the order in
        which a split's requests are drawn (runs that differ in it see the same world)."""
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(
                    f"unknown world preset {config!r}; choose from {sorted(PRESETS)} (or "
                    "mall-tiny, mall-small: the e-commerce world)"
                )
            config = PRESETS[config]
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"world seed must be a non-negative integer, got {seed}")
        if split not in _SPLIT_SALT:
            raise ValueError(f"unknown split {split!r}; choose from {sorted(_SPLIT_SALT)}")
        self.config, self.seed, self.split = config, int(seed), split
        self.order_seed = int(order_seed)
        self._build()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "seed": self.seed,
            "split": self.split,
            "order_seed": self.order_seed,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()

    # ---------------------------------------------------------------- tables
    def _build(self) -> None:
        c, seed = self.config, self.seed
        ids = np.arange(1, c.n_items + 1, dtype=np.int64)
        hi = hs.hash_u64(seed, _ITEM, ids)
        topic = (hs.stream(hi, 0) % np.uint64(c.n_topics)).astype(np.int32)
        counts = np.bincount(topic, minlength=c.n_topics)
        if (counts == 0).any():
            raise ValueError(
                f"world seed {seed}: topic {int(np.argmin(counts))} has no items; "
                "use fewer topics or more items"
            )
        self.topic = np.concatenate([[0], topic]).astype(np.int32)  # row 0 = padding
        self.topic2 = np.concatenate([[0], hs.stream(hi, 1) % np.uint64(c.n_topics)]).astype(
            np.int32
        )
        author = (
            topic * c.authors_per_topic + (hs.stream(hi, 2) % np.uint64(c.authors_per_topic)) + 1
        )
        tag = topic * c.tags_per_topic + (hs.stream(hi, 3) % np.uint64(c.tags_per_topic)) + 1
        self.author = np.concatenate([[0], author]).astype(np.int32)
        self.tag = np.concatenate([[0], tag]).astype(np.int32)
        dur = np.clip(np.exp(np.log(30_000.0) + 0.8 * hs.normal(hs.stream(hi, 4))), 3_000, 600_000)
        self.dur_ms = np.concatenate([[np.nan], dur]).astype(np.float32)
        self.quality = np.concatenate([[0.0], hs.normal(hs.stream(hi, 5))]).astype(np.float32)
        w = ids.astype(np.float64) ** -c.zipf_alpha
        # Items grouped by topic; cdf holds topic + within-topic CDF, so one searchsorted on
        # (topic + u) samples every event at once whatever its topic.
        self._order = (np.argsort(topic, kind="stable") + 1).astype(np.int32)
        self._seg_end = np.cumsum(counts)
        w_sorted = w[self._order - 1]
        topic_sorted = topic[self._order - 1]
        z = np.bincount(topic_sorted, weights=w_sorted, minlength=c.n_topics)
        cum = np.cumsum(w_sorted)
        seg_start_cum = np.concatenate([[0.0], cum[self._seg_end[:-1] - 1]])
        self._cdf = topic_sorted + (cum - seg_start_cum[topic_sorted]) / z[topic_sorted]
        q = w_sorted / z[topic_sorted]
        self.topic_entropy = np.bincount(topic_sorted, weights=-q * np.log(q), minlength=c.n_topics)
        self._log_q = np.zeros(c.n_items + 1)
        self._log_q[self._order] = np.log(q)  # log q(item | its topic)
        basis = np.random.default_rng([seed, _CONTENT]).standard_normal((c.n_topics, c.content_dim))
        self._topic_basis = (basis / np.sqrt(c.content_dim)).astype(np.float32)

    # ------------------------------------------------------------- metadata
    @property
    def n_items(self) -> int:
        return self.config.n_items

    @property
    def n_authors(self) -> int:
        return self.config.n_topics * self.config.authors_per_topic

    @property
    def n_tags(self) -> int:
        return self.config.n_topics * self.config.tags_per_topic

    @property
    def n_users(self) -> int:
        return self.config.n_users

    def __len__(self) -> int:
        return self.config.n_examples

    @property
    def n_distinct(self) -> int:
        """Distinct (user, session) requests in this split; example i repeats i mod this."""
        lo, hi = self.config.split_sessions(self.split)
        return self.config.n_users * (hi - lo)

    # ---------------------------------------------------------------- users
    def _user(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """Per-user parameters, recomputed from hashes (nothing per user is stored)."""
        c = self.config
        k = np.arange(c.interests_per_user)
        hu = hs.hash_u64(self.seed, _USER, np.asarray(u)[..., None], k)  # [..., K]
        h0 = hs.hash_u64(self.seed, _USER, u)
        gap = np.exp(
            np.log(_MIN_GAP_S) + hs.unit53(hs.stream(h0, 0)) * np.log(_MAX_GAP_S / _MIN_GAP_S)
        )
        return {
            "topics": (hs.stream(hu, 0) % np.uint64(c.n_topics)).astype(np.int64),
            "base": hs.normal(hs.stream(hu, 1)),
            "slope": hs.normal(hs.stream(hu, 2)),
            "gap": gap,
            "t0": 1_500_000_000 + (hs.stream(h0, 1) % np.uint64(30_000_000)).astype(np.int64),
            "static": np.stack(
                [
                    1 + (hs.stream(h0, 2) % np.uint64(7)).astype(np.int32),  # age bucket
                    1 + (hs.stream(h0, 3) % np.uint64(2)).astype(np.int32),  # gender
                    1 + (hs.stream(h0, 4) % np.uint64(20)).astype(np.int32),  # region
                    # activity segment: quartile of the session gap (frequent users first)
                    1
                    + np.minimum(
                        (4 * np.log(gap / _MIN_GAP_S) / np.log(_MAX_GAP_S / _MIN_GAP_S)).astype(
                            np.int32
                        ),
                        3,
                    ),
                ],
                axis=-1,
            ),
        }

    def _interest(self, user: dict[str, np.ndarray], s: np.ndarray) -> np.ndarray:
        """softmax over the K interests at session(s) s: [..., K]."""
        logits = user["base"] + self.config.drift * user["slope"] * (
            np.asarray(s)[..., None] / 100.0
        )
        logits = logits - logits.max(-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(-1, keepdims=True)

    def _session_start(self, u: np.ndarray, user: dict, s: np.ndarray) -> np.ndarray:
        jitter = hs.unit53(hs.hash_u64(self.seed, _SESS, u, s, 1))
        return user["t0"] + np.floor((s + 0.05 + 0.75 * jitter) * user["gap"]).astype(np.int64)

    def _session_len(self, u: np.ndarray, s: np.ndarray) -> np.ndarray:
        h = hs.hash_u64(self.seed, _SESS, u, s, 0)
        return 1 + (h % np.uint64(self.config.max_session_len)).astype(np.int64)

    def session_of(self, user_ids: np.ndarray, request_ts: np.ndarray) -> np.ndarray:
        """Invert the session clock: the session index whose start is `request_ts`."""
        user = self._user(np.asarray(user_ids))
        return np.floor((np.asarray(request_ts) - user["t0"]) / user["gap"]).astype(np.int64)

    def requests(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user [B], session [B]) of examples `indices` in this split: example i is request
        pi_e(i mod N) of pass e = i // N, pi_e a keyed permutation of the N distinct requests."""
        idx = np.asarray(indices, np.int64)
        lo, hi = self.config.split_sessions(self.split)
        n = self.n_distinct
        passes, j = np.divmod(idx, n)
        flat_p, flat_j = passes.reshape(-1), j.reshape(-1)
        r = np.empty_like(flat_j)
        for e in np.unique(flat_p):  # one pass in all but the batches that straddle two
            at = flat_p == e
            keys = (self.seed, _REQ, _SPLIT_SALT[self.split], self.order_seed, int(e))
            r[at] = self._flat_requests(hs.permute(flat_j[at], n, *keys, *self._order_salt))
        r = r.reshape(j.shape)
        return 1 + r // (hi - lo), lo + r % (hi - lo)

    _order_salt: tuple[int, ...] = ()  # a subclass over a subset of requests: own permutations

    def _flat_requests(self, positions: np.ndarray) -> np.ndarray:
        """Flat request ids (u - 1) * sessions + s - lo at permuted positions (a subclass may
        hold a subset of the requests: MallWorld restricted to one scenario)."""
        return positions

    # --------------------------------------------------------------- events
    def _events(
        self,
        u: np.ndarray,
        topics: np.ndarray,
        pi: np.ndarray,
        start: np.ndarray,
        s: np.ndarray,
        k: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Realise exposure k of session s of user u; every argument is per event.

        topics, pi: the user's interest topics and their weights at session s, [n, K]; start: the
        session's start time. Events of one (user, session) must be contiguous and in k order.
        """
        h = hs.hash_u64(self.seed, _EVT, u, s * 8 + k)
        topic = self._logged_topic(h, topics, pi)
        idx = np.searchsorted(self._cdf, topic + hs.unit53(hs.stream(h, 1)), side="right")
        item = self._order[np.minimum(idx, self._seg_end[topic] - 1)]
        p = {n: v[:, 0] for n, v in self._probs(topics, pi, item[:, None]).items()}
        play_u, like_u = hs.unit32_pair(hs.stream(h, 2))
        dur = self.dur_ms[item]
        play_ms = (play_u ** ((1.0 - p["play_frac"]) / p["play_frac"]) * dur).astype(np.float32)
        flags = np.zeros(len(item), np.uint8)
        u3a, u3b = hs.unit32_pair(hs.stream(h, 3))
        u4a, u4b = hs.unit32_pair(hs.stream(h, 4))
        for name, r in (
            ("like", like_u),
            ("follow", u3a),
            ("comment", u3b),
            ("share", u4a),
            ("dislike", u4b),
        ):
            flags |= np.where(r < p[name], _FLAG_BIT[name], 0).astype(np.uint8)
        # Within a session an exposure starts when the previous one ended, plus 2 s.
        ts = schema.session_times(start, k, np.ceil(play_ms / 1000.0).astype(np.int64) + 2)
        return {
            "item": item.astype(np.int32),
            "author": self.author[item],
            "tag": self.tag[item],
            "ts": ts,
            "play_ms": play_ms,
            "dur_ms": dur,
            "flags": flags,
        }

    def _expand(
        self, b: np.ndarray, u: np.ndarray, user: dict, sessions: np.ndarray, lens: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Events of the (example b, session) pairs, in order: (example of each event, fields)."""
        # Session-level quantities once per session, then repeated to its events.
        us = {key: v[b] for key, v in user.items() if key != "static"}
        pi = self._interest(us, sessions)
        start = self._session_start(u[b], us, sessions)
        rep = np.repeat(np.arange(len(b)), lens)
        ek = np.arange(len(rep)) - np.repeat(np.cumsum(lens) - lens, lens)
        ev = self._events(u[b][rep], us["topics"][rep], pi[rep], start[rep], sessions[rep], ek)
        return b[rep], ev

    def session_events(self, user_id: int, sessions: np.ndarray) -> dict[str, np.ndarray]:
        """All exposures of the given sessions (ascending) of one user, for analysis and tests."""
        u = np.asarray([user_id], np.int64)
        sessions = np.asarray(sessions, np.int64)
        lens = self._session_len(u[0], sessions)
        _, ev = self._expand(np.zeros(len(sessions), np.int64), u, self._user(u), sessions, lens)
        ev["session"] = np.repeat(sessions, lens)
        return ev

    def raw_batch(
        self,
        indices: np.ndarray,
        max_events: int | None = None,
        spec: schema.SchemaSpec | None = None,
    ) -> dict[str, Any]:
        """Ragged raw requests of examples `indices` (see `schema.build_batch` for the layout).

        Args:
          indices: example indices in this split, each in [0, len).
          max_events: keep only this many most recent history events per example (None: all).
          spec: accepted for the `Source` interface and not used: finding older positives would
            mean generating the events before the window, and with positive rates of 40-50 % the
            window of 4 x pos_len events already holds them (README).
        """
        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"example index out of range [0, {len(self)}): {idx.min()}..{idx.max()}"
            )
        B = len(idx)
        u, s = self.requests(idx)
        user = self._user(u)
        # Candidate past sessions: each holds >= 1 event, so the last `max_events` cover the window.
        n_cand = s if max_events is None else np.minimum(s, max_events)
        cb = np.repeat(np.arange(B), n_cand)
        cs = schema.ranges(s - n_cand, n_cand)
        lens = self._session_len(u[cb], cs)
        if max_events is not None and len(cs):
            csum = np.concatenate([[0], np.cumsum(lens)])
            end = schema.offsets_of(n_cand)[1:]
            after = csum[end][cb] - csum[1:]  # events in the user's later candidate sessions
            keep = after < max_events
            cb, cs, lens = cb[keep], cs[keep], lens[keep]
        tl = self._session_len(u, s)
        # History and target sessions in one call (half the numpy calls of two): an event is a
        # function of its keys and of earlier events of its own session (timestamps), and every
        # session here is whole and starts at k = 0, so this equals two calls (tested).
        n_hist = int(lens.sum())
        both = (np.concatenate([cb, np.arange(B)]), np.concatenate([cs, s]))
        eb, ev = self._expand(both[0], u, user, both[1], np.concatenate([lens, tl]))
        eb = eb[:n_hist]
        hist = {f: v[:n_hist] for f, v in ev.items()}
        tgt = {f: v[n_hist:] for f, v in ev.items()}
        counts = np.bincount(eb, minlength=B)
        if max_events is not None and len(eb):
            rank_from_end = schema.offsets_of(counts)[1:][eb] - 1 - np.arange(len(eb))
            keep = rank_from_end < max_events
            hist = {f: v[keep] for f, v in hist.items()}
            counts = np.minimum(counts, max_events)
        out: dict[str, Any] = {
            "user_id": u,
            "request_ts": self._session_start(u, user, s),
            "static": user["static"],
            "hist_offsets": schema.offsets_of(counts),
            "target_offsets": schema.offsets_of(tl),
        }
        out.update({f"hist_{f}": v for f, v in hist.items()})
        out.update({f"target_{f}": tgt[f] for f in schema.TARGET_FIELDS})
        return out

    def raw(self, index: int, max_events: int | None = None) -> dict[str, Any]:
        """Raw request of one example, as a ragged batch of one."""
        return self.raw_batch(np.asarray([index]), max_events)

    def item_content(self, item_ids: np.ndarray) -> np.ndarray:
        """Content features [N, content_dim] float32: a noisy view of topic, topic2 and author."""
        items = np.asarray(item_ids, np.int64)
        d = self.config.content_dim
        h = hs.hash_u64(self.seed, _CONTENT, items[:, None], np.arange(d))
        ha = hs.hash_u64(
            self.seed, _CONTENT, -self.author[items][:, None].astype(np.int64), np.arange(d)
        )
        x = (
            self._topic_basis[self.topic[items]]
            + 0.5 * self._topic_basis[self.topic2[items]]
            + 0.2 * hs.normal(ha) / np.sqrt(d)
            + 0.3 * hs.normal(h) / np.sqrt(d)
        )
        return x.astype(np.float32)
