"""Small building blocks shared by V1 and V2, every parameter named with logical axes.

Parameters are float32; `dtype` is the compute dtype (bf16 on accelerators), with matmuls
accumulating in float32 (`preferred_element_type`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Fan-in scaled normal, the usual transformer init; one definition so every layer agrees.
dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), x.shape[-1:]
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class Dense(nn.Module):
    """x @ W (+ b) over the last axis, with logical names for W's (in, out) axes."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(dense_init, self.axes),
            (x.shape[-1], self.features),
        )
        y = jnp.einsum(
            "...d,df->...f",
            x.astype(self.dtype),
            w.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        if self.use_bias:
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                (self.features,),
            )
            y = y + b
        return y.astype(self.dtype)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down: D -> F -> D."""

    d_ff: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        g = Dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
        u = Dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
        return Dense(d, ("mlp", "embed"), dtype=self.dtype, name="down")(jax.nn.silu(g) * u)
