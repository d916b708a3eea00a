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
the MoE dropless whatever the configured dispatch. The block is `decoder_block.DecoderBlock`
in its lazy order, the one V1 shares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from onerec_jax.model.decoder_block import (
    DecoderBlock,
    KVCache,
    LayerInputs,
    Mode,
    SharedInputs,
)
from onerec_jax.model.layers import Dense, RMSNorm, layer_stack
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.semantic_tokens import (
    SemanticVocab,
    level_nll,
    on_rows,
    pack_index,
    teacher_forcing,
    token_mask,
)
from onerec_jax.model.user_encoder import EncoderConfig, UserEncoder


@dataclasses.dataclass(frozen=True)
class V2Config(SemanticVocab):
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
    remat: str = "none"  # activation rematerialisation of the decoder stacks (REMAT_POLICIES)
    unroll: bool = False  # compile the decoder stacks unrolled (layers.layer_stack)

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
        self.check_shared_fields()

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


@struct.dataclass
class V2Cache:
    """Decoding state of N = G * B rows (G per user, contiguous; `OneRecV2.init_cache`)."""

    dense_kv: KVCache | None  # [first_dense, N, H, T_max, K]; None without that stack
    moe_kv: KVCache | None  # [n_layers - first_dense, N, H, T_max, K]; likewise
    kv_sets: jax.Array  # the user's context K/V sets [L_kv, B, S, S_kv, G, K] (`encode`)
    mem_mask: jax.Array  # [B, S]

    def take_rows(self, rows_N: jax.Array) -> V2Cache:
        """Row r of the self-attention caches taken from row `rows_N[r]`; per-user parts stay."""
        return self.replace(
            dense_kv=None if self.dense_kv is None else self.dense_kv.take_rows(rows_N),
            moe_kv=None if self.moe_kv is None else self.moe_kv.take_rows(rows_N),
        )


