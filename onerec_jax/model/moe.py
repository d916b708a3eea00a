"""Sparse mixture of SwiGLU experts: fp32 router, top-k, dropless or capacity dispatch.

Routing. Router logits are computed in float32 (bf16 logits flip near-tied top-k choices).
Gates are the softmax probabilities of the chosen experts, renormalised over the k chosen when
k > 1. With k = 1 the gate is the raw probability (as in Switch Transformer): renormalising a
single gate makes it exactly 1, and the router would get no gradient from the output at all.

Balancing, two options:
  - loss-free (DeepSeek-V3): a per-expert bias is added to the scores only to *choose* experts;
    it lives in the "moe_bias" collection, outside the gradient, and the train step nudges it
    with `update_bias` from the measured load (underloaded experts up, overloaded down).
  - auxiliary loss (Switch/GShard): E * sum_e f_e * P_e, where f_e is the share of routed slots
    that went to expert e and P_e its mean router probability; exactly 1 for uniform routing.
Both are always measured; the config decides which one trains.

Token mask. `mask` [B, L] marks the valid tokens; the rest (padding target items, identical
across users, which would all pile onto the same experts) get no expert slot, take no
capacity, get zero routed output and are left out of `load`, `max_load`, `dropped` and
`aux_loss`. A batch's valid tokens are therefore routed, admitted and counted exactly as they
would be without the padding.

Dispatch:
  - dropless: the T*k (token, expert) slots are sorted by expert and each expert's contiguous
    run is multiplied by its weights with one grouped matmul (`jax.lax.ragged_dot`): no slot is
    ever dropped and no empty buffer rows are computed. (Masked tokens still ride along in the
    static T*k rows; their results are discarded.)
  - capacity: each expert admits at most ceil(capacity_factor * T_valid * k / E) slots, valid
    tokens in order first; the rest are dropped (their share of the output is zero) and
    counted. The admission limit counts only the valid tokens T_valid (a traced value), but
    XLA needs static shapes, so the buffers keep the size C = ceil(capacity_factor * T * k / E)
    of all T tokens: padding costs buffer rows (FLOPs, see onerec_jax/flops.py), never
    admissions. Both are one float32 multiply and a ceil (`expert_capacity`), so with no
    padding the two are equal. Slots are scattered into per-expert [E, C, D] buffers and
    gathered back (index moves, no one-hot matmuls), the [E, C, ...] layout that shards over an
    "expert" mesh axis.
`MoE.__call__(..., dispatch=...)` overrides the config's dispatch with the same parameters:
generation decodes dropless, because capacity shared by all B x W beam rows of a step would
make a user's beams depend on its batch mates.

On XLA:CPU `ragged_dot` is lowered densely: measured 6.7x the time of one dense matmul of the
same rows at E = 8 and 28x at E = 32 (8,192 rows, 256 -> 512), i.e. it pays for every expert
on every row. CPU runs of MoE models should use capacity dispatch; on GPU/TPU ragged_dot is a
grouped matmul.

Shape suffixes (x_TxD): T tokens, D model width, F expert width, E experts, k chosen, C capacity.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onerec_jax.model import expert_parallel
from onerec_jax.model.layers import SwiGLU, dense_init, grouped_swiglu


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

    def capacity(self, tokens: int) -> int:
        """Static per-expert buffer size C for `tokens` tokens (see `expert_capacity`)."""
        return int(expert_capacity(self, np.float32(tokens)))


def expert_capacity(cfg: MoEConfig, tokens: jax.Array | np.floating) -> jax.Array | np.floating:
    """ceil(capacity_factor * tokens * k / E), as one float32 multiply and a ceil, so the
    static buffer size (NumPy, all tokens) and the traced admission limit (jnp, valid tokens)
    agree exactly when no token is masked. `tokens` is float32; so is the result."""
    rate = np.float32(cfg.capacity_factor * cfg.top_k / cfg.n_experts)
    return (jnp if isinstance(tokens, jax.Array) else np).ceil(rate * tokens)


def route(
    x_TxD: jax.Array, w_DxE: jax.Array, bias_E: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chosen experts [T, k], their gates [T, k] and the router probs [T, E]. Gates sum to 1
    for k > 1; for k = 1 the gate is the raw probability (module docstring)."""
    logits = jnp.dot(x_TxD.astype(jnp.float32), w_DxE.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    _, experts = jax.lax.top_k(probs + jax.lax.stop_gradient(bias_E)[None, :], k)
    gates = jnp.take_along_axis(probs, experts, axis=-1)
    if k > 1:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return experts, gates, probs


def aux_loss(
    experts_TxK: jax.Array, probs_TxE: jax.Array, valid_T: jax.Array | None = None
) -> jax.Array:
    """E * sum_e f_e * P_e over the valid tokens (all if `valid` is None): 1.0 when routing
    is uniform, up to E when it collapses."""
    t, k = experts_TxK.shape
    e = probs_TxE.shape[-1]
    w_T = jnp.ones(t, jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w_T), 1.0)
    slot_w = jnp.broadcast_to(w_T[:, None], (t, k)).reshape(-1)
    f = jnp.bincount(experts_TxK.reshape(-1), weights=slot_w, length=e) / (n * k)
    p = jnp.sum(probs_TxE * w_T[:, None], axis=0) / n
    return e * jnp.sum(f * p)


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """Loss-free balancing step: raise the bias of experts below the mean load, lower the rest."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def _experts_dropless(x_TxD, experts_TxK, valid_T, w_gate, w_up, w_down):
    t, k = experts_TxK.shape
    x_slots = jnp.repeat(x_TxD, k, axis=0)  # slot t*k + j is token t's j-th choice
    y = grouped_swiglu(x_slots, experts_TxK.reshape(-1), w_gate, w_up, w_down)
    # Nothing is dropped; masked tokens' slots are just not kept (zero output, no stats).
    return y.reshape(t, k, -1), jnp.broadcast_to(valid_T[:, None], (t, k))


def _experts_capacity(x_TxD, experts_TxK, valid_T, w_gate, w_up, w_down, capacity, limit):
    """`capacity`: the static buffer rows per expert; `limit` (traced, <= capacity): how many
    valid slots each expert admits."""
    t, k = experts_TxK.shape
    e = w_gate.shape[0]
    # Masked tokens' slots are all-zero rows: they take no place in any expert's queue.
    onehot_TxKxE = jax.nn.one_hot(experts_TxK, e, dtype=jnp.int32) * valid_T[:, None, None]
    # Position of each slot in its expert's queue, tokens in order (slot j of token t before
    # slot j of token t + 1; a token's k slots go to k different experts).
    pos_TxKxE = jnp.cumsum(onehot_TxKxE.reshape(t * k, e), axis=0).reshape(t, k, e) - 1
    pos_TxK = jnp.sum(pos_TxKxE * onehot_TxKxE, axis=-1)
    kept_TxK = valid_T[:, None] & (pos_TxK < limit)
    # Scatter kept slots into [E, C + 1, D] buffers (row C collects the dropped ones and is
    # discarded) and gather the results back: index moves, not one-hot matmuls, so the only
    # FLOPs are the experts' own E * C * D * F.
    slot = jnp.where(kept_TxK, pos_TxK, capacity)
    x_TxKxD = jnp.broadcast_to(x_TxD[:, None, :], (t, k, x_TxD.shape[-1]))
    buf = jnp.zeros((e, capacity + 1, x_TxD.shape[-1]), x_TxD.dtype)
    x_ExCxD = buf.at[experts_TxK, slot].set(x_TxKxD, mode="drop")[:, :capacity]
    f32 = jnp.float32
    # Matmuls in the operands' dtype (a bf16 backward pass), the activation in float32.
    g = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate).astype(f32)
    u = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up).astype(f32)
    h = (jax.nn.silu(g) * u).astype(x_TxD.dtype)
    y_ExCxD = jnp.einsum("ecf,efd->ecd", h, w_down).astype(f32)
    y_TxKxD = y_ExCxD[experts_TxK, jnp.minimum(slot, capacity - 1)]
    return jnp.where(kept_TxK[..., None], y_TxKxD, 0.0), kept_TxK


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared ones). Returns (y, stats); stats holds `load`
    [E] (share of routed slots), `dropped` (share of slots dropped), `aux_loss`, `max_load`
    (largest load / mean load), all over the valid tokens of `mask` only.

    `dispatch` overrides the config's ("dropless" for generation); parameters are the same."""

    cfg: MoEConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask_BxL: jax.Array | None = None,
        *,
        dispatch: str | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.cfg
        b, length, d = x_BxLxD.shape
        e, f = c.n_experts, c.d_ff
        dispatch = dispatch or c.dispatch
        if dispatch not in ("dropless", "capacity"):
            raise ValueError(f"MoE: unknown dispatch {dispatch!r}")
        x_TxD = x_BxLxD.reshape(b * length, d).astype(self.dtype)
        t = b * length
        valid_T = jnp.ones(t, bool) if mask_BxL is None else mask_BxL.reshape(t)
        w_router = self.param(
            "router", nn.with_logical_partitioning(dense_init, ("embed", "expert")), (d, e)
        )
        bias = self.variable("moe_bias", "bias", lambda: jnp.zeros(e, jnp.float32))

        def expert_param(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
            init = nn.with_logical_partitioning(dense_init, axes)
            return self.param(name, init, shape).astype(self.dtype)

        w_gate = expert_param("w_gate", (e, d, f), ("expert", "embed", "mlp"))
        w_up = expert_param("w_up", (e, d, f), ("expert", "embed", "mlp"))
        w_down = expert_param("w_down", (e, f, d), ("expert", "mlp", "embed"))
        weights = (w_gate, w_up, w_down)
        if dispatch == "dropless" and expert_parallel.expert_shards(e, t):
            # On a mesh: each device routes its own tokens and they reach their experts by
            # all-to-all (onerec_jax/model/expert_parallel.py).
            router = functools.partial(route, k=c.top_k)
            routed = expert_parallel.dropless_all_to_all(
                router, x_TxD, w_router, bias.value, valid_T, *weights
            )
            experts, gates, probs, y_TxKxD, kept = routed
        else:
            experts, gates, probs = route(x_TxD, w_router, bias.value, c.top_k)
            if dispatch == "dropless":
                y_TxKxD, kept = _experts_dropless(x_TxD, experts, valid_T, *weights)
            else:
                t_valid = jnp.sum(valid_T, dtype=jnp.int32).astype(jnp.float32)
                limit = expert_capacity(c, t_valid).astype(jnp.int32)
                args = (c.capacity(t), limit)
                y_TxKxD, kept = _experts_capacity(x_TxD, experts, valid_T, *weights, *args)
        # `kept` is False for masked tokens, so their routed output is exactly zero.
        y_TxD = jnp.einsum("tk,tkd->td", gates * kept, y_TxKxD.astype(jnp.float32))
        if c.n_shared:
            y_TxD = y_TxD + SwiGLU(c.n_shared * f, dtype=self.dtype, name="shared")(x_TxD)
        slot_w = jnp.broadcast_to(valid_T[:, None], experts.shape).astype(jnp.float32)
        slots = jnp.maximum(jnp.sum(slot_w), 1.0)  # valid slots; 1 avoids 0/0 in empty batches
        load = jnp.bincount(experts.reshape(-1), weights=slot_w.reshape(-1), length=e) / slots
        stats = {
            "load": load,
            "max_load": jnp.max(load) * e,
            "dropped": jnp.sum(slot_w - kept) / slots,
            "aux_loss": aux_loss(experts, probs, valid_T),
        }
        return y_TxD.reshape(b, length, d).astype(x_BxLxD.dtype), stats
