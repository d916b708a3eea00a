"""User logs in Parquet or CSV: one row per exposure.

Columns (names are exact; extra columns are ignored):
  user_id       required  integer or string
  item_id       required  integer or string
  timestamp     required  seconds since the epoch (integer or float; values from 1e11 up are
                          read as milli-, micro- or nanoseconds, with a warning), or a
                          timestamp type
  play_time_ms  optional  number >= 0 (empty/null: unknown)
  duration_ms   optional  number >= 0 (empty/null: unknown)
  like, follow, comment, share, dislike   optional  0/1 or boolean (empty/null: 0)
  click, cart, order      optional  0/1 or boolean (empty/null: 0): e-commerce behaviours
  behaviour               optional  the deepest e-commerce behaviour of the exposure, one of
                          exposure, click, cart, order (each implies the ones before it;
                          empty/null: exposure)
  scenario                optional  card, video or live, or 1, 2, 3 (empty/null: unknown): where
                          the product was shown; a request's scenario is its target's
  author_id, tag          optional  integer or string (empty/null: unknown)
Rows need not be sorted: events are ordered by (user, timestamp, item id) on load. Any problem gives
one `LogFormatError` naming the file, the column and the first bad row (0-based data row).
"""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from onerec_jax.data import schema
from onerec_jax.data.events import EventLog

REQUIRED = ("user_id", "item_id", "timestamp")
NUMERIC = ("play_time_ms", "duration_ms")
FLAGS = {
    "like": schema.LIKE,
    "follow": schema.FOLLOW,
    "comment": schema.COMMENT,
    "share": schema.SHARE,
    "dislike": schema.DISLIKE,
    "click": schema.CLICK,
    "cart": schema.CART,
    "order": schema.ORDER,
}
IDS = ("author_id", "tag")
# `behaviour`: the deepest step of the funnel, and the flag bits it implies.
BEHAVIOUR_BITS = {
    "exposure": 0,
    "click": schema.CLICK,
    "cart": schema.CLICK | schema.CART,
    "order": schema.CLICK | schema.CART | schema.ORDER,
}


class LogFormatError(ValueError):
    """A user log that cannot be read; the message names file, column and row."""


def _fail(path: os.PathLike, msg: str) -> LogFormatError:
    return LogFormatError(f"{path}: {msg}")


def read_table(path: os.PathLike) -> pa.Table:
    """Read a .parquet or .csv file into an Arrow table, with clear errors."""
    p = pathlib.Path(path)
    if not p.exists():
        raise _fail(p, "file not found")
    try:
        if p.suffix.lower() in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            table = pacsv.read_csv(p, parse_options=opts)
        else:
            table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        if p.stat().st_size == 0:
            raise _fail(p, "empty file (no header, no rows)") from e
        kind = "CSV" if p.suffix.lower() in (".csv", ".tsv") else "Parquet"
        raise _fail(p, f"cannot read as {kind}: {e}") from e
    return table


def _first_bad(values: list, ok) -> int:
    return next(i for i, v in enumerate(values) if not ok(v))


def _require_values(path: os.PathLike, col: pa.ChunkedArray, name: str) -> None:
    if col.null_count:
        row = _first_bad(col.to_pylist(), lambda v: v is not None)
        raise _fail(path, f"column {name!r} row {row}: missing value")


def _numbers(path: os.PathLike, table: pa.Table, name: str, optional: bool = False) -> np.ndarray:
    """Column as float64 (nulls of an optional column -> NaN); names the first bad row."""
    col = table.column(name)
    if optional and pa.types.is_null(col.type):  # an all-empty CSV column
        return np.full(len(col), np.nan)
    if optional and col.null_count:
        v = _numbers(
            path, pa.table({name: pc.fill_null(col, pa.scalar(0).cast(col.type))}), name
        ).copy()
        v[np.asarray(col.is_null())] = np.nan
        return v
    _require_values(path, col, name)
    if pa.types.is_timestamp(col.type):
        # Native unit to seconds; sub-second parts are kept as a fraction (floored on load).
        per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[col.type.unit]
        return np.array(col.cast(pa.int64()), np.float64) / per_s
    if (
        pa.types.is_boolean(col.type)
        or pa.types.is_integer(col.type)
        or pa.types.is_floating(col.type)
    ):
        # unsafe: integers beyond 2**53 (nanosecond times) lose only their last digits
        out = np.array(col.cast(pa.float64(), safe=False), np.float64)
    else:
        values = col.to_pylist()

        def ok(v) -> bool:
            try:
                float(v)
                return True
            except (TypeError, ValueError):
                return False

        if not all(ok(v) for v in values):
            i = _first_bad(values, ok)
            raise _fail(path, f"column {name!r} row {i}: expected a number, got {values[i]!r}")
        out = np.asarray([float(v) for v in values])
    if not np.isfinite(out).all():
        i = int(np.argmin(np.isfinite(out)))
        raise _fail(path, f"column {name!r} row {i}: not a finite number ({out[i]})")
    return out


