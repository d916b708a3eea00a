"""Simulated CPU devices for plans that compile for a mesh on a machine without it."""

from __future__ import annotations

import os
import sys


def simulate_devices(n: int) -> None:
    """Start JAX with `n` CPU devices (it reads XLA_FLAGS once, when its backend starts)."""
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != n:
            raise ValueError(f"JAX already started with {jax.device_count()} devices, not {n}")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
