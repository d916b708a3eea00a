"""TensorBoard scalars without TensorFlow, plus the run's hyper-parameters as JSON beside them."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from tensorboard.summary import Writer


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