# Plain-number timestamps by their size: seconds since the epoch stay below 1e11
# (the year 5138), so larger ones are milliseconds, microseconds or nanoseconds (the units
# logs are written in), read as such with a warning.
_UNITS = ((1e17, "nanoseconds", 1e9), (1e14, "microseconds", 1e6), (1e11, "milliseconds", 1e3))


def _unit(value: float) -> tuple[str, float]:
    for low, unit, per_s in _UNITS:
        if value >= low:
            return unit, per_s
    return "seconds", 1.0


def _in_seconds(path: os.PathLike, ts: np.ndarray) -> np.ndarray:
    """Plain-number timestamps in seconds: the unit read from the median (`_UNITS`); a value
    beyond int64, or of a larger unit than the median's (a stray value that would otherwise
    rescale a whole log), is refused naming its row. Sub-second order is not kept: events of
    one second are ordered by item id, as in any log in seconds."""
    big = ts >= 2.0**63
    if big.any():
        i = int(np.argmax(big))
        raise _fail(path, f"column 'timestamp' row {i}: {ts[i]:.6g} is beyond any time unit")
    unit, per_s = _unit(float(np.median(ts)))
    i = int(np.argmax(ts))
    if _unit(float(ts[i]))[0] != unit:
        raise _fail(
            path,
            f"column 'timestamp' row {i}: {ts[i]:.6g} reads as {_unit(float(ts[i]))[0]} "
            f"since the epoch, most of the column as {unit}: one unit per column",
        )
    if per_s != 1.0:
        top = float(ts[i])
        warnings.warn(
            f"{path}: column 'timestamp' reads as {unit} since the epoch (largest {top:.6g} = "
            f"{np.datetime64(int(top / per_s), 's')}); converted to seconds (write seconds "
            "to silence this)",
            stacklevel=3,
        )
    return ts / per_s


def _ids(path: os.PathLike, table: pa.Table, name: str, optional: bool = False) -> np.ndarray:
    """Integer or string ids; nulls of an optional column come back masked (np.ma)."""
    col = table.column(name)
    if optional and pa.types.is_null(col.type):
        return np.ma.masked_all(len(col), np.int64)
    if optional and col.null_count:
        if not (
            pa.types.is_integer(col.type)
            or pa.types.is_string(col.type)
            or pa.types.is_large_string(col.type)
        ):
            raise _fail(path, f"column {name!r}: expected integer or string ids, got {col.type}")
        nulls = np.asarray(col.is_null())
        filled = pc.fill_null(col, pa.scalar(0 if pa.types.is_integer(col.type) else "", col.type))
        return np.ma.masked_array(_ids(path, pa.table({name: filled}), name), mask=nulls)
    _require_values(path, col, name)
    if pa.types.is_unsigned_integer(col.type):
        return np.asarray(col.cast(pa.uint64()))
    if pa.types.is_integer(col.type):
        return np.asarray(col.cast(pa.int64()))
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.asarray(col.to_pylist(), dtype=object).astype(str)
    raise _fail(path, f"column {name!r}: expected integer or string ids, got {col.type}")


def _categories(
    path: os.PathLike, table: pa.Table, name: str, values: dict[str, int], numbered: bool = False
) -> np.ndarray:
    """A categorical column as the codes of `values` (nulls and empty strings: 0); with
    `numbered`, the codes themselves (1..n, as numbers or text) are accepted too. The first
    unknown value is one error naming its row. Vectorised: one pass over the distinct values."""
    col = table.column(name).combine_chunks()
    allowed = dict(values)
    if numbered:
        allowed.update({str(v): v for v in values.values()})
    if pa.types.is_null(col.type):
        return np.zeros(len(col), np.int64)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        num = np.asarray(pc.fill_null(col.cast(pa.float64()), np.nan), np.float64)
        missing = np.isnan(num)
        ok = missing | np.isin(num, [v for v in values.values()] if numbered else [])
        if not ok.all():
            i = int(np.argmin(ok))
            bad = f"{num[i]:g} is not one of {sorted(allowed)}"
            raise _fail(path, f"column {name!r} row {i}: {bad}")
        return np.where(missing, 0, np.nan_to_num(num)).astype(np.int64)
    text = pc.fill_null(col.cast(pa.string()), "")
    enc = pc.dictionary_encode(text)
    uniq = enc.dictionary.to_pylist()
    codes = np.zeros(len(uniq), np.int64)
    for j, v in enumerate(uniq):  # distinct values only
        if v == "":
            continue
        if v not in allowed:
            i = int(np.argmax(np.asarray(enc.indices) == j))
            raise _fail(path, f"column {name!r} row {i}: {v!r} is not one of {sorted(allowed)}")
        codes[j] = allowed[v]
    return codes[np.asarray(enc.indices)]


