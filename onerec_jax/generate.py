"""Trie-constrained beam search over semantic ids: every returned tuple is a real item.

The user memory is encoded once per request. Level l scores all W beams of all B users in one
decoder call over fixed-length inputs [BOS, s_1..s_Q] (positions after l are placeholders that
the causal mask keeps out of position l), masks the codes the trie does not allow after each
beam's prefix, and keeps the W best (beam, code) extensions per user with one top-k over
W * V_l: no Python loop over beams, one compiled program for the whole search. The loop over
the Q (<= 4) levels is unrolled at trace time because each level's trie arrays have their own
shapes.

Cost note: the decoder is re-run on the (<= Q + 1 token) prefix at each level instead of keeping
a self-attention cache, and the cross-attention K/V of the user memory are projected once per
user per level (shared by that user's W beams, never per beam).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from onerec_jax.model.v1 import OneRecV1
from onerec_jax.tokenizer.semantic_ids import Trie


@functools.partial(jax.jit, static_argnames=("model", "beam"))
def beam_search(
    model: OneRecV1,
    variables: Any,
    inputs: dict[str, jax.Array],
    trie: Trie,
    beam: int,
) -> dict[str, jax.Array]:
    """Top `beam` items per request: `items` [B, W] (0 where fewer than W items exist),
    `logprob` [B, W] (sum over levels, -inf for those), `codes` [B, W, Q]; best first."""
    cfg = model.cfg
    q = len(cfg.vocab)
    if tuple(trie.vocab) != tuple(cfg.vocab):
        raise ValueError(f"trie vocab {trie.vocab} != model vocab {cfg.vocab}")
    mem, mem_mask = model.apply(variables, inputs, method=OneRecV1.encode)
    b = mem.shape[0]
    w = beam
    n = b * w
    tokens = jnp.zeros((n, q + 1), jnp.int32).at[:, 0].set(cfg.n_tokens - 1)
    nodes = jnp.zeros(n, jnp.int32)
    # Only beam 0 of each user is alive at the start, so the first top-k does not pick the
    # same code W times.
    score = jnp.where(jnp.arange(w)[None, :] == 0, 0.0, -jnp.inf)
    score = jnp.broadcast_to(score, (b, w))
    codes = jnp.zeros((b, w, q), jnp.int32)
    for level in range(q):  # Q <= 4 levels, unrolled (see module docstring)
        logits, _ = model.apply(variables, mem, mem_mask, tokens, method=OneRecV1.logits)
        lo, v = int(cfg.offsets[level]), cfg.vocab[level]
        logp = jax.nn.log_softmax(logits[:, level, lo : lo + v], axis=-1)
        allowed = trie.valid_mask(level, nodes)
        logp = jnp.where(allowed, logp, -jnp.inf)
        total = score.reshape(n, 1) + logp  # [B*W, V]
        top, flat = jax.lax.top_k(total.reshape(b, w * v), w)  # [B, W]
        parent = flat // v
        code = (flat % v).astype(jnp.int32)
        rows = (jnp.arange(b)[:, None] * w + parent).reshape(-1)
        nodes = trie.step(level, nodes[rows], code.reshape(-1))
        nodes = jnp.where(jnp.isfinite(top.reshape(-1)), nodes, -1)
        tokens = tokens[rows].at[:, level + 1].set(code.reshape(-1) + lo)
        codes = jnp.take_along_axis(codes, parent[..., None], axis=1).at[:, :, level].set(code)
        score = top
    items = trie.item_of(nodes).reshape(b, w)
    return {"items": items, "logprob": score, "codes": codes}
