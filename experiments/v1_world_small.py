"""OneRec V1 on the small world (20,000 items) at the CPU rung v1-cpu-s: the run behind the
true-engagement table of RESULTS.md (about 10 min on 2 cores).

    .venv/bin/onerec train --config experiments/v1_world_small.py --workdir runs/v1_world_small
    .venv/bin/onerec eval --workdir runs/v1_world_small --split test --json
    .venv/bin/python benchmarks/world_engagement.py --workdir runs/v1_world_small

The config is the package's (onerec_jax/configs/v1_world_small.py).
"""

from onerec_jax.configs.v1_world_small import get_config

__all__ = ["get_config"]
