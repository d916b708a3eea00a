"""The validation loss the loop reports: the teacher-forced loss of the current state on a fixed
set of validation requests, with its standard error over requests."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from onerec_jax import sharding
from onerec_jax.data import schema
from onerec_jax.data.sources import distinct_requests, open_source
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import AddCodes
from onerec_jax.train.run_config import source_seed


def validation_batches(
    cfg: ml_collections.ConfigDict, spec: schema.SchemaSpec, codes: np.ndarray
) -> tuple[list[dict[str, np.ndarray]], int]:
    """The first `eval_requests` requests of the validation split (all of a smaller split), in
    batches of batch_size; the last batch is padded with requests whose targets are masked, so
    every batch has one compiled shape and the padding carries no loss."""
    src = open_source(cfg.source, seed=source_seed(cfg), split="validation")
    b = cfg.batch_size
    n = min(cfg.eval_requests, distinct_requests(src))
    add_codes, out = AddCodes(codes), []
    for start in range(0, n, b):
        idx = np.arange(start, min(start + b, n))
        pad = b - len(idx)
        idx = np.concatenate([idx, np.full(pad, idx[-1])])
        batch = schema.build_batch(src.raw_batch(idx, spec.history_window, spec), spec)
        if pad:
            # Item 0 gives -1 codes, so the padding is no target for the loss nor the MoE.
            batch["target_mask"][b - pad :] = False
            batch["target_item"][b - pad :] = 0
        out.append(add_codes.map(batch))
    return out, n


def global_rows(mesh: Any, host: np.ndarray) -> jax.Array:
    """A batch every process holds whole, as one global array split over the mesh's batch
    axes (each process copies only the rows of its own devices)."""
    return jax.make_array_from_callback(
        host.shape, sharding.batch_sharding(mesh), lambda index: host[index]
    )


def mean_and_stderr(loss_sums: np.ndarray, items: np.ndarray) -> tuple[float, float]:
    """Item-weighted mean loss over requests and its standard error.

    The mean is a ratio sum(l_r) / sum(n_r) of per-request loss sums and valid-item counts;
    its standard error is the delta-method one, sqrt(sum((l_r - mean * n_r)^2) * R / (R - 1))
    / sum(n_r) over the R requests that have a valid item.
    """
    keep = items > 0
    sums, n = loss_sums[keep].astype(np.float64), items[keep].astype(np.float64)
    if not len(n):
        return float("nan"), float("nan")
    mean = sums.sum() / n.sum()
    r = len(n)
    if r < 2:
        return float(mean), float("nan")
    se = np.sqrt(np.sum((sums - mean * n) ** 2) * r / (r - 1)) / n.sum()
    return float(mean), float(se)


class Validation:
    """`validation(state) -> (loss, standard error)` on the run's fixed validation requests
    (`eval_requests` of them; none when 0, and then `enabled` is False)."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        spec: schema.SchemaSpec,
        codes: Any,
        model: Any,
        mesh: Any = None,
    ):
        if cfg.eval_requests:
            self.batches, self.n_requests = validation_batches(cfg, spec, codes)
        else:
            self.batches, self.n_requests = [], 0
        self.mesh = mesh
        loss = functools.partial(step_lib.eval_loss, model=model)
        if mesh is None:
            self.batches = [jax.tree.map(jax.numpy.asarray, b) for b in self.batches]
            self._loss = jax.jit(loss)
            return
        # Requests split over the batch axes, as in training. Every process built the same
        # batches, so each puts its own devices' rows (`global_rows`); the per-request sums come
        # back replicated, readable on every process of a multi-host run.
        self.batches = [jax.tree.map(functools.partial(global_rows, mesh), b) for b in self.batches]
        self._loss = jax.jit(loss, out_shardings=sharding.replicated(mesh))

    @property
    def enabled(self) -> bool:
        return bool(self.batches)

    def __call__(self, state: Any) -> tuple[float, float]:
        with sharding.rules_on(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            out = [self._loss(state, b) for b in self.batches]
        sums = np.concatenate([np.asarray(m["loss_sum"]) for m in out])
        items = np.concatenate([np.asarray(m["items"]) for m in out])
        return mean_and_stderr(sums, items)
