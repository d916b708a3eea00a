"""onerec_jax: OneRec generative recommenders in JAX/Flax, built for scaling studies."""

import glob as _glob
import importlib.util as _util
import os as _os

__version__ = "0.1.0"

# With the `tpu` extra (libtpu, for TPU plans) on a machine without a TPU, JAX would try to
# start a local TPU in every process and print libtpu's warnings; the plans need none. Where
# no TPU device node exists, JAX is pointed at the GPU (if its plugin is installed) or the
# CPU. An explicit JAX_PLATFORMS wins; on a TPU VM nothing changes.
if (
    "JAX_PLATFORMS" not in _os.environ
    and _util.find_spec("libtpu") is not None
    and not (_glob.glob("/dev/accel*") or _os.path.exists("/dev/vfio"))
):
    _os.environ["JAX_PLATFORMS"] = "cuda,cpu"
