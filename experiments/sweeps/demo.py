"""The `make demo` sweep: six micro rungs per family on the tiny world, one token budget.

    onerec sweep --sweep experiments/sweeps/demo.py --dir runs/demo

Loss against active non-embedding parameters N at fixed data (the V2 paper's L(N) form), for
V1 and V2, small enough for 2 CPU cores in about a quarter of an hour.
"""

from scaling.sweep import Sweep, grid

V1 = ("v1-0.07m", "v1-0.2m", "v1-0.45m", "v1-0.6m", "v1-1.1m", "v1-2.4m")
V2 = ("v2-0.09m", "v2-0.3m", "v2-0.6m", "v2-0.8m", "v2-1.7m", "v2-3.7m")
TOKENS = (100e3,)  # semantic-id tokens per run (~270 steps of 32 requests)


def get_sweep() -> Sweep:
    return Sweep(
        name="demo",
        config="scaling_micro",
        points=grid(V1 + V2, TOKENS),
        eval_requests=256,  # validation requests beam-searched for Recall@10 and engagement
        beam=32,
    )
