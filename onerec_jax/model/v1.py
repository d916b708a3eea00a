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
are masked out of the MoE (no expert slot, no capacity, no stats; `common.token_mask`), and
generation routes the MoE dropless whatever the configured dispatch, so a user's beams never
depend on its batch mates (onerec_jax/model/moe.py).
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
class V1Config(TokenTable):
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

    def __post_init__(self) -> None:
        self.check_common()

    @property
    def d_model(self) -> int:
        return self.encoder.d_model


class _DecoderBlock(nn.Module):
    """One decoder block in three modes, chosen by the (static) structure of its inputs:

    train    x [N, T, D] whole sequences, `shared` = {mem, causal, cross, token_mask (optional,
             [N, T]: the MoE's valid tokens)}; `layer` = None.
    project  `shared` = {mem, project: True}: returns this layer's cross-attention K/V of the
             user memory (generation computes them once per user, never per beam).
    step     x [N, 1, D] one new token per row, `layer` = {k, v (self-attention cache
             [N, T_max, H, K]), ck, cv (cross K/V [B, S, H, K])}, `shared` = {cross, pos}.
             The MoE routes dropless here: capacity would be shared by all rows of a step.

    The N = G * B rows of the G sequences of each user are folded into the query axis of the
    cross-attention ([B, G * T, D] queries against that user's [B, S] memory), so user K/V are
    never repeated per target item or per beam.
    """

    cfg: V1Config
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, layer: Any, shared: dict[str, Any]) -> tuple[jax.Array, Any]:
        c = self.cfg
        self_attn = Attention(c.n_heads, c.d_model, dtype=self.dtype, name="self_attn")
        cross_attn = Attention(c.n_heads, c.d_model, dtype=self.dtype, name="cross_attn")
        if shared.get("project"):
            return x, cross_attn.project_kv(shared["mem"])
        n, t, d = x.shape
        h = RMSNorm(dtype=self.dtype)(x)
        cache = None
        if layer is None:
            x = x + self_attn(h, h, shared["causal"])
            mem_kv = shared["mem"]
        else:
            y, cache = cached_self_attention(self_attn, h, (layer["k"], layer["v"]), shared["pos"])
            x = x + y
            mem_kv = (layer["ck"], layer["cv"])
        h = RMSNorm(dtype=self.dtype)(x)
        b = shared["cross"].shape[0]
        folded = h.reshape(b, (n // b) * t, d)  # the user's G sequences share one memory
        x = x + cross_attn(folded, mem_kv, shared["cross"]).reshape(n, t, d)
        h = RMSNorm(dtype=self.dtype)(x)
        if c.moe is None:
            y, stats = ffn(c.ffn, c.d_ff, self.dtype)(h), None
        elif layer is None:
            y, stats = MoE(c.moe, dtype=self.dtype)(h, shared.get("token_mask"))
        else:
            y, stats = MoE(c.moe, dtype=self.dtype)(h, dispatch="dropless")
        x = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
        return x, (stats, cache)


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
        self.blocks = nn.scan(
            _DecoderBlock,
            variable_axes={"params": 0, "moe_bias": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=c.dec_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.dtype)
        self.final_norm = RMSNorm(dtype=self.dtype)
        # float32 logits whatever the compute dtype (softmax, loss and beam search read them)
        self.head = Dense(c.n_tokens, ("embed", "vocab"), dtype=self.dtype, out_dtype=jnp.float32)

    def _seq_len(self) -> int:
        q = len(self.cfg.vocab)
        return (self.cfg.max_targets * q if self.cfg.session_wise else q) + 1

    def __call__(
        self, batch: dict[str, jax.Array], codes_BxMxQ: jax.Array
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Per-level log-likelihood terms: returns (nll [B, M, Q], moe stats per layer)."""
        mem, mem_mask = self.encoder(batch)
        return self.decode(mem, mem_mask, codes_BxMxQ)

    def decode(
        self, mem: jax.Array, mem_mask: jax.Array, codes_BxMxQ: jax.Array
    ) -> tuple[jax.Array, dict[str, Any]]:
        c = self.cfg
        b, m, q = codes_BxMxQ.shape
        groups = 1 if c.session_wise else m  # sequences per request
        seq, inp = teacher_forcing(codes_BxMxQ, c, groups)
        logits, stats = self.logits(mem, mem_mask, inp, token_mask(codes_BxMxQ, groups))
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
    ) -> tuple[jax.Array, Any]:
        """Logits [N, T, n_tokens] of decoder inputs `tokens` (token-table ids, BOS first);
        N = groups * B, rows of a user contiguous. Position t depends on tokens <= t only.
        `valid` marks the positions of real target items for the MoE (None: all)."""
        n, length = tokens_NxT.shape
        pos = self.positions[:length].astype(self.dtype)
        x = self.tokens(tokens_NxT).astype(self.dtype) + pos[None]
        causal = jnp.tril(jnp.ones((length, length), bool))[None]
        causal = jnp.broadcast_to(causal, (n, length, length))
        shared = {"mem": mem, "causal": causal, "cross": mem_mask[:, None, :]}
        if valid_NxT is not None:
            shared["token_mask"] = valid_NxT
        x, (stats, _) = self.blocks(x, None, shared)
        return self.head(self.final_norm(x)).astype(jnp.float32), stats

    def init_cache(self, mem: jax.Array, mem_mask: jax.Array, rows: int) -> dict[str, jax.Array]:
        """Decoding state for `rows` = G * B sequences (G per user, contiguous): every layer's
        cross-attention K/V of the memory (once per user) and an empty self-attention cache."""
        c = self.cfg
        dummy = jnp.zeros((1, 1, c.d_model), self.dtype)
        _, (ck, cv) = self.blocks(dummy, None, {"mem": mem, "project": True})
        hd = c.d_model // c.n_heads
        shape = (c.dec_layers, rows, self._seq_len(), c.n_heads, hd)
        zeros = jnp.zeros(shape, self.dtype)
        # "self": the per-beam part (rows on axis 1), which generation reorders with its beams.
        return {"self": (zeros, zeros), "ck": ck, "cv": cv, "mem_mask": mem_mask}

    def step(
        self, cache: dict[str, jax.Array], tokens_N: jax.Array, pos: jax.Array | int
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [N, n_tokens] of the next token after feeding `tokens` (token-table ids) at
        position `pos`, and the cache with that position written. Equal to `logits` on the
        whole prefix (tested), at the cost of one position instead of pos + 1."""
        pos = jnp.asarray(pos, jnp.int32)
        p = jax.lax.dynamic_slice_in_dim(self.positions, pos, 1, axis=0).astype(self.dtype)
        x = self.tokens(tokens_N[:, None]).astype(self.dtype) + p[None]
        k, v = cache["self"]
        layer = {"k": k, "v": v, "ck": cache["ck"], "cv": cache["cv"]}
        shared = {"cross": cache["mem_mask"][:, None, :], "pos": pos}
        x, (_, new) = self.blocks(x, layer, shared)
        logits = self.head(self.final_norm(x)).astype(jnp.float32)[:, 0]
        return logits, {**cache, "self": new}


def loss_fn(
    nll_BxMxQ: jax.Array, valid_BxM: jax.Array, mode: str = "sum"
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss over valid target items: per item, sum (or mean) of the level terms."""
    per_item = jnp.sum(nll_BxMxQ, -1) if mode == "sum" else jnp.mean(nll_BxMxQ, -1)
    w = valid_BxM.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    loss = jnp.sum(per_item * w) / n
    per_level = jnp.sum(nll_BxMxQ * w[..., None], axis=(0, 1)) / n
    return loss, {"loss": loss, "items": jnp.sum(w), "nll_per_level": per_level}
