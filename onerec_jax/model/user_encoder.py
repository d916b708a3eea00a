"""V1 user encoder: four pathways -> 1 + P_short + P_pos + N_query tokens -> Transformer encoder.

static    the 5 static ids, embedded, concatenated, Dense-LeakyReLU-Dense -> 1 token
short     the 20 latest exposures: per event [item, author, tag, tdelta, play, dur, flags]
pos       the 256 latest strongly positive events, same features
life      up to 2000 events, projected the same way, then compressed by a QFormer: N_query
          learnable queries cross-attend to them (blocks of cross-attention + FFN)

E-commerce (OneMall, onerec_jax/data/mall.py), each off by default so other runs keep their
parameters: `n_scenarios` adds a scenario token (the request's scenario, a conditioning token)
and each event's scenario as a feature; `click_len` / `cart_len` / `order_len` add behaviour
pathways (the user's latest clicked / carted / ordered products), fused by `behaviour_fusion`:
"concat" appends their tokens to the others (the encoder's self-attention mixes them), "cross"
first lets each deeper behaviour read the shallower ones - carts cross-attend to clicks, orders
to clicks and carts (a block of cross-attention + FFN each) - our reading of OneMall's
cross-attention fusion of behaviour sequences.

Embedding tables are shared by the pathways (item width = d_model as in the report, author and
the other features narrower); each pathway has its own projection. Learnable positions are added
to the concatenated tokens, and padded events are masked out of every attention.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from onerec_jax.data import schema
from onerec_jax.model.layers import Attention, Dense, RMSNorm, ffn, layer_stack

_EVENT_FIELDS = ("item", "author", "tag", "tdelta", "play", "dur", "flags")
BEHAVIOURS = ("click", "cart", "order")  # shallow to deep: each reads the ones before it
FUSIONS = ("concat", "cross")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    d_model: int = 128  # D
    n_layers: int = 2  # encoder blocks over the concatenated tokens
    n_heads: int = 4
    d_ff: int = 256  # FFN width of encoder and QFormer blocks
    ffn: str = "swiglu"  # "swiglu" | "mlp" (GELU, two matrices)
    n_queries: int = 128  # QFormer queries compressing the lifelong pathway
    qformer_blocks: int = 1
    author_dim: int = 64  # report: 512
    feature_dim: int = 32  # tag / bucket / flag / static embedding width (report: 128)
    n_items: int = 1000  # catalogue size (ids 1..n_items, 0 padding)
    n_authors: int = 100
    n_tags: int = 100
    user_buckets: int = 1 << 16
    static_vocab: int = 1024  # age/gender/region/segment ids are taken modulo this
    short_len: int = 20
    pos_len: int = 256
    life_len: int = 2000
    remat: str = "none"  # activation rematerialisation of the encoder stack (REMAT_POLICIES)
    unroll: bool = False  # compile the encoder stack unrolled (layers.layer_stack)
    n_scenarios: int = 0  # e-commerce scenarios (3) -> a scenario token and event feature
    click_len: int = 0  # behaviour pathways (0: none)
    cart_len: int = 0
    order_len: int = 0
    behaviour_fusion: str = "concat"  # "concat" | "cross" (module docstring)

    def __post_init__(self) -> None:
        if self.behaviour_fusion not in FUSIONS:
            raise ValueError(
                f"behaviour_fusion must be one of {FUSIONS}, got {self.behaviour_fusion!r}"
            )

    def behaviour_lens(self) -> dict[str, int]:
        return {b: getattr(self, f"{b}_len") for b in BEHAVIOURS if getattr(self, f"{b}_len")}

    @property
    def n_tokens(self) -> int:
        extra = (self.n_scenarios > 0) + sum(self.behaviour_lens().values())
        return 1 + self.short_len + self.pos_len + self.n_queries + extra


def _embed(name: str, vocab: int, dim: int) -> nn.Embed:
    return nn.Embed(
        vocab,
        dim,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("feature", "embed")
        ),
        name=name,
    )


class _Block(nn.Module):
    """Pre-norm block: attention (self, or cross to `mem`) then the FFN, both residual.
    Queries x [B, L, D]; `mask` [B, L or 1, S] over the keys (S = L for self-attention)."""

    cfg: EncoderConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self, x_BxLxD: jax.Array, mem_BxSxD: jax.Array | None, mask_BxLxS: jax.Array
    ) -> jax.Array:
        c = self.cfg
        h_BxLxD = RMSNorm(dtype=self.dtype)(x_BxLxD)
        kv = h_BxLxD if mem_BxSxD is None else mem_BxSxD
        x_BxLxD = x_BxLxD + Attention(c.n_heads, c.d_model, dtype=self.dtype)(
            h_BxLxD, kv, mask_BxLxS
        )
        x_BxLxD = x_BxLxD + ffn(c.ffn, c.d_ff, self.dtype)(RMSNorm(dtype=self.dtype)(x_BxLxD))
        return nn.with_logical_constraint(
            x_BxLxD, ("activation_batch", "activation_length", "activation_embed")
        )


class _ScanBlock(nn.Module):
    """_Block in a scanned stack's (carry, x) -> (carry, y) form. The wrapper, not _Block
    itself, is scanned so that the parameters keep their `encoder/block/...` paths."""

    cfg: EncoderConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self, x_BxLxD: jax.Array, mem_BxSxD: jax.Array | None, mask_BxLxS: jax.Array
    ) -> tuple[jax.Array, None]:
        return _Block(self.cfg, self.dtype, name="block")(x_BxLxD, mem_BxSxD, mask_BxLxS), None


class UserEncoder(nn.Module):
    """batch (schema field names) -> memory [B, n_tokens, D] and its key mask [B, n_tokens].

    `stack=False` stops after the pathways and positions (no encoder blocks): OneRec-V2's
    context processor reads the user's tokens this way.
    """

    cfg: EncoderConfig
    dtype: jnp.dtype = jnp.float32
    stack: bool = True

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        d = c.d_model
        tables = {
            "item": _embed("item_embed", c.n_items + 1, d),
            "author": _embed("author_embed", c.n_authors + 1, c.author_dim),
            "tag": _embed("tag_embed", c.n_tags + 1, c.feature_dim),
            "tdelta": _embed("tdelta_embed", schema.N_BUCKETS, c.feature_dim),
            "play": _embed("play_embed", schema.N_BUCKETS, c.feature_dim),
            "dur": _embed("dur_embed", schema.N_BUCKETS, c.feature_dim),
            "flags": _embed("flags_embed", 256, c.feature_dim),
        }
        fields = _EVENT_FIELDS
        if c.n_scenarios:
            tables["scenario"] = _embed("scenario_embed", c.n_scenarios + 1, c.feature_dim)
            fields = (*fields, "scenario")

        def events(p: str) -> tuple[jax.Array, jax.Array]:
            feats = [tables[f](batch[f"{p}_{f}"].astype(jnp.int32)) for f in fields]
            x = jnp.concatenate(feats, axis=-1)
            # The input is the concatenated feature widths: a model-width axis ("embed"), not
            # the rows of a feature table ("feature").
            x = nn.leaky_relu(Dense(2 * d, ("embed", "mlp"), dtype=self.dtype, name=f"{p}_in")(x))
            x = Dense(d, ("mlp", "embed"), dtype=self.dtype, name=f"{p}_out")(x)
            return x.astype(self.dtype), batch[f"{p}_mask"]

        static = batch["static"].astype(jnp.int32)
        vocab = (c.user_buckets,) + (c.static_vocab,) * (static.shape[-1] - 1)
        s = jnp.concatenate(
            [
                _embed(f"static{i}_embed", v, c.feature_dim)(static[:, i] % v)
                for i, v in enumerate(vocab)
            ],
            axis=-1,
        )
        s = nn.leaky_relu(Dense(d, ("embed", "mlp"), dtype=self.dtype, name="static_in")(s))
        s = Dense(d, ("mlp", "embed"), dtype=self.dtype, name="static_out")(s)[:, None, :]

        short, short_mask = events("short")
        pos, pos_mask = events("pos")
        life, life_mask = events("life")
        b = static.shape[0]
        queries_NxD = self.param(
            "queries",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (c.n_queries, d),
        )
        # The QFormer: N = n_queries learnable queries per user cross-attend to the lifelong
        # events, compressing them to N tokens.
        queries_BxNxD = jnp.broadcast_to(queries_NxD.astype(self.dtype)[None], (b, c.n_queries, d))
        for i in range(c.qformer_blocks):  # few (1-2) blocks; not a hot per-token loop
            queries_BxNxD = _Block(c, self.dtype, name=f"qformer{i}")(
                queries_BxNxD, life, life_mask[:, None, :]
            )

        tokens = [s.astype(self.dtype), short, pos, queries_BxNxD]
        masks = [jnp.ones((b, 1), bool), short_mask, pos_mask, jnp.ones((b, c.n_queries), bool)]
        if c.n_scenarios:  # the request's scenario: one conditioning token
            scen = _embed("scenario_token", c.n_scenarios + 1, d)(
                batch["scenario"].astype(jnp.int32) % (c.n_scenarios + 1)
            )
            tokens.append(scen[:, None, :].astype(self.dtype))
            masks.append(jnp.ones((b, 1), bool))
        read: list[tuple[jax.Array, jax.Array]] = []  # behaviour pathways fused so far
        for name in c.behaviour_lens():
            x, m = events(name)
            if c.behaviour_fusion == "cross" and read:
                mem = jnp.concatenate([t for t, _ in read], axis=1)
                mem_mask = jnp.concatenate([k for _, k in read], axis=1)
                x = _Block(c, self.dtype, name=f"{name}_fusion")(x, mem, mem_mask[:, None, :])
            read.append((x, m))
            tokens.append(x)
            masks.append(m)
        x_BxSxD = jnp.concatenate(tokens, axis=1)
        mask_BxS = jnp.concatenate(masks, 1)
        positions = self.param(
            "positions",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (c.n_tokens, d),
        )
        x_BxSxD = x_BxSxD + positions.astype(self.dtype)[None]
        if not self.stack:
            return x_BxSxD, mask_BxS
        blocks = layer_stack(
            _ScanBlock, c.n_layers, (nn.broadcast, nn.broadcast), c.remat, unroll=c.unroll
        )
        x_BxSxD, _ = blocks(c, self.dtype, name="encoder")(x_BxSxD, None, mask_BxS[:, None, :])
        return RMSNorm(dtype=self.dtype, name="final_norm")(x_BxSxD), mask_BxS
