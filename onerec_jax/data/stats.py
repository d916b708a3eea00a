"""Summary statistics of a source, as `onerec data stats` prints them.

Logged sources are described from the whole log; the world, which has no finite log, from a
deterministic sample of its requests (`sampled_examples` of them, evenly spaced indices), plus its
analytic sizes and its entropy floor. Floats are rounded to 6 significant digits so that the same
arguments print byte-identical JSON in a new process.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from onerec_jax.data import schema
from onerec_jax.data.events import LogSource
from onerec_jax.data.sources import Source, distinct_requests, open_source
from onerec_jax.data.world import World

# Pathway length histogram bins: 0, 1-3, 4-15, 16-63, 64-255, 256-1023, 1024+.
_EDGES = (0, 1, 4, 16, 64, 256, 1024)


def _round(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(f"{float(x):.6g}") if np.isfinite(x) else None  # JSON has no NaN
    if isinstance(x, np.integer):
        return int(x)
    return x


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    labels = [f"{a}-{b - 1}" if b - 1 > a else str(a) for a, b in itertools.pairwise(_EDGES)]
    labels.append(f"{_EDGES[-1]}+")
    counts = np.bincount(np.searchsorted(_EDGES, lengths, side="right") - 1, minlength=len(_EDGES))
    return dict(zip(labels, counts.tolist(), strict=True))


def popularity_slope(items: np.ndarray, min_count: int = 5) -> float:
    """Least-squares slope of log(count) on log(rank), negated, over items seen >= min_count times.

    A Zipf law count ~ rank^-alpha gives alpha.
    """
    counts = np.sort(np.bincount(items[items > 0]))[::-1]
    counts = counts[counts >= min_count]
    if len(counts) < 3:
        return float("nan")
    x = np.log(np.arange(1, len(counts) + 1))
    return float(-np.polyfit(x, np.log(counts), 1)[0])


def _event_stats(
    items: np.ndarray, flags: np.ndarray, play: np.ndarray, dur: np.ndarray, spec: schema.SchemaSpec
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "popularity_slope": popularity_slope(items),
        "positive_rate": float(schema.is_positive(flags, play, dur, spec).mean()),
    }
    out["flag_rates"] = {
        n: float(((flags & (1 << i)) != 0).mean()) for i, n in enumerate(schema.FLAG_NAMES)
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = play.astype(np.float64) / dur
    out["mean_play_fraction"] = float(np.nanmean(frac)) if np.isfinite(frac).any() else None
    return out


def source_stats(
    name: str, *, seed: int = 0, max_examples: int = 2000, spec: schema.SchemaSpec | None = None
) -> dict[str, Any]:
    """Statistics of source `name` (see `sources.open_source`)."""
    spec = spec or schema.SchemaSpec()
    splits = {sp: open_source(name, seed=seed, split=sp) for sp in ("train", "validation", "test")}
    train: Source = splits["train"]
    out: dict[str, Any] = {
        "source": name,
        "seed": seed,
        "kind": train.kind,
        "n_users": train.n_users,
        "n_items": train.n_items,
        "n_authors": train.n_authors,
        "n_tags": train.n_tags,
        "n_examples": {sp: len(s) for sp, s in splits.items()},
        # Different requests per split (the world's splits are unbounded but repeat after this).
        "n_distinct": {sp: distinct_requests(s) for sp, s in splits.items()},
    }
    n_train = distinct_requests(train)
    n = min(max_examples, n_train)
    idx = np.unique(np.linspace(0, n_train - 1, n).astype(np.int64))
    out["sampled_examples"] = len(idx)
    if len(idx):  # a log can be too short to give a single training example
        batch = schema.build_batch(train.raw_batch(idx, spec.history_window, spec), spec)
        out["pathway_length_hist"] = {
            p: length_histogram(batch[f"{p}_mask"].sum(1)) for p in schema.PATHWAYS
        }
        out["pathway_mean_length"] = {
            p: float(batch[f"{p}_mask"].sum(1).mean()) for p in schema.PATHWAYS
        }
        out["target_length_hist"] = np.bincount(
            batch["target_mask"].sum(1), minlength=spec.max_targets + 1
        ).tolist()
    if isinstance(train, LogSource):
        log = train.log
        out["n_interactions"] = log.n_events
        out.update(_event_stats(log.item, log.flags, log.play_ms, log.dur_ms, spec))
        span = np.diff(log.offsets)[1:]
        out["events_per_user"] = {
            "min": int(span.min()),
            "median": float(np.median(span)),
            "max": int(span.max()),
        }
    else:
        assert isinstance(train, World)
        cfg = train.config
        raw = train.raw_batch(idx, spec.history_window)
        out["n_interactions"] = cfg.n_users * cfg.max_sessions * (cfg.max_session_len + 1) // 2
        out["n_interactions_note"] = "analytic: every user's first max_sessions sessions"
        items = np.concatenate([raw["hist_item"], raw["target_item"]])
        out.update(
            _event_stats(
                items,
                np.concatenate([raw["hist_flags"], raw["target_flags"]]),
                np.concatenate([raw["hist_play_ms"], raw["target_play_ms"]]),
                np.concatenate([raw["hist_dur_ms"], raw["target_dur_ms"]]),
                spec,
            )
        )
        out["zipf_alpha"] = cfg.zipf_alpha
        # Interests drift with the session index, so each split has its own floor; a scaling fit
        # of validation loss compares with the validation floor.
        out["entropy_floor_nats"] = {}
        for sp, src in splits.items():
            h, se = src.entropy_floor(4096)
            out["entropy_floor_nats"][sp] = {"mean": h, "stderr": se, "n": 4096}
    return _round(out)
