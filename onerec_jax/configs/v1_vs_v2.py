"""The shared base of every run of the V1 vs V2 sweep (experiments/v1_vs_v2.py): the small
world, one world for all seeds, the same loss and optimisation for both families; the sweep
sets the rung, seed, steps and schedule of each run.
"""

import ml_collections

from onerec_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.source = "world:small"  # 20,000 items
    c.rung = "v1-cpu-s"  # overridden per run
    c.world_seed = 0  # one world for every seed, so one tokenizer table serves all runs
    # Both families train the mean over the semantic-id levels (the V2 rungs set it too), so
    # their gradients are comparable at one learning rate and clip norm.
    c.model.v1.loss = "mean"
    c.model.v2.loss = "mean"
    c.batch_size = 64  # requests per step
    c.log_every = 10
    c.eval_requests = 2048  # validation requests per eval (standard error ~0.3 % of the loss)
    c.optim.learning_rate = 2e-3  # peak
    return c