def _stack(cfg: V2Config, dtype: jnp.dtype, use_moe: bool, length: int, name: str) -> nn.Module:
    """`length` lazy blocks, scanned; MoE FFNs if `use_moe`, else the dense FFN."""
    # Argument 4 of DecoderBlock.__call__ (self counting as 0) is the Python-valued Mode.
    stack = layer_stack(
        DecoderBlock, length, (0, nn.broadcast, nn.broadcast), cfg.remat, (4,), cfg.unroll
    )
    moe = cfg.moe if use_moe else None
    return stack(
        cfg.n_heads, cfg.d_model, cfg.d_ff, cfg.ffn, moe, lazy=True, dtype=dtype, name=name
    )


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
        x_BxSxD, mask_BxS = self.context(batch)
        b, s, _ = x_BxSxD.shape
        kv = self.kv(x_BxSxD).reshape(b, s, c.l_kv, c.s_kv, c.kv_heads, c.head_dim)
        kv = self.kv_norm(kv)  # one RMSNorm over each head of each set
        return jnp.moveaxis(kv, 2, 0), mask_BxS

    def _blocks(
        self,
        x_NxTxD: jax.Array,
        caches: tuple[KVCache | None, KVCache | None],
        shared: SharedInputs,
        mode: Mode,
    ) -> tuple[jax.Array, Any, tuple[KVCache | None, KVCache | None]]:
        """The dense stack, then the MoE stack (each absent when it has no layers). Returns
        (x, the MoE stack's stats or None, the two stacks' updated caches)."""
        c = self.cfg
        stats, new = None, []
        for stack, lo, hi, cache, is_moe in (
            (self.dense_blocks, 0, c.n_dense, caches[0], False),
            (self.moe_blocks, c.n_dense, c.n_layers, caches[1], True),
        ):  # two stacks, not a loop over layers
            if stack is None:
                new.append(None)
                continue
            # The context K/V set each layer of the stack reads (static: from the config).
            kv_set_L = jnp.asarray([c.kv_set(i) for i in range(lo, hi)])
            layer = LayerInputs(kv_set=kv_set_L, self_kv=cache)
            x_NxTxD, out = stack(x_NxTxD, layer, shared, mode)
            if is_moe:
                stats = out.moe_stats
            new.append(None if cache is None else cache.write(out.self_kv, shared.pos))
        return x_NxTxD, stats, (new[0], new[1])

    # -- training --------------------------------------------------------------------------
    def __call__(
        self, batch: dict[str, jax.Array], codes_BxMxQ: jax.Array, capacity: int | None = None
    ) -> tuple[jax.Array, dict[str, Any] | None]:
        """Per-level NLL terms [B, M, Q] and the MoE stats of the MoE layers (None if dense);
        `capacity` as in `OneRecV1.__call__`."""
        ctx, mask = self.encode(batch)
        c = self.cfg
        b, m, q = codes_BxMxQ.shape
        seq, inp = teacher_forcing(codes_BxMxQ, c, m)  # each target item its own sequence
        logits, stats = self.logits(ctx, mask, inp, token_mask(codes_BxMxQ, m), capacity)
        return level_nll(logits, seq, c).reshape(b, m, q), stats

    def logits(
        self,
        ctx: jax.Array,
        mask: jax.Array,
        tokens_NxT: jax.Array,
        valid_NxT: jax.Array | None = None,
        capacity: int | None = None,
    ) -> tuple[jax.Array, Any]:
        """Logits [N, T, n_tokens]; N = G * B rows, a user's rows contiguous. `valid` marks
        the positions of real target items for the MoE (None: all); `capacity` as in
        `OneRecV1.logits`."""
        n, length = tokens_NxT.shape
        x_NxTxD = self.tokens(tokens_NxT).astype(self.dtype)
        x_NxTxD = x_NxTxD + self.positions[:length].astype(self.dtype)[None]
        causal_NxTxT = jnp.broadcast_to(
            jnp.tril(jnp.ones((length, length), bool))[None], (n, length, length)
        )
        shared = SharedInputs(
            cross_mask=mask[:, None, :],
            kv_sets=ctx,
            causal=causal_NxTxT,
            valid=valid_NxT,
            pack=None if capacity is None else pack_index(valid_NxT, capacity),
        )
        x_NxTxD, stats, _ = self._blocks(x_NxTxD, (None, None), shared, Mode.TRAIN)
        logits = on_rows(lambda x: self.head(self.final_norm(x)), x_NxTxD, shared.pack)
        return logits.astype(jnp.float32), stats

    # -- generation ------------------------------------------------------------------------
    def init_cache(self, ctx: jax.Array, mask: jax.Array, rows: int) -> V2Cache:
        """Decoding state for `rows` = G * B sequences (G per user, contiguous): the context
        K/V sets of `encode` (already per user, nothing to prefill) and empty self-attention
        caches."""
        c = self.cfg

        def empty(layers: int) -> KVCache | None:
            if not layers:
                return None
            length = len(c.vocab) + 1
            return KVCache.empty(layers, rows, length, c.n_heads, c.head_dim, self.dtype)

        return V2Cache(
            dense_kv=empty(c.n_dense),
            moe_kv=empty(c.n_layers - c.n_dense),
            kv_sets=ctx,
            mem_mask=mask,
        )

    def step(
        self, cache: V2Cache, tokens_N: jax.Array, pos: jax.Array | int
    ) -> tuple[jax.Array, V2Cache]:
        """Next-token logits [N, n_tokens] after feeding `tokens` at `pos`; the updated cache."""
        pos = jnp.asarray(pos, jnp.int32)
        p_1xD = jax.lax.dynamic_slice_in_dim(self.positions, pos, 1, axis=0).astype(self.dtype)
        x_Nx1xD = self.tokens(tokens_N[:, None]).astype(self.dtype) + p_1xD[None]
        shared = SharedInputs(cross_mask=cache.mem_mask[:, None, :], kv_sets=cache.kv_sets, pos=pos)
        caches = (cache.dense_kv, cache.moe_kv)
        x_Nx1xD, _, (dense_kv, moe_kv) = self._blocks(x_Nx1xD, caches, shared, Mode.DECODE)
        logits_NxV = self.head(self.final_norm(x_Nx1xD)).astype(jnp.float32)[:, 0]
        return logits_NxV, cache.replace(dense_kv=dense_kv, moe_kv=moe_kv)
