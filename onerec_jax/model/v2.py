"""OneRec-V2: the lazy decoder-only model.

Context processor. The user's features go through the same four pathways as V1 (static,
short-term, positive-feedback, QFormer-compressed lifelong; `UserEncoder(stack=False)`), with no
encoder stack. One projection turns every context token into S_kv * L_kv sets of keys/values of
G_kv heads each, each set RMS-normalised: L_kv sets of layers, and S_kv = 1 (one tensor serves
as both key and value) or 2 (separate keys and values). Decoder layer l reads set
floor(l * L_kv / N_layers). Defaults L_kv = 1, S_kv = 1, G_kv = heads: one shared K = V for
every layer, the "lazy" extreme.

Blocks (pre-norm, scanned): cross-attention to the context with a query projection but no K/V
projection (grouped-query when G_kv < heads) -> causal self-attention -> dense FFN or MoE.
With MoE, the first `first_dense` blocks are dense (two scanned stacks). Input [BOS, s_1, ..,
s_{Q-1}] predicts s_1..s_Q; loss = mean over the target tokens. Each of a request's m target
items is its own sequence; the user's sequences (or beams) fold into the cross-attention's
query axis, so the context K/V are computed once per user.

Generation uses the same `encode` / `init_cache` / `step` interface as V1 (generate.py). As in
V1, padded target items' positions are masked out of the MoE in training, and decoding routes
the MoE dropless whatever the configured dispatch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from onerec_jax.model.common import (
    TokenTable,
    cached_self_attention,
    level_nll,
    teacher_forcing,
    token_mask,
)
from onerec_jax.model.layers import Attention, Dense, RMSNorm, ffn
from onerec_jax.model.moe import MoE, MoEConfig
from onerec_jax.model.user_encoder import EncoderConfig, UserEncoder


@dataclasses.dataclass(frozen=True)
class V2Config(TokenTable):
    context: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)  # pathways only
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 256
    ffn: str = "swiglu"  # dense FFN kind: "swiglu" | "mlp"
    moe: MoEConfig | None = None
    first_dense: int = 0  # with MoE: the first blocks keep a dense FFN (paper: 2)
    vocab: tuple[int, ...] = (32, 32, 32)
    max_targets: int = 5  # m target items per request, each its own sequence
    loss: str = "mean"  # "mean" over target tokens (the V2 paper) | "sum" over levels
    l_kv: int = 1  # sets of layers with their own context K/V
    s_kv: int = 1  # 1: one tensor is both key and value; 2: separate keys and values
    g_kv: int = 0  # key/value heads (grouped-query); 0 = n_heads

    session_wise = False  # V2 decodes items point-wise (generate.py reads this)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"V2Config: d_model {self.d_model} not divisible by heads")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"V2Config: g_kv {self.g_kv} must divide n_heads {self.n_heads}")
        if self.s_kv not in (1, 2):
            raise ValueError(f"V2Config: s_kv must be 1 or 2, got {self.s_kv}")
        if not 1 <= self.l_kv <= self.n_layers:
            raise ValueError(f"V2Config: need 1 <= l_kv <= n_layers, got {self.l_kv}")
        n_dense = self.n_layers if self.moe is None else self.first_dense
        if not 0 <= n_dense <= self.n_layers:
            raise ValueError(f"V2Config: first_dense {self.first_dense} > n_layers")
        self.check_common()

    @property
    def kv_heads(self) -> int:
        return self.g_kv or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_dense(self) -> int:
        return self.n_layers if self.moe is None else self.first_dense

    def kv_set(self, layer: int) -> int:
        """The context K/V set that decoder layer `layer` reads."""
        return layer * self.l_kv // self.n_layers


class _Block(nn.Module):
    """One lazy-decoder block; `use_moe` picks the FFN. Modes as V1's block: `layer` has no
    cache (training: whole sequences; `shared` may hold the MoE's `token_mask` [N, T]) or this
    layer's self-attention cache (one new position; the MoE routes dropless)."""

    cfg: V2Config
    dtype: jnp.dtype
    use_moe: bool

    @nn.compact
    def __call__(self, x: jax.Array, layer: Any, shared: dict[str, Any]) -> tuple[jax.Array, Any]:
        c = self.cfg
        n, t, d = x.shape
        idx, cache_in = layer["index"], layer.get("cache")
        # Cross-attention: this layer's K/V set, picked by its index (no projection here).
        kv_set = jax.lax.dynamic_index_in_dim(shared["kv_set_of_layer"], idx, keepdims=False)
        ctx = jax.lax.dynamic_index_in_dim(shared["ctx"], kv_set, keepdims=False)
        k, v = ctx[:, :, 0], ctx[:, :, -1]  # [B, S, G, K]; the same tensor when S_kv = 1
        h = RMSNorm(dtype=self.dtype)(x)
        b = shared["cross"].shape[0]
        cross = Attention(c.n_heads, c.d_model, self.dtype, kv_proj=False, name="cross_attn")
        folded = h.reshape(b, (n // b) * t, d)  # a user's sequences share its context
        x = x + cross(folded, (k, v), shared["cross"]).reshape(n, t, d)
        h = RMSNorm(dtype=self.dtype)(x)
        self_attn = Attention(c.n_heads, c.d_model, dtype=self.dtype, name="self_attn")
        cache = None
        if cache_in is None:
            x = x + self_attn(h, h, shared["causal"])
        else:
            y, cache = cached_self_attention(self_attn, h, cache_in, shared["pos"])
            x = x + y
        h = RMSNorm(dtype=self.dtype)(x)
        if self.use_moe and cache_in is None:
            y, stats = MoE(c.moe, dtype=self.dtype)(h, shared.get("token_mask"))
        elif self.use_moe:
            y, stats = MoE(c.moe, dtype=self.dtype)(h, dispatch="dropless")
        else:
            y, stats = ffn(c.ffn, c.d_ff, self.dtype)(h), None
        x = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
        return x, (stats, cache)


def _stack(cfg: V2Config, dtype: jnp.dtype, use_moe: bool, length: int, name: str) -> nn.Module:
    return nn.scan(
        _Block,
        variable_axes={"params": 0, "moe_bias": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, dtype, use_moe, name=name)


class OneRecV2(nn.Module):
    cfg: V2Config
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c = self.cfg
        self.context = UserEncoder(c.context, dtype=self.dtype, stack=False)
        self.kv = Dense(
            c.l_kv * c.s_kv * c.kv_heads * c.head_dim, ("embed", "heads"), dtype=self.dtype
        )
        self.kv_norm = RMSNorm(dtype=self.dtype)
        self.tokens = nn.Embed(
            c.n_tokens,
            c.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
        )
        self.positions = self.param(
            "dec_positions",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (len(c.vocab) + 1, c.d_model),
        )
        n_moe = c.n_layers - c.n_dense
        self.dense_blocks = _stack(c, self.dtype, False, c.n_dense, "dense") if c.n_dense else None
        self.moe_blocks = _stack(c, self.dtype, True, n_moe, "moe") if n_moe else None
        self.final_norm = RMSNorm(dtype=self.dtype)
        # float32 logits whatever the compute dtype (softmax, loss and beam search read them)
        self.head = Dense(c.n_tokens, ("embed", "vocab"), dtype=self.dtype, out_dtype=jnp.float32)

    # -- context ---------------------------------------------------------------------------
    def encode(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Context K/V sets [L_kv, B, S, S_kv, G, K] (RMS-normalised) and their mask [B, S]."""
        c = self.cfg
        x, mask = self.context(batch)
        b, s, _ = x.shape
        kv = self.kv(x).reshape(b, s, c.l_kv, c.s_kv, c.kv_heads, c.head_dim)
        kv = self.kv_norm(kv)  # one RMSNorm over each head of each set
        return jnp.moveaxis(kv, 2, 0), mask

    def _blocks(self, x: jax.Array, caches: Any, shared: dict[str, Any]) -> tuple:
        c = self.cfg
        shared = {
            **shared,
            "kv_set_of_layer": jnp.asarray([c.kv_set(i) for i in range(c.n_layers)]),
        }
        stats, new = None, {}
        for name, stack, lo, hi in (
            ("dense", self.dense_blocks, 0, c.n_dense),
            ("moe", self.moe_blocks, c.n_dense, c.n_layers),
        ):
            if stack is None:
                continue
            layer = {"index": jnp.arange(lo, hi)}
            if caches is not None:
                layer["cache"] = caches[name]
            x, (st, cache) = stack(x, layer, shared)
            if name == "moe":
                stats = st
            new[name] = cache
        return x, stats, new

    # -- training --------------------------------------------------------------------------
    def __call__(
        self, batch: dict[str, jax.Array], codes_BxMxQ: jax.Array
    ) -> tuple[jax.Array, dict[str, Any] | None]:
        """Per-level NLL terms [B, M, Q] and the MoE stats of the MoE layers (None if dense)."""
        ctx, mask = self.encode(batch)
        c = self.cfg
        b, m, q = codes_BxMxQ.shape
        seq, inp = teacher_forcing(codes_BxMxQ, c, m)  # each target item its own sequence
        logits, stats = self.logits(ctx, mask, inp, token_mask(codes_BxMxQ, m))
        return level_nll(logits, seq, c).reshape(b, m, q), stats

    def logits(
        self,
        ctx: jax.Array,
        mask: jax.Array,
        tokens_NxT: jax.Array,
        valid_NxT: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """Logits [N, T, n_tokens]; N = G * B rows, a user's rows contiguous. `valid` marks
        the positions of real target items for the MoE (None: all)."""
        n, length = tokens_NxT.shape
        x = self.tokens(tokens_NxT).astype(self.dtype)
        x = x + self.positions[:length].astype(self.dtype)[None]
        causal = jnp.broadcast_to(
            jnp.tril(jnp.ones((length, length), bool))[None], (n, length, length)
        )
        shared = {"ctx": ctx, "cross": mask[:, None, :], "causal": causal}
        if valid_NxT is not None:
            shared["token_mask"] = valid_NxT
        x, stats, _ = self._blocks(x, None, shared)
        return self.head(self.final_norm(x)).astype(jnp.float32), stats

    # -- generation ------------------------------------------------------------------------
    def init_cache(self, ctx: jax.Array, mask: jax.Array, rows: int) -> dict[str, Any]:
        c = self.cfg
        shape = (rows, len(c.vocab) + 1, c.n_heads, c.head_dim)

        def empty(layers: int) -> tuple[jax.Array, jax.Array]:
            z = jnp.zeros((layers, *shape), self.dtype)
            return (z, z)

        caches = {}
        if c.n_dense:
            caches["dense"] = empty(c.n_dense)
        if c.n_layers - c.n_dense:
            caches["moe"] = empty(c.n_layers - c.n_dense)
        return {"self": caches, "ctx": ctx, "mem_mask": mask}

    def step(
        self, cache: dict[str, Any], tokens_N: jax.Array, pos: jax.Array | int
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Next-token logits [N, n_tokens] after feeding `tokens` at `pos`; the updated cache."""
        pos = jnp.asarray(pos, jnp.int32)
        p = jax.lax.dynamic_slice_in_dim(self.positions, pos, 1, axis=0).astype(self.dtype)
        x = self.tokens(tokens_N[:, None]).astype(self.dtype) + p[None]
        shared = {"ctx": cache["ctx"], "cross": cache["mem_mask"][:, None, :], "pos": pos}
        x, _, new = self._blocks(x, cache["self"], shared)
        logits = self.head(self.final_norm(x)).astype(jnp.float32)[:, 0]
        return logits, {**cache, "self": new}
