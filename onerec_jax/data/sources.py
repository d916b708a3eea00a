"""Open a data source from one string, as the CLI and experiment configs name them.

movielens-100k      the recbole copy of MovieLens-100k
world:PRESET        the session world (tiny | small | large)
world:mall-PRESET   the e-commerce world of three scenarios (mall-tiny | mall-small)
world:mall-PRESET:SCENARIO  its requests of one scenario only (card | video | live)
parquet:PATH        a user log (.parquet, or .csv/.tsv by suffix); csv:PATH is the same
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from onerec_jax.data import logs, movielens, schema
from onerec_jax.data.events import LogSource
from onerec_jax.data.mall import MallWorld
from onerec_jax.data.mall_config import MALL_PRESETS
from onerec_jax.data.world import World


class Source(Protocol):
    """What the pipeline needs: a length and ragged raw requests for any batch of indices."""

    kind: str
    split: str
    n_users: int
    n_items: int
    n_authors: int
    n_tags: int

    def __len__(self) -> int: ...

    def raw_batch(
        self,
        indices: np.ndarray,
        max_events: int | None = None,
        spec: schema.SchemaSpec | None = None,
    ) -> dict[str, Any]: ...


@functools.lru_cache(maxsize=8)
def _load_log(path: str):
    return logs.load(path)


def open_source(
    name: str, *, seed: int = 0, split: str = "train", order_seed: int = 0, **log_options: Any
) -> Source:
    """Source named by `name` (see module docstring); `seed` is the world's seed, `order_seed`
    the order of the world's requests (logged sources are shuffled by the pipeline instead);
    `log_options` go to `LogSource`."""
    if name == "movielens-100k":
        return LogSource(movielens.load(), split, **log_options)
    kind, _, arg = name.partition(":")
    preset, _, scenario = arg.partition(":")
    if kind == "world" and preset in MALL_PRESETS:
        return MallWorld(preset, seed=seed, split=split, order_seed=order_seed, scenario=scenario)
    if kind == "world" and arg:
        return World(arg, seed=seed, split=split, order_seed=order_seed)
    if kind in ("parquet", "csv") and arg:
        return LogSource(_load_log(arg), split, **log_options)
    raise ValueError(
        f"unknown source {name!r}: use movielens-100k, world:PRESET (tiny|small|large|"
        "mall-tiny|mall-small) or parquet:PATH"
    )


def distinct_requests(source: Source) -> int:
    """How many different requests a split holds: a logged split's length, or the world's
    stated `n_distinct` (its virtual length is unbounded, but only this many are different)."""
    return int(getattr(source, "n_distinct", len(source)))


def repeat_warning(source: Source, samples: int) -> str | None:
    """The warning a run drawing `samples` requests from `source` should print, or None when
    it sees no request twice."""
    n = distinct_requests(source)
    if samples <= n:
        return None
    return (
        f"the sample budget ({samples:,} requests) exceeds the {n:,} distinct requests of "
        f"{source.kind}/{source.split}: each is seen ~{samples / n:.2f} times (data repeats)"
    )
