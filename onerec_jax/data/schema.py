"""The training example: one user request, as in the OneRec technical report.

Every source (the session world, MovieLens-100k, user logs) first produces ragged raw requests:
each user's static features, time-ordered history strictly before the request, and target session.
`build_batch` turns them into fixed-shape arrays with padding masks. Keeping that step in one
place is what makes "no leakage" a property of the pipeline rather than of each source.

Conventions (the README has the full field table):
  * id 0 is padding in every id field; real ids are 1..n.
  * bucket fields use 0 for padding and 1 for "unknown" (e.g. MovieLens has no play time).
  * pathways are reverse-chronological: index 0 is the most recent event, padding comes last.
  * flags is a bit set: like 1, follow 2, comment 4, share 8, dislike 16; the e-commerce
    behaviours click 32, add-to-cart 64, order 128 (onerec_jax/data/mall.py).
  * scenario (e-commerce sources only, `SchemaSpec.scenarios`): 0 none, then SCENARIOS in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from onerec_jax.data.hashing import hash_u64

LIKE, FOLLOW, COMMENT, SHARE, DISLIKE = 1, 2, 4, 8, 16
CLICK, CART, ORDER = 32, 64, 128
ENGAGE_BITS = LIKE | FOLLOW | COMMENT | SHARE | CLICK | CART | ORDER
FLAG_NAMES = ("like", "follow", "comment", "share", "dislike", "click", "cart", "order")
# Where an e-commerce item is shown: ids 1..3 in this order (0: none / not an e-commerce source).
SCENARIOS = ("card", "video", "live")
# Behaviour pathways (SchemaSpec.click_len ...): a user's most recent events with this flag bit.
BEHAVIOURS = {"click": CLICK, "cart": CART, "order": ORDER}

# The first static field is derived from user_id by `build_example`; sources supply the other four.
STATIC_FIELDS = ("user_bucket", "age", "gender", "region", "segment")
RAW_STATIC = len(STATIC_FIELDS) - 1
N_BUCKETS = 32  # vocabulary of each bucket field (tdelta, play, dur), padding and unknown included
PATHWAYS = ("short", "pos", "life")
# field -> dtype for every event of a pathway
EVENT_FIELDS: dict[str, Any] = {
    "item": np.int32,
    "author": np.int32,
    "tag": np.int32,
    "tdelta": np.uint8,  # log-bucketed time between the event and the request
    "play": np.uint8,  # log-bucketed play time
    "dur": np.uint8,  # log-bucketed item duration
    "flags": np.uint8,
}
TARGET_FIELDS: dict[str, Any] = {
    "item": np.int32,
    "author": np.int32,
    "tag": np.int32,
    "play_ms": np.float32,  # NaN where the source does not know
    "dur_ms": np.float32,
    "flags": np.uint8,
}
RAW_EVENT_FIELDS: dict[str, Any] = {
    "item": np.int32,
    "author": np.int32,
    "tag": np.int32,
    "ts": np.int64,  # seconds
    "play_ms": np.float32,
    "dur_ms": np.float32,
    "flags": np.uint8,
}


@dataclasses.dataclass(frozen=True)
class SchemaSpec:
    """Pathway lengths and selection rules; the report's values are the defaults.

    Attributes:
      short_len: most recent exposures in the short-term pathway (events).
      pos_len: most recent strongly positive events in the positive-feedback pathway.
      life_len: events in the lifelong pathway.
      life_mode: "recent" keeps the `life_len` most recent events; "stride" keeps `life_len` events
        evenly spaced over the whole available history (long-past interests stay visible).
      max_targets: m, items of the target session kept (sessions longer than m are truncated).
      pos_play_frac: a play fraction at or above this counts as strong positive feedback.
      user_buckets: hash buckets for the user id feature.
      scenarios: add the request's `scenario` and each event's `<pathway>_scenario` (e-commerce).
      click_len, cart_len, order_len: events of each behaviour pathway (0: no such pathway).
    """

    short_len: int = 20
    pos_len: int = 256
    life_len: int = 2000
    life_mode: str = "recent"
    max_targets: int = 5
    pos_play_frac: float = 0.9
    user_buckets: int = 1 << 16
    scenarios: bool = False
    click_len: int = 0
    cart_len: int = 0
    order_len: int = 0

    def __post_init__(self) -> None:
        for name in ("short_len", "pos_len", "life_len", "max_targets", "user_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchemaSpec.{name} must be >= 1, got {getattr(self, name)}")
        for name in BEHAVIOURS:
            if getattr(self, f"{name}_len") < 0:
                raise ValueError(
                    f"SchemaSpec.{name}_len must be >= 0, got {getattr(self, f'{name}_len')}"
                )
        if self.life_mode not in ("recent", "stride"):
            raise ValueError(
                f"SchemaSpec.life_mode must be 'recent' or 'stride', got {self.life_mode!r}"
            )

    @property
    def history_window(self) -> int | None:
        """Recent events a source must supply so every pathway can fill; None: all (stride mode)."""
        if self.life_mode == "stride":
            return None
        # Four times the positive pathway fills it when >= 25 % of recent events are positive;
        # logged sources reach further back for sparser positives (LogSource.raw_batch).
        # Behaviour pathways: orders are rarer than positives; 8x their length covers them at
        # a share of >= 12.5 % among recent events (fewer fill the pathway partly).
        behaviour = max((8 * n for n in self.behaviour_lens().values()), default=0)
        return max(self.short_len, self.life_len, 4 * self.pos_len, behaviour)

    def behaviour_lens(self) -> dict[str, int]:
        """The behaviour pathways this spec has, name -> length."""
        return {b: getattr(self, f"{b}_len") for b in BEHAVIOURS if getattr(self, f"{b}_len")}

    def pathways(self) -> dict[str, int]:
        """Every pathway of an example, name -> length (the three base ones first)."""
        base = dict(zip(PATHWAYS, (self.short_len, self.pos_len, self.life_len), strict=True))
        return {**base, **self.behaviour_lens()}

    def event_fields(self) -> dict[str, Any]:
        """The per-event fields of a pathway: EVENT_FIELDS, plus the scenario where asked."""
        return {**EVENT_FIELDS, "scenario": np.uint8} if self.scenarios else dict(EVENT_FIELDS)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per-example field -> (shape, dtype); a batch adds a leading B axis."""
        out: dict[str, tuple[tuple[int, ...], Any]] = {
            "user_id": ((), np.int64),
            "request_ts": ((), np.int64),
            "static": ((len(STATIC_FIELDS),), np.int32),
        }
        if self.scenarios:
            out["scenario"] = ((), np.uint8)
        for p, n in self.pathways().items():
            for f, dt in self.event_fields().items():
                out[f"{p}_{f}"] = ((n,), dt)
            out[f"{p}_mask"] = ((n,), np.bool_)
        for f, dt in TARGET_FIELDS.items():
            out[f"target_{f}"] = ((self.max_targets,), dt)
        out["target_mask"] = ((self.max_targets,), np.bool_)
        return out


