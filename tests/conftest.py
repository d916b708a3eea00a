import os

# One host device per test process, and fail on silent rank promotion.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
