"""The results table of a sweep: one JSONL row per finished run, what a scaling fit reads.

Rows are appended under an exclusive lock (fcntl.flock: several runners on one machine), in
one write of one whole line, flushed and fsynced; a writer that died mid-line leaves a torn tail,
which the next append cuts off under the lock and which `read_rows` skips with a warning, so a
reader never sees half a row. `to_parquet` exports the table for notebooks and dataframes.

A row (`run_row`) comes from a run's summary.json: family, rung, parameter counts (`n_active`
is the active non-embedding count, the N of the fits), tokens and FLOPs seen, final and
smoothed train loss, eval loss with its standard error, wall time, hardware and whether the
run repeated data; `extra` adds what the caller measured after training (Recall@10, the
world's true engagement).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pathlib
import platform
import time
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[int]:
    """The table, opened after taking the lock of its lock file (a separate file: `sync_table`
    replaces the table, and a lock on a replaced file would guard nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        os.close(lock)  # closing releases the lock


def _append_locked(fd: int, line: bytes) -> None:
    size = os.fstat(fd).st_size
    if size:
        # A torn last line (a writer killed mid-write) is cut off, not continued.
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, size)
        end = data.rfind(b"\n") + 1
        if end != size:
            os.ftruncate(fd, end)
    os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, line)
    os.fsync(fd)


def line(row: dict[str, Any]) -> bytes:
    """A row as one JSON line (NaN and infinities are refused: not JSON)."""
    return (json.dumps(row, sort_keys=True, allow_nan=False) + "\n").encode()


def append_row(path: str | pathlib.Path, row: dict[str, Any]) -> None:
    """Append `row` as one JSON line (NaN and infinities are refused: not JSON)."""
    text = line(row)
    with _locked(pathlib.Path(path)) as fd:
        _append_locked(fd, text)


def append_missing(path: str | pathlib.Path, rows: list[dict[str, Any]], key: str) -> int:
    """Append the rows whose `key` is not in the table yet, in one check-and-append under the
    table's lock (two runners adding the same row add it once); returns how many."""
    path = pathlib.Path(path)
    lines = [(r[key], line(r)) for r in rows]
    with _locked(path) as fd:
        have = {r.get(key) for r in _rows(path, warn=False)}
        new = [text for k, text in lines if k not in have]
        for text in new:
            _append_locked(fd, text)
    return len(new)


def sync_table(path: str | pathlib.Path, rows: list[dict[str, Any]], key: str) -> int:
    """Make the table hold exactly `rows` (one per `key`): rows it lacks are appended; when a
    row it holds differs (re-run) or has no counterpart (its point's results were dropped),
    the table is rewritten whole (a temporary file renamed over it, under the lock). Returns
    how many rows changed."""
    path = pathlib.Path(path)
    want = {r[key]: r for r in rows}
    with _locked(path) as fd:
        have = _rows(path, warn=False)
        stale = [r for r in have if want.get(r.get(key)) != r]
        present = {r.get(key) for r in have}
        if not stale:
            new = [r for k, r in want.items() if k not in present]
            for r in new:
                _append_locked(fd, line(r))
            return len(new)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
        with open(tmp, "wb") as f:
            f.write(b"".join(map(line, want.values())))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old table or the new, never a mix
        return len(stale) + len(set(want) - present)


def read_rows(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The table's rows; a torn last line is skipped with a warning, a broken line elsewhere
    is one error naming the file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results table")
    return _rows(path, warn=True)


def _rows(path: pathlib.Path, warn: bool) -> list[dict[str, Any]]:
    lines = path.read_text().split("\n")
    if lines[-1] and warn:
        warnings.warn(f"{path}: skipping a torn last line (a writer died mid-row)", stacklevel=2)
    rows = []
    for i, text in enumerate(lines[:-1], 1):
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON row ({e.msg})") from None
    return rows


def smoothed_loss(metrics_path: pathlib.Path, share: float = 0.1) -> float | None:
    """Mean train loss over the last `share` of the logged steps (at least one): the final
    loss with the step-to-step noise of one batch averaged out."""
    if not metrics_path.is_file():
        return None
    from onerec_jax.train.run_log import read_metrics  # (keeps this module's import light)

    rows, _ = read_metrics(metrics_path)  # a torn last line left out, with a warning
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    if not losses:
        return None
    tail = losses[-max(1, math.ceil(share * len(losses))) :]
    return float(sum(tail) / len(tail))


def hardware() -> str:
    """The machine a run trained on, in a few words (JAX's devices and the host)."""
    import jax

    kinds = sorted({d.device_kind for d in jax.devices()})
    return f"{jax.device_count()} x {'/'.join(kinds)} ({platform.machine()})"


def _per_item(workdir: pathlib.Path, n_levels: int) -> float:
    """The factor from a run's loss to NLL per item: the levels' count when its loss is their
    mean (the V2 paper's), 1 when it is their sum (the V1 report's)."""
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run has no config")
    model = json.loads(path.read_text())["model"]
    mode = model[model["family"]]["loss"]
    return float(n_levels) if mode == "mean" else 1.0


def _scaled(x: float | None, factor: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x * factor


def run_row(
    workdir: str | pathlib.Path, extra: dict[str, Any] | None = None, **labels: Any
) -> dict[str, Any]:
    """The table row of a finished run in `workdir` (its summary.json and config.json);
    `labels` (family, budget, ...) and `extra` (recall@10, engagement) are added as given.
    Losses are NLL per item in nats (the levels' terms summed) for every family, so V1 and V2
    rows share one scale and compare with the world's entropy floor."""
    workdir = pathlib.Path(workdir)
    path = workdir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run has no summary (not finished?)")
    s = json.loads(path.read_text())
    if s.get("status") != "finished":
        raise ValueError(f"{path}: status {s.get('status')!r}, not a finished run")
    per_item = _per_item(workdir, len(s["vocab"]))
    row = {
        "workdir": str(workdir),
        "rung": s.get("rung", ""),
        "n_total": s["params_total"],
        "n_active": s["params_active"] - s["params_embedding"],
        "n_non_embedding": s["params_non_embedding"],
        "tokens": s["tokens_seen"],
        "samples": s["samples_seen"],
        "flops": s["flops_seen"],
        "steps": s["step"],
        "train_loss_smoothed": _scaled(smoothed_loss(workdir / "metrics.jsonl"), per_item),
        # the held-out loss a fit reads: NLL per item (nats), whatever the training objective
        "loss": _scaled(s["final_eval_loss"], per_item),
        "loss_se": _scaled(s["final_eval_loss_se"], per_item),
        "loss_objective": s["final_eval_loss"],  # the same in the run's own loss (its mode)
        "train_loss": _scaled(s["final_train_loss"], per_item),
        "wall_s": s["wall_s_total"],
        "hardware": hardware(),
        "repeated_data": s["data_passes"] > 1,
        "data_passes": s["data_passes"],
    }
    row = {**labels, **row, **(extra or {})}
    # Non-finite figures (a run that diverged at its last step) become null: a row is JSON.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def to_parquet(rows: list[dict[str, Any]], out: str | pathlib.Path) -> pathlib.Path:
    """Write the rows as a Parquet file (columns: the union of the rows' keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pathlib.Path(out)
    keys = sorted({k for r in rows for k in r})
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    pq.write_table(table, out)
    return out
