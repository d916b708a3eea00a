"""OneRec V1 on MovieLens-100k (leave-last-out), sized for a 2-core CPU.

    .venv/bin/onerec train --config experiments/v1_ml100k.py --workdir runs/v1_ml100k
    .venv/bin/onerec eval --workdir runs/v1_ml100k --split test --json

Every field not set here is the one of v1_world_tiny.py (documented there).
"""

import pathlib

import ml_collections

from onerec_jax.config import load_file


def get_config() -> ml_collections.ConfigDict:
    c = load_file(pathlib.Path(__file__).with_name("v1_world_tiny.py"))
    c.source = "movielens-100k"  # 1,682 items, 943 users; leave-last-out splits
    c.steps = 1500  # optimizer steps
    c.batch_size = 64  # requests per step
    c.checkpoint_every = 500  # steps between checkpoints
    c.data.pos_len = 64  # positive-feedback pathway events (report: 256)
    c.data.life_len = 128  # lifelong pathway events (report: 2000; most users have fewer)
    c.model.d_model = 64  # D
    c.model.d_ff = 128  # FFN width
    c.model.n_queries = 16  # QFormer queries over the lifelong pathway
    c.optim.warmup_steps = 100
    return c
