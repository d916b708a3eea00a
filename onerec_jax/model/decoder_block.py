"""The decoder block V1 and V2 share, its mode, and the typed inputs and caches it reads.

One pre-norm block, three residual sublayers, in one of two orders:

V1    causal self-attention -> cross-attention to the user memory, whose keys/values it
      projects itself -> dense FFN or MoE.
V2    (`lazy`) cross-attention to context keys/values computed outside the decoder (no K/V
      projection; grouped-query when the context has fewer heads; the set picked by the
      layer's `kv_set`) -> causal self-attention -> dense FFN or MoE.

The N = G * B rows of the G sequences (target items or beams) of each of B users are folded
into the query axis of the cross-attention ([B, G * T, D] queries against the user's [B, S]
keys/values), so nothing user-sized is ever repeated per target item or per beam.

Shapes: N decoder rows, T positions (T_max in a cache), D model width, B users, S context
tokens, H heads, K head width, L layers of a scanned stack.
"""

from __future__ import annotations

import enum
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from onerec_jax.model.layers import Attention, RMSNorm, attend_heads_major, ffn
from onerec_jax.model.moe import MoE, MoEConfig
from onerec_jax.model.semantic_tokens import on_rows


class Mode(enum.Enum):
    """What a decoder pass computes; static (Python control flow picks the ops).

    TRAIN    whole teacher-forced sequences [N, T] under a causal mask; the MoE honours the
             configured dispatch and the token mask.
    PREFILL  V1 only: each layer's cross-attention K/V of the user memory, once per user,
             before decoding (V2's context K/V come straight out of its `encode`).
    DECODE   one new position per row through the self-attention cache; the MoE routes
             dropless, because capacity shared by all rows of a step would make a user's
             beams depend on its batch mates.
    """

    TRAIN = "train"
    PREFILL = "prefill"
    DECODE = "decode"


