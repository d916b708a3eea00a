"""Parameters and FLOPs per sample, counted the way the models actually compute.

Parameters come from `jax.eval_shape` of the model's init (no allocation), split into

  embedding   lookup tables (item/author/feature/static ids, semantic-id tokens): memory, not FLOPs
  routed      the routed experts' weights; only top_k / E of them act on a token
  active      everything a token touches: total - routed * (1 - top_k / E)

FLOPs ("matmul" accounting). A sample is one request: the user's context plus its m target
items of Q codes (m * Q decoder positions, teacher-forced). We count 2 * multiply-adds of
every matmul the program runs, attention scores and mixing included, with the shapes it runs
them at (full T x T scores even where a mask zeroes them; the output head over the whole token
table at every position); element-wise work (norms, softmax, activations) is left out. MoE
experts are counted at the rows their dispatch runs: T * k routed slots for dropless, but the
E * C capacity-buffer rows for capacity dispatch, C = ceil(capacity_factor * T * k / E), i.e.
about capacity_factor times more, whether or not the slots are filled (per sample we use
capacity_factor * T * k, exact when the batch's C needs no rounding). `flops_forward_dropless`
is the same pass counted at T * k (the routed slots' own work); both are equal for dense and
dropless models. (Until the capacity rows were counted, `flops_forward` of capacity-MoE models
was that smaller number; the `onerec plan` / summary.json keys are unchanged.) Training
costs 3x the forward pass (backward = 2x forward). `tests/test_flops.py` checks the forward
count against XLA's `cost_analysis()` of the compiled program (with one layer per scanned
stack: XLA counts the body of a scan's while loop once, whatever its trip count).

This is not the "6 * params * tokens" rule: for an encoder-decoder that rule charges decoder
weights for encoder tokens and counts lookups as matmuls (a ~1.9x overstatement at TIGER
size); `six_nd` gives it for comparison, with the V2 paper's token count (context tokens +
target tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onerec_jax.data import schema
from onerec_jax.model.layers import ffn_matrices
from onerec_jax.model.user_encoder import EncoderConfig
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Config

_EMBED_SUFFIX = "_embed"


@dataclasses.dataclass(frozen=True)
class Counts:
    params_total: int
    params_embedding: int
    params_routed: int
    params_active: int
    params_non_embedding: int  # total - embedding: what a rung's name is compared with
    params_context: int  # non-embedding, V1 encoder / V2 context processor
    params_decoder: int  # non-embedding, the rest (decoder blocks, output head)
    flops_forward: float  # per sample, what runs (capacity MoE: E * C expert rows)
    flops_forward_dropless: float  # per sample, MoE experts counted at T * k routed slots
    flops_train: float  # per sample, forward + backward
    tokens_per_sample: int  # decoder positions with a loss (m * Q)
    six_nd: float  # 6 * active non-embedding params * (context + target tokens), per sample

    def params(self) -> dict[str, int]:
        """The `params_*` fields, as summary.json and `onerec plan` report them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith("params_")}


def _dummy_inputs(cfg: V1Config | V2Config, b: int = 1) -> tuple[dict[str, jax.Array], jax.Array]:
    e = cfg.context if isinstance(cfg, V2Config) else cfg.encoder
    spec = schema.SchemaSpec(
        short_len=e.short_len,
        pos_len=e.pos_len,
        life_len=e.life_len,
        max_targets=cfg.max_targets,
        scenarios=e.n_scenarios > 0,
        **{f"{b}_len": n for b, n in e.behaviour_lens().items()},
    )
    inputs = {
        k: jax.ShapeDtypeStruct((b, *shape), dt)
        for k, (shape, dt) in spec.shapes().items()
        if k not in ("user_id", "request_ts")
    }
    codes = jax.ShapeDtypeStruct((b, cfg.max_targets, len(cfg.vocab)), jnp.int32)
    return inputs, codes


def param_shapes(model: OneRecV1 | OneRecV2) -> Any:
    """The model's parameter tree as ShapeDtypeStructs (no memory is allocated)."""
    inputs, codes = _dummy_inputs(model.cfg)
    return jax.eval_shape(model.init, jax.random.key(0), inputs, codes)["params"]


# Top-level parameter trees that process the user's context (V1 encoder, V2 context processor).
_CONTEXT_TREES = ("encoder", "context", "kv", "kv_norm")


def _split_params(params: Any) -> tuple[int, int, int, int]:
    """Total, embedding, routed-expert and non-embedding context parameters."""
    total = embedding = routed = context = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
        names = [str(getattr(p, "key", p)) for p in path]
        size = int(np.prod(leaf.shape))
        total += size
        if any(n.endswith(_EMBED_SUFFIX) or n == "tokens" for n in names):
            embedding += size
        elif names[0] in _CONTEXT_TREES:
            context += size
        if names[-1] in ("w_gate", "w_up", "w_down"):
            routed += size
    return total, embedding, routed, context


def _pathways_mac(e: EncoderConfig) -> int:
    """Static MLP, the event pathways (behaviour ones and their fusion included) and the
    QFormer, at the context width."""
    d = e.d_model
    n_static = schema.SchemaSpec().shapes()["static"][0][-1]
    mac = n_static * e.feature_dim * d + d * d
    event_in = d + e.author_dim + (5 + (e.n_scenarios > 0)) * e.feature_dim
    behaviours = e.behaviour_lens()
    for length in (e.short_len, e.pos_len, e.life_len, *behaviours.values()):
        mac += length * (event_in * 2 * d + 2 * d * d)
    if e.behaviour_fusion == "cross":  # each behaviour after the first reads those before it
        read = 0
        for length in behaviours.values():
            if read:
                mac += 2 * length * d * d + 2 * read * d * d + 2 * length * read * d
                mac += ffn_matrices(e.ffn) * length * d * e.d_ff
            read += length
    nq, life = e.n_queries, e.life_len
    qformer = 2 * nq * d * d + 2 * life * d * d + 2 * nq * life * d
    qformer += ffn_matrices(e.ffn) * nq * d * e.d_ff
    return mac + e.qformer_blocks * qformer


