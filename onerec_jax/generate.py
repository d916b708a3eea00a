"""Trie-constrained beam search over semantic ids: every returned tuple is a real item.

Works for V1 and V2 alike through their `encode` / `init_cache` / `step` methods. The user
context is encoded once per request and each decoder layer's cross-attention K/V are computed
from it once per user (`init_cache`; V2's context K/V come straight out of `encode`); the
user's W beams are folded into the query axis, so nothing user-sized is ever copied per beam.
Each generated code costs one decoder position (`step`, self-attention KV cache). At level l
all W beams of all B users are scored in one call, the codes the trie does not allow after
each beam's prefix are masked, and one top-k over W * V_l per user keeps the W best
extensions: no Python loop over beams. The self-attention cache rows follow their beams
through that top-k. MoE layers route dropless in `step` whatever their training dispatch:
capacity shared by the B x W rows of a step would make a user's results depend on its batch
mates (tested: each user's beams are the same alone as batched).

Point-wise models generate one item (Q codes) per beam. Session-wise models (2502.18965)
generate `max_targets` items per beam, the trie restarting at the root after each item; the
loop over items is a `lax.scan` and the Q (<= 4) levels inside it are unrolled at trace time,
because each level's trie arrays have their own shapes. Items of one session are not forced to
be distinct.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from onerec_jax.model.v1 import OneRecV1
from onerec_jax.model.v2 import OneRecV2
from onerec_jax.tokenizer.semantic_ids import Trie


@functools.partial(jax.jit, static_argnames=("model", "beam"))
def beam_search(
    model: OneRecV1 | OneRecV2,
    variables: Any,
    inputs: dict[str, jax.Array],
    trie: Trie,
    beam: int,
) -> dict[str, jax.Array]:
    """Top `beam` results per request, best first.

    Returns `items` [B, W] (0 where fewer than W items exist), `logprob` [B, W] (sum over the
    generated codes; -inf for those) and `codes` [B, W, Q]. Session-wise models also return
    `sessions` [B, W, m] and `session_codes` [B, W, m, Q]; their `items`/`codes` are the first
    item of each session.
    """
    cfg = model.cfg
    q = len(cfg.vocab)
    if tuple(trie.vocab) != tuple(cfg.vocab):
        raise ValueError(f"trie vocab {trie.vocab} != model vocab {cfg.vocab}")
    n_items = cfg.max_targets if cfg.session_wise else 1
    mem, mem_mask = model.apply(variables, inputs, method="encode")
    b, w = mem_mask.shape[0], beam
    n = b * w
    cache = model.apply(variables, mem, mem_mask, n, method="init_cache")
    # Only beam 0 of each user is alive at the start, so the first top-k does not pick the
    # same code W times.
    score = jnp.broadcast_to(jnp.where(jnp.arange(w)[None, :] == 0, 0.0, -jnp.inf), (b, w))
    carry = {
        "cache": cache,
        "token": jnp.full((n,), cfg.n_tokens - 1, jnp.int32),  # BOS
        "score": score,
        "codes": jnp.zeros((b, w, n_items, q), jnp.int32),
        "items": jnp.zeros((b, w, n_items), jnp.int32),
    }

    def one_item(carry: dict[str, Any], j: jax.Array) -> tuple[dict[str, Any], None]:
        nodes = jnp.where(jnp.isfinite(carry["score"].reshape(-1)), 0, -1)  # back to the root
        for level in range(q):  # Q <= 4 levels, unrolled (see module docstring)
            logits, cache = model.apply(
                variables, carry["cache"], carry["token"], j * q + level, method="step"
            )
            lo, v = int(cfg.offsets[level]), cfg.vocab[level]
            logp = jax.nn.log_softmax(logits[:, lo : lo + v], axis=-1)
            logp = jnp.where(trie.valid_mask(level, nodes), logp, -jnp.inf)
            total = carry["score"].reshape(n, 1) + logp  # [B*W, V]
            top, flat = jax.lax.top_k(total.reshape(b, w * v), w)  # [B, W]
            parent = flat // v
            code = (flat % v).astype(jnp.int32)
            rows = (jnp.arange(b)[:, None] * w + parent).reshape(-1)
            nodes = trie.step(level, nodes[rows], code.reshape(-1))
            nodes = jnp.where(jnp.isfinite(top.reshape(-1)), nodes, -1)
            codes = jnp.take_along_axis(carry["codes"], parent[..., None, None], axis=1)
            items = jnp.take_along_axis(carry["items"], parent[..., None], axis=1)
            carry = {
                # Self-attention cache rows follow their beams; per-user K/V stay put.
                "cache": cache.take_rows(rows),
                "token": code.reshape(-1) + lo,
                "score": top,
                "codes": codes.at[:, :, j, level].set(code),
                "items": items,
            }
        item = trie.item_of(nodes).reshape(b, w)
        carry["items"] = carry["items"].at[:, :, j].set(item)
        return carry, None

    carry, _ = jax.lax.scan(one_item, carry, jnp.arange(n_items))
    out = {
        "items": carry["items"][:, :, 0],
        "logprob": carry["score"],
        "codes": carry["codes"][:, :, 0],
    }
    if cfg.session_wise:
        out["sessions"] = carry["items"]
        out["session_codes"] = carry["codes"]
    return out
