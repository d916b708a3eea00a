"""Logged interactions (MovieLens, user logs) as one columnar table, and the examples over it.

An `EventLog` holds every event sorted by (user, timestamp, item id): ties in time are broken by
item id, so "precedes" is a total order and the split and the no-leakage rule are well defined.
Exact repeats of (user, item, timestamp) are kept once.
Users and items get dense ids 1..n (0 is padding); the raw ids are kept for the way back.

`LogSource` turns a log into examples of one split, leave-last-out per user:
  * test: the user's last event is the target; the history is everything before it;
  * validation: the second-to-last event, with everything before it;
  * train: the remaining events, cut into sessions (a new session after a gap of more than
    `session_gap_s`, where an e-commerce log's known scenario changes, or after m events); each
    session is one example whose history is every event of the user before the session.
    Users with fewer than 3 events are train-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from onerec_jax.data import schema

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class EventLog:
    """Events sorted by (user, ts, item); user u's events are [offsets[u], offsets[u + 1])."""

    name: str
    offsets: np.ndarray  # int64 [n_users + 2]; user 0 is padding and owns no events
    item: np.ndarray  # int32 [N], dense 1..n_items
    author: np.ndarray  # int32 [N], 0 where unknown
    tag: np.ndarray  # int32 [N], 0 where unknown
    ts: np.ndarray  # int64 [N], seconds
    play_ms: np.ndarray  # float32 [N], NaN where unknown
    dur_ms: np.ndarray  # float32 [N], NaN where unknown
    flags: np.ndarray  # uint8 [N], schema bit set
    static: np.ndarray  # int32 [n_users + 1, 4]: age, gender, region, segment (0 unknown)
    n_items: int
    n_authors: int
    n_tags: int
    user_raw: np.ndarray  # raw user id of dense user u at [u] (index 0 unused)
    item_raw: np.ndarray  # raw item id of dense item i at [i]
    item_text: list[str] | None = None  # per dense item, for content embeddings (index 0 "")
    scenario: np.ndarray | None = None  # uint8 [N]: e-commerce scenario 1..3, 0 unknown; or None

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 2

    @property
    def n_events(self) -> int:
        return len(self.item)

    def user_of_event(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    @classmethod
    def from_columns(
        cls,
        name: str,
        user: np.ndarray,
        item: np.ndarray,
        ts: np.ndarray,
        *,
        play_ms: np.ndarray | None = None,
        dur_ms: np.ndarray | None = None,
        flags: np.ndarray | None = None,
        author: np.ndarray | None = None,
        tag: np.ndarray | None = None,
        static_by_raw_user: dict | None = None,
        items_raw: np.ndarray | None = None,
        item_text_by_raw: dict | None = None,
        scenario: np.ndarray | None = None,
    ) -> EventLog:
        """Build a log from raw columns (any order, any hashable raw ids).

        Args:
          items_raw: the item universe (raw ids) when it holds items without events; else the
            items seen in `item`.
          author, tag: raw author/tag ids per event, mapped to dense 1..n (None or masked entries
            of a numpy masked array: unknown, 0).
          static_by_raw_user: raw user id -> 4 static categorical ids (0 unknown).
          item_text_by_raw: raw item id -> text for the tokenizer.
          scenario: per event, the e-commerce scenario (1..3 as schema.SCENARIOS; 0 unknown).
        """
        n = len(item)
        user_raw, user_dense = np.unique(np.asarray(user), return_inverse=True)
        item_raw = np.unique(np.asarray(item if items_raw is None else items_raw))
        item_dense = np.minimum(np.searchsorted(item_raw, np.asarray(item)), len(item_raw) - 1)
        if items_raw is not None and not np.array_equal(item_raw[item_dense], np.asarray(item)):
            raise ValueError(f"{name}: events name items that are not in the item table")

        def dense(col: np.ndarray | None) -> tuple[np.ndarray, int]:
            """Raw ids -> 1..n; masked entries (np.ma) are unknown -> 0."""
            out = np.zeros(n, np.int32)
            if col is None:
                return out, 0
            known = ~np.ma.getmaskarray(col)
            uniq, inv = np.unique(np.ma.getdata(col)[known], return_inverse=True)
            out[known] = inv + 1
            return out, len(uniq)

        author_d, n_authors = dense(author)
        tag_d, n_tags = dense(tag)
        u = user_dense.astype(np.int64) + 1
        it = item_dense.astype(np.int32) + 1
        ts = np.asarray(ts, np.int64)
        order = np.lexsort((it, ts, u))
        # An exact repeat of (user, item, timestamp) is one event logged twice: keep the first,
        # otherwise the order would not be total and a copy of the target could sit in its history.
        su, si, st = u[order], it[order], ts[order]
        repeat = np.concatenate(
            [[False], (su[1:] == su[:-1]) & (si[1:] == si[:-1]) & (st[1:] == st[:-1])]
        )
        order = order[~repeat]
        u = u[order]
        n = len(order)
        counts = np.bincount(u, minlength=len(user_raw) + 1)
        static = np.zeros((len(user_raw) + 1, schema.RAW_STATIC), np.int32)
        if static_by_raw_user:
            for j, r in enumerate(user_raw.tolist(), start=1):
                static[j] = static_by_raw_user.get(r, (0,) * schema.RAW_STATIC)
        text = None
        if item_text_by_raw is not None:
            text = [""] + [item_text_by_raw.get(r, "") for r in item_raw.tolist()]
        return cls(
            name=name,
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            item=it[order],
            author=author_d[order],
            tag=tag_d[order],
            ts=ts[order],
            play_ms=_column(play_ms, order, np.float32, np.nan),
            dur_ms=_column(dur_ms, order, np.float32, np.nan),
            flags=_column(flags, order, np.uint8, 0),
            static=static,
            n_items=len(item_raw),
            n_authors=n_authors,
            n_tags=n_tags,
            user_raw=np.concatenate([[user_raw[0]], user_raw]),
            item_raw=np.concatenate([[item_raw[0]], item_raw]),
            item_text=text,
            scenario=None if scenario is None else _column(scenario, order, np.uint8, 0),
        )


def _column(col: np.ndarray | None, order: np.ndarray, dtype: Any, fill: float) -> np.ndarray:
    if col is None:
        return np.full(len(order), fill, dtype)
    return np.asarray(col, dtype)[order]


class LogSource:
    """Random-access examples of one split of an `EventLog` (see the module docstring)."""

    kind = "log"

    def __init__(
        self,
        log: EventLog,
        split: str = "train",
        *,
        max_session_len: int = 5,
        session_gap_s: int = 1800,
        min_history: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        self.log, self.split = log, split
        start, n = log.offsets[1:-1], np.diff(log.offsets)[1:]
        users = np.arange(1, log.n_users + 1)
        held = n >= 3  # users that give a validation and a test example
        if split in ("validation", "test"):
            back = 2 if split == "validation" else 1
            u = users[held]
            t0 = start[held] + n[held] - back
            t1 = t0 + 1
        else:
            end = start + n - np.where(held, 2, 0)  # train region is [start, end)
            pos = schema.ranges(start, end - start)
            ev_user = np.repeat(users, end - start)
            first = np.concatenate([[True], ev_user[1:] != ev_user[:-1]])
            gap = np.diff(log.ts[pos], prepend=log.ts[pos][:1]) > session_gap_s
            if log.scenario is not None:  # a request is served in one scenario: cut where
                sc = log.scenario[pos]  # two known scenarios (1..3; 0 unknown) follow each other
                prev = np.concatenate([sc[:1], sc[:-1]])
                gap |= (sc != prev) & (sc > 0) & (prev > 0)
            seg_start = np.maximum.accumulate(np.where(first | gap, np.arange(len(pos)), 0))
            new = first | gap | ((np.arange(len(pos)) - seg_start) % max_session_len == 0)
            k = np.nonzero(new)[0]
            u = ev_user[k]
            t0 = pos[k]
            t1 = np.append(pos[k[1:] - 1] + 1, pos[-1] + 1 if len(pos) else 0)[: len(k)]
        keep = t0 - log.offsets[u] >= min_history
        self.user, self.target_start, self.target_end = u[keep], t0[keep], t1[keep]
        self._selected_cache: dict[tuple[str, float], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.user)

    @property
    def n_items(self) -> int:
        return self.log.n_items

    @property
    def n_authors(self) -> int:
        return self.log.n_authors

    @property
    def n_tags(self) -> int:
        return self.log.n_tags

    @property
    def n_users(self) -> int:
        return self.log.n_users

    def _selected_before(self, spec: schema.SchemaSpec) -> list[tuple[np.ndarray, int]]:
        """(C, n) per selective pathway of `spec` (the positive one, then each behaviour one):
        C[k] = events among log events [0, k) the pathway selects, n = its length. The
        counts are cached per selection rule."""
        log, out = self.log, []
        rules = {("pos", spec.pos_play_frac): spec.pos_len}
        rules.update({(b, 0.0): n for b, n in spec.behaviour_lens().items()})
        for key, n in rules.items():
            if key not in self._selected_cache:
                if key[0] == "pos":
                    sel = schema.is_positive(log.flags, log.play_ms, log.dur_ms, spec)
                else:
                    sel = (log.flags & schema.BEHAVIOURS[key[0]]) != 0
                self._selected_cache[key] = np.concatenate([[0], np.cumsum(sel)])
            out.append((self._selected_cache[key], n))
        return out

    def raw_batch(
        self,
        indices: np.ndarray,
        max_events: int | None = None,
        spec: schema.SchemaSpec | None = None,
    ) -> dict[str, Any]:
        """Ragged raw requests of examples `indices` (layout in `schema.build_batch`).

        Args:
          max_events: the history window: this many most recent events (None: all).
          spec: when given, the window also reaches back to the user's `spec.pos_len`-th most
            recent positive event (and the `spec.<behaviour>_len`-th most recent click, cart
            or order of each behaviour pathway), so sparse selections still fill their pathway.
        """
        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"example index out of range [0, {len(self)}): {idx.min()}..{idx.max()}"
            )
        log = self.log
        u, t0, t1 = self.user[idx], self.target_start[idx], self.target_end[idx]
        h0 = log.offsets[u] if max_events is None else np.maximum(log.offsets[u], t0 - max_events)
        if spec is not None and max_events is not None:
            for C, n in self._selected_before(spec):
                # Latest h with at least n selected events in [h, t0): C[h] <= C[t0] - n; a
                # user with fewer reaches back to its oldest selected event, no further.
                h_sel = np.searchsorted(C, C[t0] - n, side="right") - 1
                oldest = np.searchsorted(C, C[log.offsets[u]], side="right") - 1
                h0 = np.maximum(log.offsets[u], np.minimum(h0, np.maximum(h_sel, oldest)))
        hist = schema.ranges(h0, t0 - h0)
        tgt = schema.ranges(t0, t1 - t0)
        cols = {
            "item": log.item,
            "author": log.author,
            "tag": log.tag,
            "ts": log.ts,
            "play_ms": log.play_ms,
            "dur_ms": log.dur_ms,
            "flags": log.flags,
        }
        out: dict[str, Any] = {
            "user_id": u,
            "request_ts": log.ts[t0],
            "static": log.static[u],
            "hist_offsets": schema.offsets_of(t0 - h0),
            "target_offsets": schema.offsets_of(t1 - t0),
        }
        if log.scenario is not None:  # e-commerce log: the request's scenario is its target's
            cols["scenario"] = log.scenario
            out["scenario"] = log.scenario[t0]
        out.update({f"hist_{f}": c[hist] for f, c in cols.items()})
        out.update({f"target_{f}": cols[f][tgt] for f in schema.TARGET_FIELDS})
        return out

    def raw(self, index: int, max_events: int | None = None) -> dict[str, Any]:
        return self.raw_batch(np.asarray([index]), max_events)
