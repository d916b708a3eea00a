"""OneRec V1 on the small world (20,000 items) at the CPU rung v1-cpu-s: the run behind the
true-engagement table of RESULTS.md (about 10 min on 2 cores).

    onerec train --config v1_world_small --workdir runs/v1_world_small
    onerec eval --workdir runs/v1_world_small --split test --json
    python benchmarks/world_engagement.py --workdir runs/v1_world_small

Every field not set here is the default's (onerec_jax/configs/default.py); the rung sets the
model widths and context lengths (onerec_jax/model/rungs.py).
"""

import ml_collections

from onerec_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.source = "world:small"  # 20,000 items, 2,048 authors
    c.rung = "v1-cpu-s"  # d_model 64, 1 + 2 layers, context 20 / 32 / 64 events
    c.steps = 2000  # optimizer steps
    c.batch_size = 64  # requests per step
    c.checkpoint_every = 500  # steps between checkpoints
    c.eval_every = 250  # steps between validation-loss evals
    c.optim.learning_rate = 2e-3  # peak
    c.optim.warmup_steps = 100
    return c
