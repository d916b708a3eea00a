"""The rung ladder: parameter and FLOP plans of the named model sizes.

The rung table itself lives beside the models (onerec_jax/model/rungs.py, re-exported here);
this top layer plans them: `python -m scaling.ladder` prints every rung's counts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from onerec_jax.model.rungs import RUNGS, V1_RUNGS, V2_RUNGS, apply_rung

__all__ = ["RUNGS", "V1_RUNGS", "V2_RUNGS", "apply_rung", "main", "plan"]


class _Catalogue:
    """Catalogue sizes for the id tables of a plan (no data is read)."""

    def __init__(self, n_items: int):
        self.n_items, self.n_authors, self.n_tags = n_items, max(n_items // 10, 1), 256


def plan(name: str, n_items: int = 20_000, context_len: int = 512) -> dict[str, Any]:
    """Parameters and FLOPs of a rung, from `jax.eval_shape` (nothing is allocated).

    `flops_per_sample` is the matmul count of one training request (context + 5 targets x 3
    codes, forward + backward; onerec_jax/flops.py); `paper_*` is the V2 paper's accounting
    (6 x params x tokens, the context shared by 5 impressions, `context_len` context tokens,
    3 target tokens)."""
    from onerec_jax import flops
    from onerec_jax.config import load_file
    from onerec_jax.train import loop

    base = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "v1_world_tiny.py"
    cfg = apply_rung(load_file(base), name)
    codes = cfg.tokenizer_codes or 128
    model = loop.build_model(cfg, _Catalogue(n_items), (codes,) * 3)
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