@struct.dataclass
class KVCache:
    """Self-attention keys and values of the positions decoded so far, heads-major (the layout
    attention reads, so no step transposes the cache): [N, H, T_max, K] inside a block,
    [L, N, H, T_max, K] for a scanned stack (which slices the layer axis)."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(
        cls, layers: int, rows: int, length: int, heads: int, head_dim: int, dtype: jnp.dtype
    ) -> KVCache:
        """A stack's all-zero cache; positions are only read once written (`visible`)."""
        zeros = jnp.zeros((layers, rows, heads, length, head_dim), dtype)
        return cls(zeros, zeros)

    def write(self, new: KVCache, pos: jax.Array) -> KVCache:
        """A stack's cache [L, N, H, T_max, K] with position `pos` set to `new` [L, N, H, 1, K]
        (the entries a DECODE pass of the stack returns), in one update after the stack:
        layers that each wrote their own slice would make XLA copy the whole cache in slices
        and concatenate it back every step."""
        return KVCache(
            jax.lax.dynamic_update_slice_in_dim(self.k, new.k, pos, axis=3),
            jax.lax.dynamic_update_slice_in_dim(self.v, new.v, pos, axis=3),
        )

    def with_new(self, new: KVCache, pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One layer's keys and values [N, H, T_max + 1, K] for a query at `pos`: the cached
        positions, then `new` [N, H, 1, K], and the mask [N, 1, T_max + 1] of what the query
        may see (the cached positions < pos, and its own). Appending costs one pass over the
        layer's cache, into which XLA fuses the slicing of the stack's cache; reading the
        slice in place made XLA:CPU copy it anyway, and more slowly."""
        n, length = self.k.shape[0], self.k.shape[2]
        visible_T = jnp.append(jnp.arange(length) < pos, True)
        return (
            jnp.concatenate([self.k, new.k.astype(self.k.dtype)], axis=2),
            jnp.concatenate([self.v, new.v.astype(self.v.dtype)], axis=2),
            jnp.broadcast_to(visible_T[None, None, :], (n, 1, length + 1)),
        )

    def take_rows(self, rows_N: jax.Array) -> KVCache:
        """A stack's cache whose row r is row `rows_N[r]` of this one (beams follow their
        parents after a top-k)."""
        return KVCache(self.k[:, rows_N], self.v[:, rows_N])


@struct.dataclass
class LayerInputs:
    """What differs per layer; a scanned stack slices every field on its leading axis.
    A field a mode does not read stays None."""

    kv_set: jax.Array | None = None  # V2: which context K/V set the layer reads
    self_kv: KVCache | None = None  # DECODE: the layer's self-attention cache
    # V1 DECODE: the layer's PREFILL output, the memory's (keys, values) [B, S, H, K]
    cross_kv: tuple[jax.Array, jax.Array] | None = None


@struct.dataclass
class SharedInputs:
    """What every layer reads (broadcast to all layers of a stack)."""

    cross_mask: jax.Array | None = None  # [B, 1, S] TRAIN / DECODE: context tokens to attend
    memory: jax.Array | None = None  # [B, S, D] V1 TRAIN / PREFILL: the encoded user memory
    kv_sets: jax.Array | None = None  # [L_kv, B, S, S_kv, G, K] V2: the context K/V sets
    causal: jax.Array | None = None  # [N, T, T] TRAIN: position t attends to <= t
    valid: jax.Array | None = None  # [N, T] TRAIN: the MoE's real target tokens (None: all)
    # [C] TRAIN: flat positions of [N, T] holding every real target token (`pack_index`): the
    # dense FFN runs on these only (None: on all)
    pack: jax.Array | None = None
    pos: jax.Array | None = None  # [] DECODE: the position being written


@struct.dataclass
class LayerOutputs:
    """What a block returns beside the residual stream; a scanned stack stacks it on a
    leading layer axis."""

    moe_stats: dict[str, jax.Array] | None = None  # TRAIN / DECODE with an MoE FFN
    self_kv: KVCache | None = None  # DECODE: the keys/values of `pos` [N, H, 1, K] (`write`)
    cross_kv: tuple[jax.Array, jax.Array] | None = None  # PREFILL: memory (keys, values)


# Flax auto-named these sublayers ("<Class>_<i>" in creation order) before V1 and V2 shared
# one block; checkpoints key on the names, so they are spelled out here.
_FFN_NAME = {"swiglu": "SwiGLU_0", "mlp": "Mlp_0"}
_MOE_NAME = "MoE_0"


def _pre_norm_name(position: int) -> str:
    """The name of the RMSNorm before the block's `position`-th sublayer (0, 1, 2)."""
    return f"RMSNorm_{position}"


