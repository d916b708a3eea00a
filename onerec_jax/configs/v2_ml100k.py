"""OneRec-V2 (lazy decoder-only) on MovieLens-100k (leave-last-out), sized for a 2-core CPU.

    onerec train --config v2_ml100k --workdir runs/v2_ml100k
    onerec eval --workdir runs/v2_ml100k --split test --json

The same data, pathways and schedule as v1_ml100k; the model is V2 at a similar parameter
count. Every field not set here is the default's (onerec_jax/configs/default.py).
"""

import ml_collections

from onerec_jax.configs import v1_ml100k


def get_config() -> ml_collections.ConfigDict:
    c = v1_ml100k.get_config()
    c.model.family = "v2"
    v2 = c.model.v2
    v2.n_layers = 4  # decoder blocks (V1 here: 1 encoder + 2 decoder blocks)
    v2.d_model = 64
    v2.d_ff = 128
    v2.context.d_model = 64  # the context pathways (no encoder stack)
    v2.context.d_ff = 128
    v2.context.n_queries = 16
    return c
