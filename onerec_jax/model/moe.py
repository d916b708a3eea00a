"""Sparse mixture of SwiGLU experts: fp32 router, top-k, dropless or capacity dispatch.

Routing. Router logits are computed in float32 (bf16 logits flip near-tied top-k choices).
Gates are the softmax probabilities of the chosen experts, renormalised over the k chosen.

Balancing, two options:
  - loss-free (DeepSeek-V3): a per-expert bias is added to the scores only to *choose* experts;
    it lives in the "moe_bias" collection, outside the gradient, and the train step nudges it
    with `update_bias` from the measured load (underloaded experts up, overloaded down).
  - auxiliary loss (Switch/GShard): E * sum_e f_e * P_e, where f_e is the share of routed slots
    that went to expert e and P_e its mean router probability; exactly 1 for uniform routing.
Both are always measured; the config decides which one trains.

Dispatch:
  - dropless: the T*k (token, expert) slots are sorted by expert and each expert's contiguous
    run is multiplied by its weights with one grouped matmul (`jax.lax.ragged_dot`): no slot is
    ever dropped and no padding FLOPs are spent.
  - capacity: each expert takes at most C = ceil(capacity_factor * T * k / E) slots, earlier
    tokens first; the rest are dropped (their share of the output is zero) and counted.
    Slots are scattered into per-expert [E, C, D] buffers and gathered back (index moves, no
    one-hot matmuls), the [E, C, ...] layout that shards over an "expert" mesh axis.

On XLA:CPU `ragged_dot` is lowered densely: measured 6.7x the time of one dense matmul of the
same rows at E = 8 and 28x at E = 32 (8,192 rows, 256 -> 512), i.e. it pays for every expert
on every row. CPU runs of MoE models should use capacity dispatch; on GPU/TPU ragged_dot is a
grouped matmul.

Shapes (STYLE.md glossary): T tokens, D model width, F expert width, E experts, k chosen, C
capacity.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from onerec_jax.model.layers import SwiGLU, dense_init


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    n_experts: int = 8  # E routed experts
    top_k: int = 2
    d_ff: int = 256  # F, hidden width of each expert
    n_shared: int = 0  # shared experts, always active (one SwiGLU of width n_shared * d_ff)
    dispatch: str = "dropless"  # "dropless" | "capacity"
    capacity_factor: float = 1.25
    balance: str = "loss_free"  # "loss_free" | "aux_loss" | "none"
    bias_rate: float = 1e-3  # loss-free: bias step per update (DeepSeek-V3's gamma)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"MoEConfig: need 1 <= top_k <= n_experts, got {self.top_k}")
        if self.dispatch not in ("dropless", "capacity"):
            raise ValueError(f"MoEConfig.dispatch: unknown {self.dispatch!r}")
        if self.balance not in ("loss_free", "aux_loss", "none"):
            raise ValueError(f"MoEConfig.balance: unknown {self.balance!r}")


def route(
    x_TxD: jax.Array, w_DxE: jax.Array, bias_E: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chosen experts [T, k], their gates [T, k] (sum to 1) and the router probs [T, E]."""
    logits = jnp.dot(x_TxD.astype(jnp.float32), w_DxE.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    _, experts = jax.lax.top_k(probs + jax.lax.stop_gradient(bias_E)[None, :], k)
    gates = jnp.take_along_axis(probs, experts, axis=-1)
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return experts, gates, probs


def aux_loss(experts_TxK: jax.Array, probs_TxE: jax.Array) -> jax.Array:
    """E * sum_e f_e * P_e: 1.0 when routing is uniform, up to E when it collapses."""
    e = probs_TxE.shape[-1]
    f = jnp.bincount(experts_TxK.reshape(-1), length=e) / experts_TxK.size
    return e * jnp.sum(f * jnp.mean(probs_TxE, axis=0))


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """Loss-free balancing step: raise the bias of experts below the mean load, lower the rest."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def _experts_dropless(x_TxD, experts_TxK, w_gate, w_up, w_down):
    t, k = experts_TxK.shape
    e = w_gate.shape[0]
    flat = experts_TxK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    x_sorted = x_TxD[order // k]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    f32 = jnp.float32
    g = jax.lax.ragged_dot(x_sorted, w_gate, sizes, preferred_element_type=f32)
    u = jax.lax.ragged_dot(x_sorted, w_up, sizes, preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(x_TxD.dtype)
    y_sorted = jax.lax.ragged_dot(h, w_down, sizes, preferred_element_type=f32)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    return y.reshape(t, k, -1), jnp.ones((t, k), bool)


def _experts_capacity(x_TxD, experts_TxK, w_gate, w_up, w_down, capacity):
    t, k = experts_TxK.shape
    e = w_gate.shape[0]
    onehot_TxKxE = jax.nn.one_hot(experts_TxK, e, dtype=jnp.int32)
    # Position of each slot in its expert's queue, tokens in order (slot j of token t before
    # slot j of token t + 1; a token's k slots go to k different experts).
    pos_TxKxE = jnp.cumsum(onehot_TxKxE.reshape(t * k, e), axis=0).reshape(t, k, e) - 1
    pos_TxK = jnp.sum(pos_TxKxE * onehot_TxKxE, axis=-1)
    kept_TxK = pos_TxK < capacity
    # Scatter kept slots into [E, C + 1, D] buffers (row C collects the dropped ones and is
    # discarded) and gather the results back: index moves, not one-hot matmuls, so the only
    # FLOPs are the experts' own E * C * D * F.
    slot = jnp.where(kept_TxK, pos_TxK, capacity)
    x_TxKxD = jnp.broadcast_to(x_TxD[:, None, :], (t, k, x_TxD.shape[-1]))
    buf = jnp.zeros((e, capacity + 1, x_TxD.shape[-1]), x_TxD.dtype)
    x_ExCxD = buf.at[experts_TxK, slot].set(x_TxKxD, mode="drop")[:, :capacity]
    f32 = jnp.float32
    g = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate, preferred_element_type=f32)
    u = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up, preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(x_TxD.dtype)
    y_ExCxD = jnp.einsum("ecf,efd->ecd", h, w_down, preferred_element_type=f32)
    y_TxKxD = y_ExCxD[experts_TxK, jnp.minimum(slot, capacity - 1)]
    return jnp.where(kept_TxK[..., None], y_TxKxD, 0.0), kept_TxK


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared ones). Returns (y, stats); stats holds `load`
    [E] (share of routed slots), `dropped` (share of slots dropped), `aux_loss`, `max_load`
    (largest load / mean load)."""

    cfg: MoEConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.cfg
        b, length, d = x_BxLxD.shape
        e, f = c.n_experts, c.d_ff
        x_TxD = x_BxLxD.reshape(b * length, d).astype(self.dtype)
        w_router = self.param(
            "router", nn.with_logical_partitioning(dense_init, ("embed", "expert")), (d, e)
        )
        bias = self.variable("moe_bias", "bias", lambda: jnp.zeros(e, jnp.float32))
        experts, gates, probs = route(x_TxD, w_router, bias.value, c.top_k)

        def expert_param(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
            init = nn.with_logical_partitioning(dense_init, axes)
            return self.param(name, init, shape).astype(self.dtype)

        w_gate = expert_param("w_gate", (e, d, f), ("expert", "embed", "mlp"))
        w_up = expert_param("w_up", (e, d, f), ("expert", "embed", "mlp"))
        w_down = expert_param("w_down", (e, f, d), ("expert", "mlp", "embed"))
        if c.dispatch == "dropless":
            y_TxKxD, kept = _experts_dropless(x_TxD, experts, w_gate, w_up, w_down)
        else:
            cap = math.ceil(c.capacity_factor * b * length * c.top_k / e)
            y_TxKxD, kept = _experts_capacity(x_TxD, experts, w_gate, w_up, w_down, cap)
        y_TxD = jnp.einsum("tk,tkd->td", gates * kept, y_TxKxD.astype(jnp.float32))
        if c.n_shared:
            y_TxD = y_TxD + SwiGLU(c.n_shared * f, dtype=self.dtype, name="shared")(x_TxD)
        load = jnp.bincount(experts.reshape(-1), length=e) / experts.size
        stats = {
            "load": load,
            "max_load": jnp.max(load) * e,
            "dropped": 1.0 - jnp.mean(kept.astype(jnp.float32)),
            "aux_loss": aux_loss(experts, probs),
        }
        return y_TxD.reshape(b, length, d).astype(x_BxLxD.dtype), stats
