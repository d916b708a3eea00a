"""The papers' rungs, 0.015B-8B, for a cluster: plan it here, run it there.

    onerec sweep --sweep experiments/sweeps/paper_ladder.py --dir runs/ladder --dry-run --devices 8
    onerec sweep --sweep experiments/sweeps/paper_ladder.py --dir runs/ladder --print-commands

A grid of every V1 and V2 paper rung at two token budgets (loss vs N, and the (N, D) plane of
the chinchilla law), and iso-FLOP points of the dense V2 rungs at three compute budgets
(Chinchilla's approach 2); iso-FLOP points shorter than `min_steps` are left out. The large
world (4M items) stands in for a production log; point `source` at `parquet:PATH` for yours.
"""

from scaling.sweep import Sweep, grid, iso_flop

V1 = ("v1-0.015b", "v1-0.121b", "v1-0.935b", "v1-2.633b")
V2 = ("v2-0.1b", "v2-0.2b", "v2-0.5b", "v2-1b", "v2-2b", "v2-4b", "v2-8b", "v2-4b-a0.5b")
V2_DENSE = ("v2-0.1b", "v2-0.2b", "v2-0.5b", "v2-1b", "v2-2b", "v2-4b", "v2-8b")


def get_sweep() -> Sweep:
    return Sweep(
        name="paper_ladder",
        config="default",
        overrides=(
            "source=world:large",
            "world_seed=0",  # one world, one table for every point
            "batch_size=256",
            "bf16=True",
            "eval_requests=4096",
            "optim.learning_rate=3e-4",
            "optim.warmup_steps=500",
        ),
        points=grid(V1 + V2, (1e9, 1e10)) + iso_flop(V2_DENSE, (1e19, 1e20, 1e21)),
        eval_requests=2048,
        beam=128,
        checkpoints=20,
        min_steps=200,
    )
