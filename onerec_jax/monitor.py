"""What a user watches: TensorBoard scalars without TensorFlow, hyper-parameters as JSON beside
them, and progress (a bar on a terminal, plain lines in a log file). Used by every job that runs
for long: training, the tokenizer, the demo.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from tensorboard.summary import Writer
from tqdm.auto import tqdm


def drop_events_after(logdir: os.PathLike, step: int) -> None:
    """Rewrite `logdir`'s event files without the events of steps after `step` (a resumed run
    replays those steps; TensorBoard would show each of them twice) and without a torn last
    record (a killed writer's). A file is replaced whole, and only when something is dropped."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(pathlib.Path(logdir).glob("*tfevents*")):
        records = list(RawEventFileLoader(str(path)).Load())  # stops at a torn record
        keep = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        size = sum(len(r) + 16 for r in records)  # 16 bytes of framing per record
        if len(keep) == len(records) and size == path.stat().st_size:
            continue
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".rewrite-")  # not *tfevents*
        with os.fdopen(fd, "wb") as f:
            out = RecordWriter(f)
            for r in keep:
                out.write(r)
            out.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class MetricWriter:
    """Writes namespaced scalars (train/, eval/, perf/, moe/, data/) to `logdir`."""

    def __init__(self, logdir: os.PathLike):
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = Writer(str(self.logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            self._writer.add_scalar(tag, float(v), step=int(step))

    def hparams(self, values: Mapping[str, Any]) -> None:
        """Hyper-parameters of the run, written once at step 0 (TensorBoard's HParams needs TF)."""
        path = self.logdir / "hparams.json"
        path.write_text(json.dumps(dict(values), indent=2, sort_keys=True, default=str) + "\n")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """A bar on a terminal; on a file (CI, batch-job logs) a plain line every ~5 % of the run
    instead of a stream of carriage-return frames. Disabled: silent (the other processes of a
    multi-host run, whose main process reports)."""

    def __init__(self, start: int, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)
        self.bar = tqdm(initial=start, total=total, desc="train") if self.tty and enabled else None

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.enabled and (done % self.every == 0 or done == self.total):
            print(f"train: step {done}/{self.total} loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
