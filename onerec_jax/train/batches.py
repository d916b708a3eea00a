"""What the loop feeds the model: the semantic-id codes of the targets and the batch layout of
a config."""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from onerec_jax.data import schema


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
        short_len=d.short_len,
        pos_len=d.pos_len,
        life_len=d.life_len,
        max_targets=d.max_targets,
        scenarios=d.scenarios,
        click_len=d.click_len,
        cart_len=d.cart_len,
        order_len=d.order_len,
    )


def zero_batch(spec: schema.SchemaSpec, b: int, q: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((b, *shape), dt) for k, (shape, dt) in spec.shapes().items()}
    out["target_codes"] = np.zeros((b, spec.max_targets, q), np.int32)
    return out
