"""What a run reports while it trains: metrics.jsonl and TensorBoard scalars, steady-state
throughput, the counters that survive restarts, and the NaN guard on every step's loss."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
import warnings
from typing import Any

import ml_collections
import numpy as np

from onerec_jax.atomic import write_atomic
from onerec_jax.monitor import MetricWriter, drop_events_after


@dataclasses.dataclass
class Counters:
    """Run-level counters saved in every checkpoint (what summary.json reports across restarts).

    wall_s: training wall time of the sessions up to the checkpoint; train_loss: the last
    step's, so re-running a finished run reports what it did, not an empty session."""

    items_seen: float = 0.0
    eval_loss: float | None = None
    eval_loss_se: float | None = None
    train_loss: float | None = None
    wall_s: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Counters:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in known})


class Throughput:
    """Steps per second of steady-state training only: the clock starts once the first step's
    metrics are back (compilation done), and evaluation and checkpoint time is taken out."""

    def __init__(self) -> None:
        self.t, self.step, self.paused = 0.0, -1, 0.0

    def started(self, step: int) -> None:
        if self.step < 0:
            self.t, self.step, self.paused = time.perf_counter(), step, 0.0

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def steps_per_s(self, step: int) -> float | None:
        steps = step - self.step
        if self.step < 0 or steps <= 0:
            return None
        return steps / max(time.perf_counter() - self.t - self.paused, 1e-9)


def read_metrics(path: pathlib.Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a metrics.jsonl and whether its last line is torn (cut short by a kill or a
    full disk while it was written: no newline, or not JSON). A torn last line is left out
    with a warning naming the file; a broken line before the last is an error naming it."""
    if not path.exists():
        return [], False
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        text = path.read_bytes().decode("utf-8", "replace")
    lines = text.split("\n")
    complete, last = lines[:-1], lines[-1]  # `last` is "" when the file ends in a newline
    rows, torn = [], bool(last.strip())
    for i, ln in enumerate(complete, 1):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except ValueError as e:
            if i == len(complete) and not torn:  # the last line, cut and newline-terminated
                torn = True
                break
            raise ValueError(f"{path}:{i}: not a metrics line ({e}); fix or remove it") from None
        rows.append(row)
    if torn:
        warnings.warn(f"{path}: its last line is torn (cut short); left out", stacklevel=2)
    return rows, torn


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drop lines logged after the checkpoint a resumed run starts from (a killed run may have
    written them) and a torn last line, so metrics.jsonl reads as one uninterrupted run. The
    file is replaced whole (never emptied by a kill), and only when something is dropped."""
    rows, torn = read_metrics(path)
    keep = [r for r in rows if r["step"] <= step]
    if torn or len(keep) < len(rows):
        write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def append_metrics(path: pathlib.Path, row: dict[str, Any]) -> None:
    """One metrics row, appended in one write (a kill leaves a whole line or a torn tail that
    the next start drops); a failed write (disk full) is one error naming the file."""
    # A value that is not finite (an eval with < 2 targeted requests has no standard error)
    # is written as null: NaN is not JSON.
    clean = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
    line = json.dumps(clean, sort_keys=True, allow_nan=False) + "\n"
    try:
        with path.open("a") as f:
            f.write(line)
    except OSError as e:
        raise OSError(f"{path}: could not append metrics ({e.strerror or e})") from None


class RunLog:
    """Checks and logs each step's metrics: `record(step, metrics, ev)`.

    A non-finite loss raises FloatingPointError naming the step and the last good checkpoint.
    Every `log_every` steps (and at evals and the last step) the scalars go to TensorBoard and
    metrics.jsonl (only when `write`: the main process), with throughput and model FLOP/s by
    the analytic count (onerec_jax/flops.py).
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        start: int,
        counters: Counters,
        flops_per_sample: float,
        last_checkpoint: Any,
        write: bool = True,
    ):
        self.cfg, self.counters, self.flops = cfg, counters, flops_per_sample
        self.write = write  # False on the other processes of a multi-host run
        self.last_checkpoint = last_checkpoint  # () -> step of the newest checkpoint or None
        self.checkpoint_dir = workdir / "checkpoints"
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if write:
            truncate_metrics(self.path, start)
            drop_events_after(workdir / "tb", start)  # the same for TensorBoard's copy
            self.writer = MetricWriter(workdir / "tb")
        self.throughput = Throughput()

    def record(self, step: int, metrics: Any, ev: tuple[float, float] | None) -> None:
        """Step `step`'s metrics; `ev` is the validation loss of the state after that same step
        (None when the step had no eval)."""
        m = {k: np.asarray(v) for k, v in metrics.items()}
        loss = float(m["train/loss"])
        if not math.isfinite(loss):
            good = self.last_checkpoint()
            raise FloatingPointError(
                f"train loss is {loss} at step {step}; stopping. Last good checkpoint: "
                f"{'none' if good is None else f'step {good}'} in {self.checkpoint_dir}"
            )
        self.counters.items_seen += float(m["train/items"])
        self.counters.train_loss = loss
        self.throughput.started(step)
        if self.writer is None:
            return
        if not (step % self.cfg.log_every == 0 or step == self.cfg.steps or ev is not None):
            return
        scalars = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
        steps_per_s = self.throughput.steps_per_s(step)
        if steps_per_s is not None:
            scalars["perf/steps_per_s"] = steps_per_s
            scalars["perf/requests_per_s"] = steps_per_s * self.cfg.batch_size
            scalars["perf/gflops_per_s"] = steps_per_s * self.cfg.batch_size * self.flops / 1e9
        if ev is not None:
            scalars["eval/loss"], scalars["eval/loss_se"] = ev
        self.writer.scalars(step, scalars)
        append_metrics(self.path, {"step": step, **scalars})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