def log_bucket(x: np.ndarray, scale: float, per_octave: int = 1) -> np.ndarray:
    """Bucket a non-negative quantity on a log2 scale: 2 + floor(k·log2(1 + x/scale)), NaN -> 1.

    Example with scale=60 (minutes), k=1: 0 s -> 2, 59 s -> 2, 60 s -> 3, 180 s -> 4, 1 day -> 12.
    """
    x = np.asarray(x, np.float64)
    unknown = ~np.isfinite(x)
    b = 2 + np.floor(per_octave * np.log2(1.0 + np.maximum(np.where(unknown, 0.0, x), 0.0) / scale))
    b = np.minimum(b, N_BUCKETS - 1)
    return np.where(unknown, 1, b).astype(np.uint8)


def tdelta_bucket(seconds: np.ndarray) -> np.ndarray:
    return log_bucket(seconds, 60.0)


def time_bucket_ms(ms: np.ndarray) -> np.ndarray:
    """Play time and duration share one scale: two buckets per octave of seconds."""
    return log_bucket(np.asarray(ms, np.float64) / 1000.0, 1.0, per_octave=2)


def is_positive(
    flags: np.ndarray, play_ms: np.ndarray, dur_ms: np.ndarray, spec: SchemaSpec
) -> np.ndarray:
    """Strong positive feedback: an engagement action, or a near-complete play; never a dislike."""
    flags = np.asarray(flags)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.asarray(play_ms, np.float64) / np.asarray(dur_ms, np.float64)
    played = np.isfinite(frac) & (frac >= spec.pos_play_frac)
    return (((flags & ENGAGE_BITS) != 0) | played) & ((flags & DISLIKE) == 0)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: ranges([5, 0], [2, 3]) -> [5, 6, 0, 1, 2]."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def session_times(start: np.ndarray, k: np.ndarray, took: np.ndarray) -> np.ndarray:
    """Timestamps of a session's events (contiguous, in k order): the first at the session's
    start, each later one when the one before it was done (`took` seconds after it)."""
    cs = np.cumsum(took)
    first = k == 0
    seg_base = np.maximum.accumulate(np.where(first, cs - took, 0)) if len(k) else cs
    return start + (cs - took - seg_base)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _gather(out: dict, name: str, cols: dict, idx: np.ndarray, valid: np.ndarray) -> None:
    """out[name_f] = cols[f][idx] where valid; padded slots read the all-zero last row of cols."""
    safe = np.where(valid, idx, len(cols["item"]) - 1)
    for f, col in cols.items():
        out[f"{name}_{f}"] = col[safe]
    out[f"{name}_mask"] = valid


