"""OneRec V1: the user encoder plus a decoder over semantic ids, with an optional sparse-MoE FFN.

Decoder input per target item is [BOS, s_1, ..., s_Q] (point-wise: each of the m target items
of a request is its own sequence, all reading the same user memory). Session-wise mode
(2502.18965) decodes the m items of a session as one sequence [BOS, s^1_1..s^1_Q, s^2_1, ...].
Position p predicts the code at p + 1; token ids of level l live at offset(l) + code in one
embedding table, and level l's logits are the slice [offset(l), offset(l) + V_l) of one head.

Blocks (pre-norm, scanned over layers): causal self-attention -> cross-attention to the user
memory -> dense FFN (SwiGLU or GELU MLP) or MoE. Cross-attention K/V are projected once per
user; the user's m target sequences (or W beams) are folded into the query axis instead of
copying the memory. Generation uses `init_cache` + `step`: a self-attention KV cache, one
position per call. Loss: the sum over levels of the next-token cross-entropy (the report), or
their mean; averaged over valid target items. Positions of padded target items (-1 code rows)
are masked out of the MoE (no expert slot, no capacity, no stats;
`semantic_tokens.token_mask`), and generation routes the MoE dropless whatever the configured
dispatch, so a user's beams never depend on its batch mates (onerec_jax/model/moe.py).

The block is `decoder_block.DecoderBlock` in its V1 order, the one V2 shares.
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
class V1Config(SemanticVocab):
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    dec_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    moe: MoEConfig | None = None  # None: a dense FFN in every decoder block
    ffn: str = "swiglu"  # dense FFN kind: "swiglu" | "mlp" (GELU, two matrices)
    vocab: tuple[int, ...] = (32, 32, 32)  # codes per level, from the tokenizer's table
    max_targets: int = 5  # m
    session_wise: bool = False
    loss: str = "sum"  # "sum" | "mean" over the levels
    remat: str = "none"  # activation rematerialisation of the decoder stack (layers.REMAT_POLICIES)
    unroll: bool = False  # compile the decoder stack unrolled (layers.layer_stack)

    def __post_init__(self) -> None:
        self.check_shared_fields()

    @property
    def d_model(self) -> int:
        return self.encoder.d_model


@struct.dataclass
class V1Cache:
    """Decoding state of N = G * B rows (G per user, contiguous; `OneRecV1.init_cache`)."""

    self_kv: KVCache  # [L, N, H, T_max, K]: the per-beam part, reordered with the beams
    cross_kv: tuple[jax.Array, jax.Array]  # every layer's memory (K, V) [L, B, S, H, K]
    mem_mask: jax.Array  # [B, S]

    def take_rows(self, rows_N: jax.Array) -> V1Cache:
        """Row r of the self-attention cache taken from row `rows_N[r]`; per-user parts stay."""
        return self.replace(self_kv=self.self_kv.take_rows(rows_N))


class OneRecV1(nn.Module):
    cfg: V1Config
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c = self.cfg
        self.encoder = UserEncoder(c.encoder, dtype=self.dtype)
        self.tokens = nn.Embed(
            c.n_tokens,
            c.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
        )
        length = self._seq_len()
        self.positions = self.param(
            "dec_positions",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (length, c.d_model),
        )
        # Argument 4 of DecoderBlock.__call__ (self counting as 0) is the Python-valued Mode.
        stack = layer_stack(
            DecoderBlock, c.dec_layers, (0, nn.broadcast, nn.broadcast), c.remat, (4,), c.unroll
        )
        self.blocks = stack(
            c.n_heads, c.d_model, c.d_ff, c.ffn, c.moe, lazy=False, dtype=self.dtype
        )
        self.final_norm = RMSNorm(dtype=self.dtype)
        # float32 logits whatever the compute dtype (softmax, loss and beam search read them)
        self.head = Dense(c.n_tokens, ("embed", "vocab"), dtype=self.dtype, out_dtype=jnp.float32)

    def _seq_len(self) -> int:
        q = len(self.cfg.vocab)
        return (self.cfg.max_targets * q if self.cfg.session_wise else q) + 1

    def __call__(
        self, batch: dict[str, jax.Array], codes_BxMxQ: jax.Array, capacity: int | None = None
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Per-level log-likelihood terms: returns (nll [B, M, Q], moe stats per layer).
        `capacity` (>= the batch's real target tokens, `train.step.token_capacity`): the dense
        FFNs and the head run on that many decoder positions, not on the padding; the terms of
        padded items are then meaningless (the loss masks them)."""
        mem, mem_mask = self.encoder(batch)
        return self.decode(mem, mem_mask, codes_BxMxQ, capacity)

    def decode(
        self,
        mem: jax.Array,
        mem_mask: jax.Array,
        codes_BxMxQ: jax.Array,
        capacity: int | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """`__call__` after the encoder: (nll [B, M, Q], moe stats) from the user memory."""
        c = self.cfg
        b, m, q = codes_BxMxQ.shape
        groups = 1 if c.session_wise else m  # sequences per request
        seq, inp = teacher_forcing(codes_BxMxQ, c, groups)
        valid = token_mask(codes_BxMxQ, groups)
        logits, stats = self.logits(mem, mem_mask, inp, valid, capacity)
        nll = level_nll(logits, seq, c).reshape(b, m, q)
        return nll, stats

    def encode(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """User memory [B, S, D] and its mask [B, S] (computed once per user in generation)."""
        return self.encoder(batch)

    def logits(
        self,
        mem: jax.Array,
        mem_mask: jax.Array,
        tokens_NxT: jax.Array,
        valid_NxT: jax.Array | None = None,
        capacity: int | None = None,
    ) -> tuple[jax.Array, Any]:
        """Logits [N, T, n_tokens] of decoder inputs `tokens` (token-table ids, BOS first);
        N = groups * B, rows of a user contiguous. Position t depends on tokens <= t only.
        `valid` marks the positions of real target items for the MoE (None: all); with a
        `capacity`, the dense FFNs and the head skip all but that many positions, the valid
        ones first (`pack_index`; the others' logits are zero)."""
        n, length = tokens_NxT.shape
        pos_TxD = self.positions[:length].astype(self.dtype)
        x_NxTxD = self.tokens(tokens_NxT).astype(self.dtype) + pos_TxD[None]
        causal_1xTxT = jnp.tril(jnp.ones((length, length), bool))[None]
        shared = SharedInputs(
            cross_mask=mem_mask[:, None, :],
            memory=mem,
            causal=jnp.broadcast_to(causal_1xTxT, (n, length, length)),
            valid=valid_NxT,
            pack=None if capacity is None else pack_index(valid_NxT, capacity),
        )
        x_NxTxD, out = self.blocks(x_NxTxD, LayerInputs(), shared, Mode.TRAIN)
        logits = on_rows(lambda x: self.head(self.final_norm(x)), x_NxTxD, shared.pack)
        return logits.astype(jnp.float32), out.moe_stats

    def init_cache(self, mem: jax.Array, mem_mask: jax.Array, rows: int) -> V1Cache:
        """Decoding state for `rows` = G * B sequences (G per user, contiguous): every layer's
        cross-attention K/V of the memory (PREFILL, once per user) and an empty self-attention
        cache."""
        c = self.cfg
        dummy_1x1xD = jnp.zeros((1, 1, c.d_model), self.dtype)  # PREFILL leaves x untouched
        _, out = self.blocks(dummy_1x1xD, LayerInputs(), SharedInputs(memory=mem), Mode.PREFILL)
        hd = c.d_model // c.n_heads
        empty = KVCache.empty(c.dec_layers, rows, self._seq_len(), c.n_heads, hd, self.dtype)
        return V1Cache(self_kv=empty, cross_kv=out.cross_kv, mem_mask=mem_mask)

    def step(
        self, cache: V1Cache, tokens_N: jax.Array, pos: jax.Array | int
    ) -> tuple[jax.Array, V1Cache]:
        """Logits [N, n_tokens] of the next token after feeding `tokens` (token-table ids) at
        position `pos`, and the cache with that position written. Equal to `logits` on the
        whole prefix (tested), at the cost of one position instead of pos + 1."""
        pos = jnp.asarray(pos, jnp.int32)
        p_1xD = jax.lax.dynamic_slice_in_dim(self.positions, pos, 1, axis=0).astype(self.dtype)
        x_Nx1xD = self.tokens(tokens_N[:, None]).astype(self.dtype) + p_1xD[None]
        layer = LayerInputs(self_kv=cache.self_kv, cross_kv=cache.cross_kv)
        shared = SharedInputs(cross_mask=cache.mem_mask[:, None, :], pos=pos)
        x_Nx1xD, out = self.blocks(x_Nx1xD, layer, shared, Mode.DECODE)
        logits_NxV = self.head(self.final_norm(x_Nx1xD)).astype(jnp.float32)[:, 0]
        return logits_NxV, cache.replace(self_kv=cache.self_kv.write(out.self_kv, pos))
