"""OneRec-V2 on MovieLens-100k (leave-last-out), sized for a 2-core CPU.

    .venv/bin/onerec train --config experiments/v2_ml100k.py --workdir runs/v2_ml100k
    .venv/bin/onerec eval --workdir runs/v2_ml100k --split test --json

The config is the package's (onerec_jax/configs/v2_ml100k.py); copy this file to derive one.
"""

from onerec_jax.configs.v2_ml100k import get_config

__all__ = ["get_config"]
