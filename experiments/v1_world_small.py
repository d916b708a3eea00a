"""OneRec V1 on the small world (20,000 items) at the CPU rung v1-cpu-s: the run behind the
README's true-engagement table (about 10 min on 2 cores).

    .venv/bin/onerec train --config experiments/v1_world_small.py --workdir runs/v1_world_small
    .venv/bin/onerec eval --workdir runs/v1_world_small --split test --json
    .venv/bin/python benchmarks/world_engagement.py --workdir runs/v1_world_small

Every field not set here is the one of v1_world_tiny.py (documented there); the rung sets the
model widths and context lengths (onerec_jax/model/rungs.py).
"""

import pathlib

import ml_collections

from onerec_jax.config import load_file


def get_config() -> ml_collections.ConfigDict:
    c = load_file(pathlib.Path(__file__).with_name("v1_world_tiny.py"))
    c.source = "world:small"  # 20,000 items, 2,048 authors
    c.rung = "v1-cpu-s"  # d_model 64, 1 + 2 layers, context 20 / 32 / 64 events
    c.steps = 2000  # optimizer steps
    c.batch_size = 64  # requests per step
    c.checkpoint_every = 500  # steps between checkpoints
    c.eval_every = 250  # steps between validation-loss evals
    c.optim.learning_rate = 2e-3  # peak
    c.optim.warmup_steps = 100
    return c
