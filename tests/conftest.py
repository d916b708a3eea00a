import os
import tempfile

# The tests run on the CPU; with the tpu extra installed, JAX would otherwise try (and fail,
# noisily) to start a local TPU in every process. TPU plans need no TPU (scaling/tpu_plan.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One host device per test process, and fail on silent rank promotion.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# One compilation cache for this test session and the training subprocesses it starts: the
# resume tests compile the same train step in several processes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="onerec-jax-cache-"))

# SciPy's fits are tiny problems: BLAS threads only contend with the other test worker (and
# a notebook kernel inherits this): one thread makes the fit tests ~5x faster on 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