def load(path: os.PathLike) -> EventLog:
    """Validate and load a user log (see the module docstring for the columns)."""
    try:
        return _load(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise _fail(path, f"unreadable values: {e}") from e


def _load(path: os.PathLike) -> EventLog:
    table = read_table(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise _fail(path, f"missing required column {missing[0]!r} (columns: {table.column_names})")
    if table.num_rows == 0:
        raise _fail(path, "empty file (no rows)")
    cols = {"user": _ids(path, table, "user_id"), "item": _ids(path, table, "item_id")}
    ts = _numbers(path, table, "timestamp")
    if (ts < 0).any():
        raise _fail(
            path, f"column 'timestamp' row {int(np.argmax(ts < 0))}: negative time {ts[ts < 0][0]}"
        )
    if not pa.types.is_timestamp(table.column("timestamp").type):
        ts = _in_seconds(path, ts)
    extra = {}
    for name, key in (("play_time_ms", "play_ms"), ("duration_ms", "dur_ms")):
        if name in table.column_names:
            v = _numbers(path, table, name, optional=True)
            if (v < 0).any():
                i = int(np.argmax(v < 0))
                raise _fail(path, f"column {name!r} row {i}: negative value {v[i]}")
            extra[key] = v
    flags = np.zeros(table.num_rows, np.uint8)
    for name, bit in FLAGS.items():
        if name in table.column_names:
            v = np.nan_to_num(_numbers(path, table, name, optional=True), nan=0.0)
            bad = (v != 0) & (v != 1)
            if bad.any():
                i = int(np.argmax(bad))
                raise _fail(path, f"column {name!r} row {i}: expected 0 or 1, got {v[i]}")
            flags |= (v.astype(np.uint8) * bit).astype(np.uint8)
    if "behaviour" in table.column_names:
        flags |= _categories(path, table, "behaviour", BEHAVIOUR_BITS).astype(np.uint8)
    if "scenario" in table.column_names:
        names = {n: i for i, n in enumerate(schema.SCENARIOS, start=1)}
        extra["scenario"] = _categories(path, table, "scenario", names, numbered=True)
    for name in IDS:
        if name in table.column_names:
            extra["author" if name == "author_id" else "tag"] = _ids(
                path, table, name, optional=True
            )
    return EventLog.from_columns(
        pathlib.Path(path).name,
        user=cols["user"],
        item=cols["item"],
        ts=np.floor(ts).astype(np.int64),
        flags=flags,
        **extra,
    )


def write(path: os.PathLike, log: EventLog) -> None:
    """Write a log in the documented column schema (Parquet, or CSV by suffix), raw ids kept."""
    user = log.user_of_event()
    cols: dict[str, np.ndarray] = {
        "user_id": log.user_raw[user],
        "item_id": log.item_raw[log.item],
        "timestamp": log.ts,
        "play_time_ms": log.play_ms,
        "duration_ms": log.dur_ms,
    }
    for name, bit in FLAGS.items():
        cols[name] = ((log.flags & bit) != 0).astype(np.int8)
    # Dense author/tag ids are written as they are; 0 (unknown) becomes null.
    if log.scenario is not None:
        names = np.asarray(["", *schema.SCENARIOS], dtype=object)
        cols["scenario"] = pa.array(names[log.scenario], mask=log.scenario == 0)
    cols["author_id"] = pa.array(log.author, mask=log.author == 0)
    cols["tag"] = pa.array(log.tag, mask=log.tag == 0)
    for name in ("play_time_ms", "duration_ms"):
        cols[name] = pa.array(cols[name], mask=np.isnan(cols[name]))
    table = pa.table(cols)
    p = pathlib.Path(path)
    tmp = p.with_name(p.name + ".tmp")
    # Write beside, then rename: a failure never leaves a half-written file under the real name.
    if p.suffix.lower() == ".csv":
        pacsv.write_csv(table, tmp)
    else:
        pq.write_table(table, tmp)
    os.replace(tmp, p)