def _ffn_mac(n: int, d: int, cfg: V1Config | V2Config, moe: bool, dropless: bool) -> float:
    """Multiply-adds of the FFN of `n` tokens; MoE expert rows as dispatched (module docstring)
    unless `dropless`."""
    if not moe:
        return ffn_matrices(cfg.ffn) * n * d * cfg.d_ff
    mo = cfg.moe
    rows = n * mo.top_k  # routed slots
    if mo.dispatch == "capacity" and not dropless:
        rows = mo.capacity_factor * n * mo.top_k  # E * C buffer rows, per sample
    return n * d * mo.n_experts + 3 * d * mo.d_ff * (rows + n * mo.n_shared)


def v1_forward_flops(cfg: V1Config, dropless: bool = False) -> float:
    """Matmul FLOPs of one forward pass of one request (module docstring); `dropless` counts
    MoE experts at the T * k routed slots whatever the dispatch."""
    e = cfg.encoder
    d = e.d_model
    t = e.n_tokens
    mac = _pathways_mac(e)
    mac += e.n_layers * (4 * t * d * d + 2 * t * t * d + ffn_matrices(e.ffn) * t * d * e.d_ff)
    # Decoder: G rows of T positions per request (G * T = m * Q in both modes).
    q, m = len(cfg.vocab), cfg.max_targets
    g, tl = (1, m * q) if cfg.session_wise else (m, q)
    n = g * tl
    layer = 4 * n * d * d + 2 * g * tl * tl * d  # self-attention
    layer += 2 * n * d * d + 2 * t * d * d + 2 * n * t * d  # cross-attention, K/V once per user
    layer += _ffn_mac(n, d, cfg, cfg.moe is not None, dropless)
    mac += cfg.dec_layers * layer + n * d * cfg.n_tokens  # + the output head
    return 2.0 * mac


def v2_context_flops(cfg: V2Config) -> float:
    """Forward FLOPs of V2's context processor for one request: pathways + the K/V sets."""
    e = cfg.context
    kv_out = cfg.l_kv * cfg.s_kv * cfg.kv_heads * cfg.head_dim
    return 2.0 * (_pathways_mac(e) + e.n_tokens * e.d_model * kv_out)


def v2_forward_flops(cfg: V2Config, dropless: bool = False) -> float:
    """Matmul FLOPs of one forward pass of one request: context processor + lazy decoder;
    `dropless` as in `v1_forward_flops`."""
    d, s = cfg.d_model, cfg.context.n_tokens
    q, m = len(cfg.vocab), cfg.max_targets
    n = m * q
    layer = 2 * n * d * d + 2 * n * s * d  # cross-attention: Q and output projections, scores
    layer += 4 * n * d * d + 2 * m * q * q * d  # self-attention
    mac = cfg.n_dense * (layer + _ffn_mac(n, d, cfg, False, dropless))
    if cfg.moe is not None:
        mac += (cfg.n_layers - cfg.n_dense) * (layer + _ffn_mac(n, d, cfg, True, dropless))
    mac += n * d * cfg.n_tokens
    return v2_context_flops(cfg) + 2.0 * mac


def paper_flops_per_sample(
    context_params: float,
    decoder_params: float,
    context_len: int,
    target_tokens: int = 3,
    impressions: int = 5,
) -> dict[str, float]:
    """The V2 paper's accounting: 6 * params * tokens for training, the context part shared by
    the `impressions` items served from one request. An encoder-decoder's encoder and a lazy
    decoder's context processor are the `context_params`."""
    ctx = 6.0 * context_params * context_len / impressions
    dec = 6.0 * decoder_params * target_tokens
    return {"context": ctx, "decoder": dec, "total": ctx + dec, "context_share": ctx / (ctx + dec)}


def counts(model: OneRecV1 | OneRecV2) -> Counts:
    """Parameter and FLOP counts of either family (module docstring)."""
    cfg = model.cfg
    total, embedding, routed, context_params = _split_params(param_shapes(model))
    active = total
    if cfg.moe is not None:
        active = total - round(routed * (1 - cfg.moe.top_k / cfg.moe.n_experts))
    forward = v2_forward_flops if isinstance(model, OneRecV2) else v1_forward_flops
    fwd, fwd_dropless = forward(cfg), forward(cfg, dropless=True)
    e = cfg.context if isinstance(model, OneRecV2) else cfg.encoder
    target_tokens = cfg.max_targets * len(cfg.vocab)
    context = 1 + e.short_len + e.pos_len + e.life_len + sum(e.behaviour_lens().values())
    context += e.n_scenarios > 0
    return Counts(
        params_total=total,
        params_embedding=embedding,
        params_routed=routed,
        params_active=active,
        params_non_embedding=total - embedding,
        params_context=context_params,
        params_decoder=total - embedding - context_params,
        flops_forward=fwd,
        flops_forward_dropless=fwd_dropless,
        flops_train=3.0 * fwd,
        tokens_per_sample=target_tokens,
        six_nd=6.0 * (active - embedding) * (context + target_tokens),
    )
