"""The training loss of V1 and V2 from their per-level NLL terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_fn(
    nll_BxMxQ: jax.Array, valid_BxM: jax.Array, mode: str = "sum"
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean, over the valid target items (`valid_BxM`), of each item's level terms
    combined by `mode`: "sum" over the Q levels (the V1 report's loss) or their "mean" (the V2
    paper's mean over target tokens). Padded items weigh nothing; with no valid item the loss
    is 0, not 0/0.

    Returns (loss, metrics): `loss` again, `items` (the number of valid items) and
    `nll_per_level` [Q] (each level's mean NLL over the valid items)."""
    per_item_BxM = jnp.sum(nll_BxMxQ, -1) if mode == "sum" else jnp.mean(nll_BxMxQ, -1)
    w_BxM = valid_BxM.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w_BxM), 1.0)
    loss = jnp.sum(per_item_BxM * w_BxM) / n
    per_level_Q = jnp.sum(nll_BxMxQ * w_BxM[..., None], axis=(0, 1)) / n
    return loss, {"loss": loss, "items": jnp.sum(w_BxM), "nll_per_level": per_level_Q}