class DecoderBlock(nn.Module):
    """One decoder block (module docstring); call with (x [N, T, D], `LayerInputs`,
    `SharedInputs`, `Mode`) -> (x, `LayerOutputs`), the form a scanned stack expects.

    Parameters: `self_attn`, `cross_attn` (no key/value weights when `lazy`), RMSNorm_0..2
    in the order of the sublayers they precede, then SwiGLU_0 / Mlp_0 / MoE_0.
    """

    n_heads: int
    d_model: int
    d_ff: int
    ffn_kind: str  # the dense FFN, "swiglu" | "mlp", when `moe` is None
    moe: MoEConfig | None
    lazy: bool  # False: V1's order and cross-attention; True: V2's
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x_NxTxD: jax.Array, layer: LayerInputs, shared: SharedInputs, mode: Mode
    ) -> tuple[jax.Array, LayerOutputs]:
        self_attn = Attention(self.n_heads, self.d_model, dtype=self.dtype, name="self_attn")
        cross_attn = Attention(
            self.n_heads, self.d_model, dtype=self.dtype, kv_proj=not self.lazy, name="cross_attn"
        )
        if mode is Mode.PREFILL:
            if self.lazy:
                raise ValueError("a lazy block has no prefill: its context K/V are inputs")
            return x_NxTxD, LayerOutputs(cross_kv=cross_attn.project_kv(shared.memory))
        if self.lazy:
            x_NxTxD = self._cross_attention(cross_attn, x_NxTxD, layer, shared, mode, 0)
            x_NxTxD, self_kv = self._self_attention(self_attn, x_NxTxD, layer, shared, mode, 1)
        else:
            x_NxTxD, self_kv = self._self_attention(self_attn, x_NxTxD, layer, shared, mode, 0)
            x_NxTxD = self._cross_attention(cross_attn, x_NxTxD, layer, shared, mode, 1)
        h_NxTxD = RMSNorm(dtype=self.dtype, name=_pre_norm_name(2))(x_NxTxD)
        if self.moe is None:
            dense = ffn(self.ffn_kind, self.d_ff, self.dtype, name=_FFN_NAME[self.ffn_kind])
            pack = shared.pack if mode is Mode.TRAIN else None
            y_NxTxD, stats = on_rows(dense, h_NxTxD, pack), None
        else:
            moe = MoE(self.moe, dtype=self.dtype, name=_MOE_NAME)
            if mode is Mode.TRAIN:
                y_NxTxD, stats = moe(h_NxTxD, shared.valid)
            else:  # DECODE: dropless (see Mode)
                y_NxTxD, stats = moe(h_NxTxD, dispatch="dropless")
        x_NxTxD = nn.with_logical_constraint(
            x_NxTxD + y_NxTxD, ("activation_batch", "activation_length", "activation_embed")
        )
        return x_NxTxD, LayerOutputs(moe_stats=stats, self_kv=self_kv)

    def _self_attention(
        self,
        attn: Attention,
        x_NxTxD: jax.Array,
        layer: LayerInputs,
        shared: SharedInputs,
        mode: Mode,
        position: int,
    ) -> tuple[jax.Array, KVCache | None]:
        """Residual causal self-attention; DECODE (T = 1) attends to the layer's cached
        positions < pos and to position `pos` itself. Returns (x, None in TRAIN; in DECODE
        the keys/values of `pos`, which the model writes into the stack's cache)."""
        h_NxTxD = RMSNorm(dtype=self.dtype, name=_pre_norm_name(position))(x_NxTxD)
        if mode is Mode.TRAIN:
            # Separate Q and K/V matmuls: stacking the weights into one did not speed up
            # XLA:CPU's training step (BENCHMARKS.md); decoding's one-row steps gain from it.
            return x_NxTxD + attn(h_NxTxD, h_NxTxD, shared.causal), None
        q_Nx1xHxK, k_Nx1xHxK, v_Nx1xHxK = attn.project_qkv(h_NxTxD)
        new = KVCache(jnp.swapaxes(k_Nx1xHxK, 1, 2), jnp.swapaxes(v_Nx1xHxK, 1, 2))
        keys, values, mask = layer.self_kv.with_new(new, shared.pos)
        o_Nx1xHxK = attend_heads_major(q_Nx1xHxK, keys, values, mask, self.dtype)
        return x_NxTxD + attn.out(o_Nx1xHxK), new

    def _cross_attention(
        self,
        attn: Attention,
        x_NxTxD: jax.Array,
        layer: LayerInputs,
        shared: SharedInputs,
        mode: Mode,
        position: int,
    ) -> jax.Array:
        """Residual cross-attention of each user's G rows, folded into one query axis, to
        that user's context."""
        kv: Any
        if self.lazy:
            # This layer's K/V set; one tensor serves as both when S_kv = 1.
            set_BxSxS_kvxGxK = jax.lax.dynamic_index_in_dim(
                shared.kv_sets, layer.kv_set, keepdims=False
            )
            kv = (set_BxSxS_kvxGxK[:, :, 0], set_BxSxS_kvxGxK[:, :, -1])
        elif mode is Mode.DECODE:
            kv = layer.cross_kv  # projected once per user (PREFILL)
        else:
            kv = shared.memory  # projected here, by `attn`
        h_NxTxD = RMSNorm(dtype=self.dtype, name=_pre_norm_name(position))(x_NxTxD)
        n, t, d = x_NxTxD.shape
        b = shared.cross_mask.shape[0]
        folded_BxGTxD = h_NxTxD.reshape(b, (n // b) * t, d)
        y_BxGTxD = attn(folded_BxGTxD, kv, shared.cross_mask)
        return x_NxTxD + y_BxGTxD.reshape(n, t, d)
