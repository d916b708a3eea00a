"""OneRec V1 on the tiny world: the CPU smoke run (seconds per hundred steps on 2 cores).

    .venv/bin/onerec train --config experiments/v1_world_tiny.py --workdir runs/v1_tiny

It is the package's base config (onerec_jax/configs/default.py documents every field).
"""

from onerec_jax.configs.default import get_config

__all__ = ["get_config"]
