"""What the loop feeds the model: the semantic-id codes of the targets, the batch layout of a
config, and the fixed validation requests with the standard error of their loss."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onerec_jax.data import schema
from onerec_jax.data.sources import distinct_requests, open_source
from onerec_jax.train.run_config import source_seed


class AddCodes(grain.transforms.Map):
    """Adds `target_codes` [B, M, Q] (the table's codes of target_item; -1 rows for padding)."""

    def __init__(self, codes: np.ndarray):
        self.codes = codes

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["target_codes"] = self.codes[batch["target_item"]]
        return batch


def schema_spec(cfg: ml_collections.ConfigDict) -> schema.SchemaSpec:
    d = cfg.data
    return schema.SchemaSpec(
        short_len=d.short_len, pos_len=d.pos_len, life_len=d.life_len, max_targets=d.max_targets
    )


def zero_batch(spec: schema.SchemaSpec, b: int, q: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((b, *shape), dt) for k, (shape, dt) in spec.shapes().items()}
    out["target_codes"] = np.zeros((b, spec.max_targets, q), np.int32)
    return out


def validation_batches(
    cfg: ml_collections.ConfigDict, spec: schema.SchemaSpec, codes: np.ndarray
) -> tuple[list[dict[str, jax.Array]], int]:
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
        out.append(jax.tree.map(jnp.asarray, add_codes.map(batch)))
    return out, n


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
