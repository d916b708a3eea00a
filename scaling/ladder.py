"""The rung ladder: parameter and FLOP plans of the named model sizes.

The rung table itself lives beside the models (onerec_jax/model/rungs.py, re-exported here);
this top layer plans them: `python -m scaling.ladder` (or `onerec plan`) prints a rung's counts.
A plan resolves the package's default config with the rung, exactly as a run would, and
builds the model with `jax.eval_shape`: nothing is allocated.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import ml_collections

from onerec_jax import config, flops
from onerec_jax.configs import default
from onerec_jax.model.rungs import RUNGS, V1_RUNGS, V2_RUNGS
from onerec_jax.train.model_factory import build_model

__all__ = ["RUNGS", "V1_RUNGS", "V2_RUNGS", "main", "plan", "rung_config"]


class Catalogue:
    """Catalogue sizes for the id tables of a plan (no data is read)."""

    def __init__(self, n_items: int):
        self.n_items, self.n_authors, self.n_tags = n_items, max(n_items // 10, 1), 256


def rung_config(name: str) -> ml_collections.ConfigDict:
    """The package's default config resolved with rung `name` (an unknown name: one error)."""
    if name not in RUNGS:
        raise ValueError(f"unknown rung {name!r}; known rungs: {', '.join(sorted(RUNGS))}")
    return config.resolve(default.get_config(), [f"rung={name}"])


def plan(name: str, n_items: int = 20_000, context_len: int = 512) -> dict[str, Any]:
    """Parameters and FLOPs of a rung, from `jax.eval_shape` (nothing is allocated).

    `flops_per_sample` is the matmul count of one training request (context + 5 targets x 3
    codes, forward + backward; onerec_jax/flops.py); `paper_*` is the V2 paper's accounting
    (6 x params x tokens, the context shared by 5 impressions, `context_len` context tokens,
    3 target tokens)."""
    cfg = rung_config(name)
    codes = cfg.tokenizer_codes or 128
    model = build_model(cfg, Catalogue(n_items), (codes,) * 3)
    c = flops.counts(model)
    # Only active weights cost FLOPs: the routed experts a token skips are left out.
    decoder_active = c.params_decoder - (c.params_total - c.params_active)
    paper = flops.paper_flops_per_sample(c.params_context, decoder_active, context_len)
    return {
        "rung": name,
        "family": cfg.model.family,
        "catalogue_items": n_items,
        **c.params(),
        "flops_per_sample": c.flops_train,
        "flops_forward_per_sample": c.flops_forward,
        "paper_flops_per_sample": paper["total"],
        "paper_context_share": paper["context_share"],
        # Training state on one device, nothing sharded: float32 params, gradients and AdamW's
        # two moments (16 bytes per parameter); activations excluded. Per-device memory under a
        # mesh comes with the sharding issue.
        "train_state_bytes_unsharded": 16 * c.params_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Parameter and FLOP counts of the rungs.")
    ap.add_argument("rungs", nargs="*", default=sorted(RUNGS))
    args = ap.parse_args()
    for name in args.rungs:
        print(json.dumps(plan(name), sort_keys=True))


if __name__ == "__main__":
    main()
