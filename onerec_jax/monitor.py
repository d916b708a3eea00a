"""What a user watches: TensorBoard scalars without TensorFlow, hyper-parameters as JSON beside
them, and progress (a bar on a terminal, plain lines in a log file). Used by every job that runs
for long: training, the tokenizer, the demo.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

from tensorboard.summary import Writer
from tqdm.auto import tqdm


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
