"""OneRec V1 on MovieLens-100k (leave-last-out), sized for a 2-core CPU.

    onerec train --config v1_ml100k --workdir runs/v1_ml100k
    onerec eval --workdir runs/v1_ml100k --split test --json

Every field not set here is the default's (onerec_jax/configs/default.py documents them).
"""

import ml_collections

from onerec_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.source = "movielens-100k"  # 1,682 items, 943 users; leave-last-out splits
    c.steps = 1500  # optimizer steps
    c.batch_size = 64  # requests per step
    c.checkpoint_every = 500  # steps between checkpoints
    # Every prefix of a user's training history is an example with one target, the setting of
    # the next-item test target (sessions of 5: validation NDCG@10 0.0XXX; README table)
    c.data.log_session_len = 1
    c.data.max_targets = 1
    c.data.pos_len = 64  # positive-feedback pathway events (report: 256)
    c.data.life_len = 128  # lifelong pathway events (report: 2000; most users have fewer)
    c.model.v1.encoder.d_model = 64  # D
    c.model.v1.encoder.d_ff = 128  # encoder / QFormer FFN width
    c.model.v1.d_ff = 128  # decoder FFN width
    c.model.v1.encoder.n_queries = 16  # QFormer queries over the lifelong pathway
    c.optim.warmup_steps = 100
    return c
