"""The shared base of the micro-rung sweeps (experiments/sweeps/demo.py, micro.py): the tiny
world, one world and one table for every point, the same loss and optimisation for both
families; a sweep sets the rung, seed and steps of each run.
"""

import ml_collections

from onerec_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.source = "world:tiny"  # 500 items: the world's entropy floor is known exactly
    c.rung = "v1-0.07m"  # set per point
    c.world_seed = 0  # one world for every seed: one tokenizer table serves the whole sweep
    # Both families train the mean over the semantic-id levels (the V2 paper's loss), so their
    # gradients are comparable at one learning rate; the results table reports NLL per item.
    c.model.v1.loss = "mean"
    c.model.v2.loss = "mean"
    c.batch_size = 32
    c.log_every = 10
    c.eval_requests = 1024  # validation requests behind the loss a fit reads (SE ~0.05 nats)
    c.optim.learning_rate = 2e-3  # peak
    return c
