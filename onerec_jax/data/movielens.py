"""MovieLens-100k, read from the copy that ships inside the `recbole` wheel.

Install it with `pip install --no-deps recbole==1.2.1` (the Makefile does); nothing is downloaded
and no data file is committed. Mapping onto the schema:
  * events: 100,000 ratings by 943 users of 1,682 movies, ordered by (timestamp, item id);
  * flags: rating >= 4 sets `like` (the positive feedback); rating <= 2 sets `dislike`;
  * tag: the first listed genre (19 genres); the item text "title (year) | genres" is kept for the
    tokenizer's content embedding;
  * static: age bucket (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> 1..7), gender (M 1, F 2),
    region (first zip digit -> 1..10, other 11), segment = occupation (21 kinds -> 1..21);
  * no author, play time or duration: those fields are unknown (0 / NaN).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from onerec_jax.data import schema
from onerec_jax.data.events import EventLog

N_USERS, N_ITEMS, N_RATINGS = 943, 1682, 100_000
_AGE_EDGES = (18, 25, 35, 45, 50, 56)


def data_dir() -> pathlib.Path:
    """Folder of the ml-100k atomic files inside the installed recbole package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "MovieLens-100k comes from the recbole wheel, which is not installed: "
            "run `pip install --no-deps recbole==1.2.1` (make install does)"
        )
    path = pathlib.Path(spec.origin).parent / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise FileNotFoundError(f"{path}: ml-100k.inter not found in the installed recbole package")
    return path


def _read(path: pathlib.Path) -> dict[str, list]:
    """A recbole atomic file: tab-separated, header 'name:type'; no quoting (titles hold quotes)."""
    table = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={}, strings_can_be_null=False),
        read_options=pacsv.ReadOptions(use_threads=False),
    )
    return {name.split(":")[0]: table.column(name) for name in table.column_names}


def _static(users: dict) -> dict[int, tuple[int, int, int, int]]:
    occupations = sorted(set(users["occupation"].to_pylist()))
    out = {}
    for uid, age, gender, occ, zipc in zip(
        users["user_id"].to_pylist(),
        users["age"].to_pylist(),
        users["gender"].to_pylist(),
        users["occupation"].to_pylist(),
        [str(z) for z in users["zip_code"].to_pylist()],
        strict=True,
    ):
        age_b = 1 + int(np.searchsorted(_AGE_EDGES, int(age), side="right"))
        region = 1 + int(zipc[0]) if zipc[:1].isdigit() else 11
        out[int(uid)] = (age_b, 1 if gender == "M" else 2, region, 1 + occupations.index(occ))
    return out


@functools.lru_cache(maxsize=1)
def load() -> EventLog:
    """The whole MovieLens-100k log (cached per process: it takes ~0.2 s)."""
    d = data_dir()
    inter, items, users = (_read(d / f"ml-100k.{x}") for x in ("inter", "item", "user"))
    rating = np.asarray(inter["rating"].cast(pa.float64()))
    flags = np.where(rating >= 4, schema.LIKE, 0) | np.where(rating <= 2, schema.DISLIKE, 0)
    item_ids = np.asarray(items["item_id"].cast(pa.int64()))
    genres = [str(g).split() for g in items["class"].to_pylist()]
    genre_of = dict(zip(item_ids.tolist(), [g[0] if g else "unknown" for g in genres], strict=True))
    text = {
        int(i): f"{t} ({y}) | {' '.join(g)}"
        for i, t, y, g in zip(
            item_ids.tolist(),
            items["movie_title"].to_pylist(),
            items["release_year"].to_pylist(),
            genres,
            strict=True,
        )
    }
    ev_item = np.asarray(inter["item_id"].cast(pa.int64()))
    log = EventLog.from_columns(
        "movielens-100k",
        user=np.asarray(inter["user_id"].cast(pa.int64())),
        item=ev_item,
        ts=np.asarray(inter["timestamp"].cast(pa.float64())).astype(np.int64),
        flags=flags,
        tag=np.asarray([genre_of[i] for i in ev_item.tolist()]),
        static_by_raw_user=_static(users),
        items_raw=item_ids,
        item_text_by_raw=text,
    )
    if (log.n_events, log.n_users, log.n_items) != (N_RATINGS, N_USERS, N_ITEMS):
        raise ValueError(
            f"{d}: expected {N_RATINGS} ratings, {N_USERS} users, {N_ITEMS} items; "
            f"got {log.n_events}, {log.n_users}, {log.n_items}"
        )
    return log