def _latest_selected(
    out: dict, name: str, cols: dict, sel: np.ndarray, seg: np.ndarray, off: np.ndarray, n: int
) -> None:
    """Pathway `name`: each user's n most recent events where `sel`, most recent first."""
    B = len(off) - 1
    csel = np.cumsum(sel)
    total = np.concatenate([[0], csel])[off[1:]]  # selected events up to each user's end
    rank = total[seg] - csel  # 0 for the user's most recent selected event
    keep = sel & (rank < n)
    idx = np.zeros((B, n), np.int64)
    valid = np.zeros((B, n), np.bool_)
    idx[seg[keep], rank[keep]] = np.nonzero(keep)[0]
    valid[seg[keep], rank[keep]] = True
    _gather(out, name, cols, idx, valid)


def build_batch(raw: dict[str, Any], spec: SchemaSpec) -> dict[str, np.ndarray]:
    """Turn B raw requests (ragged) into fixed-shape arrays with a leading B axis.

    `raw` holds user_id [B], request_ts [B], static [B, 4] (age, gender, region, segment), the
    histories concatenated as hist_<field> (RAW_EVENT_FIELDS; each user's events in time order) with
    hist_offsets [B + 1], and the target sessions as target_<field> (TARGET_FIELDS) with
    target_offsets [B + 1]. History events must not be later than the request; this is checked here,
    for every source, so a source bug cannot leak the target into the context. With
    `spec.scenarios`, raw `scenario` [B] and `hist_scenario` are read (zeros where absent).
    """
    fields = dict(RAW_EVENT_FIELDS, **({"scenario": np.uint8} if spec.scenarios else {}))
    n_raw = len(raw["hist_item"])
    # One zero event appended: padded slots gather from it, so empty histories need no branch.
    hist = {
        f: np.append(np.asarray(raw.get(f"hist_{f}", np.zeros(n_raw, dt)), dt), np.zeros(1, dt))
        for f, dt in fields.items()
    }
    user_id = np.asarray(raw["user_id"], np.int64)
    request_ts = np.asarray(raw["request_ts"], np.int64)
    off = np.asarray(raw["hist_offsets"], np.int64)
    B, n = len(user_id), np.diff(off)
    seg = np.repeat(np.arange(B), n)
    late = hist["ts"][:-1] > request_ts[seg]
    if late.any():
        e = int(np.argmax(late))
        raise ValueError(
            f"user {user_id[seg[e]]}: history event at ts={hist['ts'][e]} is after the request at "
            f"ts={request_ts[seg[e]]}; sources must only pass earlier events"
        )
    # Per-event columns in the example's dtypes, buckets computed once per event (not per slot).
    kept = ("item", "author", "tag", "flags") + (("scenario",) if spec.scenarios else ())
    cols = {f: hist[f].astype(spec.event_fields()[f], copy=False) for f in kept}
    cols["tdelta"] = tdelta_bucket(request_ts[seg] - hist["ts"][:-1])
    cols["play"] = time_bucket_ms(hist["play_ms"][:-1])
    cols["dur"] = time_bucket_ms(hist["dur_ms"][:-1])
    for f in ("tdelta", "play", "dur"):
        cols[f] = np.append(cols[f], np.zeros(1, np.uint8))  # the padding row
    buckets = 1 + hash_u64(user_id.astype(np.uint64), 0x75B) % np.uint64(spec.user_buckets)
    out: dict[str, np.ndarray] = {
        "user_id": user_id,
        "request_ts": request_ts,
        "static": np.concatenate(
            [
                buckets[:, None].astype(np.int32),
                np.asarray(raw["static"], np.int32).reshape(B, RAW_STATIC),
            ],
            axis=1,
        ),
    }
    if spec.scenarios:
        out["scenario"] = np.asarray(raw.get("scenario", np.zeros(B)), np.uint8).reshape(B)
    last = off[1:, None] - 1  # global index of each user's most recent event

    j = np.arange(spec.short_len)[None]
    _gather(out, "short", cols, last - j, j < n[:, None])

    # Positive pathway: rank positives from the most recent (0) within each user; keep rank < P.
    pos = is_positive(hist["flags"][:-1], hist["play_ms"][:-1], hist["dur_ms"][:-1], spec)
    _latest_selected(out, "pos", cols, pos, seg, off, spec.pos_len)
    for name, length in spec.behaviour_lens().items():
        did = (hist["flags"][:-1] & BEHAVIOURS[name]) != 0
        _latest_selected(out, name, cols, did, seg, off, length)

    j = np.arange(spec.life_len)[None]
    if spec.life_mode == "stride":
        # Evenly spaced over the whole history, most recent first; dense histories keep them all.
        L = spec.life_len
        # Position (n - 1) - round(j * step): j = 0 is the newest event, j = L - 1 the oldest.
        step = (n - 1) / max(L - 1, 1) if L > 1 else np.zeros(B)
        back = np.where(n[:, None] > L, np.round(j * step[:, None]), j)
        life = off[:-1, None] + n[:, None] - 1 - back
        _gather(out, "life", cols, life.astype(np.int64), j < n[:, None])
    else:
        _gather(out, "life", cols, last - j, j < n[:, None])

    toff = np.asarray(raw["target_offsets"], np.int64)
    tn = np.minimum(np.diff(toff), spec.max_targets)
    j = np.arange(spec.max_targets)[None]
    tvalid = j < tn[:, None]
    tidx = np.where(tvalid, toff[:-1, None] + j, 0)
    for f, dt in TARGET_FIELDS.items():
        col = np.asarray(raw[f"target_{f}"], dt)
        fill = np.nan if dt == np.float32 else 0
        out[f"target_{f}"] = np.where(tvalid, col[tidx] if len(col) else fill, fill).astype(dt)
    out["target_mask"] = tvalid
    return out


def build_example(raw: dict[str, Any], spec: SchemaSpec) -> dict[str, np.ndarray]:
    """One example (no batch axis) from a ragged raw batch of size one."""
    return {k: v[0] for k, v in build_batch(raw, spec).items()}
