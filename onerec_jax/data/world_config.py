"""The session world's settings: its size and behaviour (`WorldConfig`), the named presets, and
the engagement model's coefficients and reward weights (onerec_jax/data/world.py uses them)."""

from __future__ import annotations

import dataclasses

# Engagement model: logit = bias + w_aff·affinity + w_q·quality (+ w_dur·log(duration/30 s)).
ENGAGEMENT = {
    "play_frac": (-0.5, 3.0, 0.5, -0.3),
    "like": (-3.5, 3.0, 0.7, 0.0),
    "follow": (-6.0, 3.0, 0.5, 0.0),
    "comment": (-5.5, 2.5, 0.5, 0.0),
    "share": (-6.0, 2.5, 0.8, 0.0),
    "dislike": (-3.0, -3.0, -0.5, 0.0),
}
# The scalar true reward: a weighted sum of expected engagement (documented in the README).
REWARD_WEIGHTS = {
    "play_frac": 1.0,
    "like": 2.0,
    "follow": 4.0,
    "comment": 2.0,
    "share": 3.0,
    "dislike": -5.0,
}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Size and behaviour of a world. Every field is a count unless stated."""

    n_users: int = 1000
    n_items: int = 500
    n_topics: int = 16
    interests_per_user: int = 3  # K
    authors_per_topic: int = 8
    tags_per_topic: int = 2
    zipf_alpha: float = 1.0  # popularity exponent
    explore: float = 0.1  # logging policy's share of uniformly random topics
    drift: float = 0.3  # interest logit change per 100 sessions, in units of g_k ~ N(0, 1)
    max_sessions: int = 200  # sessions per user; requests are (user, session) pairs
    max_session_len: int = 5  # m
    content_dim: int = 64
    validation_share: float = 0.1  # share of each user's sessions held out for validation
    test_share: float = 0.1  # share of each user's (last) sessions held out for test
    # Virtual length of each split: indices past the split's distinct requests start new passes
    # (fresh permutations of the same requests), so an index never runs out; see `n_distinct`.
    n_examples: int = 1 << 40

    def __post_init__(self) -> None:
        if self.n_topics > self.n_items:
            raise ValueError(f"WorldConfig: n_topics ({self.n_topics}) > n_items ({self.n_items})")
        for f in (
            "n_users",
            "n_items",
            "n_topics",
            "interests_per_user",
            "authors_per_topic",
            "tags_per_topic",
            "max_sessions",
            "max_session_len",
            "content_dim",
        ):
            if getattr(self, f) < 1:
                raise ValueError(f"WorldConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.max_session_len > 8:
            # Event k of session s is hashed from s * 8 + k (one array key is cheaper than two).
            raise ValueError(
                f"WorldConfig.max_session_len must be <= 8, got {self.max_session_len}"
            )
        if not 0.0 <= self.explore <= 1.0:
            raise ValueError(f"WorldConfig.explore must be in [0, 1], got {self.explore}")
        n_train = self.split_sessions("train")
        if n_train[1] - n_train[0] < 1:
            raise ValueError(
                f"WorldConfig: max_sessions={self.max_sessions} leaves no training sessions "
                f"after validation_share={self.validation_share}, test_share={self.test_share}"
            )

    def split_sessions(self, split: str) -> tuple[int, int]:
        """Each user's sessions [lo, hi) that belong to `split` (the same range for every user).

        Validation and test get round(share * max_sessions) sessions each, at least one."""
        s = self.max_sessions
        n_test = max(1, round(self.test_share * s))
        n_val = max(1, round(self.validation_share * s))
        ranges = {
            "train": (0, s - n_val - n_test),
            "validation": (s - n_val - n_test, s - n_test),
            "test": (s - n_test, s),
        }
        if split not in ranges:
            raise ValueError(f"unknown split {split!r}; choose from {sorted(ranges)}")
        return ranges[split]


PRESETS: dict[str, WorldConfig] = {
    # Unit tests: compiles and runs in milliseconds.
    "tiny": WorldConfig(n_users=1000, n_items=500, n_topics=16, max_sessions=200),
    # CPU scaling sweeps: enough items for 3 x 256-code semantic ids, long histories.
    "small": WorldConfig(
        n_users=1_000_000,
        n_items=20_000,
        n_topics=64,
        authors_per_topic=32,
        tags_per_topic=4,
        max_sessions=2000,
    ),
    # Kuaishou-like: 100M users, millions of items (the item table is ~100 MB).
    "large": WorldConfig(
        n_users=100_000_000,
        n_items=4_000_000,
        n_topics=1024,
        authors_per_topic=256,
        tags_per_topic=8,
        max_sessions=4000,
    ),
}
