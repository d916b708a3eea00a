import os
import tempfile

# One host device per test process, and fail on silent rank promotion.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# One compilation cache for this test session and the training subprocesses it starts: the
# resume tests compile the same train step in several processes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="onerec-jax-cache-"))

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
