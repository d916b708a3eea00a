"""Rollouts for alignment: their log-probabilities under a policy, and sampling from it.

A rollout is what the generator recommends to one request: one item (Q codes) for point-wise
models, a session of `max_targets` items for session-wise V1. G rollouts per request are scored
together: the user's context is encoded once and the G sequences are folded into the decoder's
rows (a user's rows contiguous, as in training and beam search), so nothing user-sized is
repeated per rollout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from onerec_jax.model.semantic_tokens import level_nll
from onerec_jax.model.v1 import OneRecV1
from onerec_jax.model.v2 import OneRecV2
from onerec_jax.tokenizer.semantic_ids import Trie
from onerec_jax.train.step import dropless


def _items_per_rollout(model: OneRecV1 | OneRecV2) -> int:
    return model.cfg.max_targets if model.cfg.session_wise else 1


def rollout_logp(
    model: OneRecV1 | OneRecV2,
    variables: Any,
    inputs: dict[str, jax.Array],
    codes_BxGxMxQ: jax.Array,
    per_code: bool = False,
) -> jax.Array:
    """log pi(rollout | request) [B, G]: the sum of the log-probabilities of its codes (each
    scored against its level's slice of the head, as training scores them). `per_code` gives
    them unsummed, [B, G, M * Q]. M is 1 for point-wise models, `max_targets` for session-wise
    ones; every code must be in range (rollouts name real items or were sampled in-vocab).
    MoE layers route dropless, as decoding does: with capacity dispatch a rollout's score
    would depend on the other rollouts of the batch, and would not be the probability of the
    policy that generated it."""
    model = dropless(model)
    cfg = model.cfg
    b, g, m, q = codes_BxGxMxQ.shape
    if m != _items_per_rollout(model) or q != len(cfg.vocab):
        raise ValueError(
            f"rollouts {codes_BxGxMxQ.shape}: expected [B, G, {_items_per_rollout(model)}, "
            f"{len(cfg.vocab)}] for this model"
        )
    ids = codes_BxGxMxQ + jnp.asarray(cfg.offsets, codes_BxGxMxQ.dtype).reshape(1, 1, 1, q)
    seq_NxT = ids.reshape(b * g, m * q)
    bos_Nx1 = jnp.full((b * g, 1), cfg.n_tokens - 1, seq_NxT.dtype)
    inp_NxT = jnp.concatenate([bos_Nx1, seq_NxT[:, :-1]], axis=1)

    def run(module: OneRecV1 | OneRecV2) -> jax.Array:
        ctx, mask = module.encode(inputs)
        logits, _ = module.logits(ctx, mask, inp_NxT)
        return logits

    logits = model.apply(variables, method=run)  # encode and decode in one trace
    logp = -level_nll(logits, seq_NxT, cfg).reshape(b, g, m * q)
    return logp if per_code else jnp.sum(logp, -1)


def sample(
    model: OneRecV1 | OneRecV2,
    variables: Any,
    inputs: dict[str, jax.Array],
    n: int,
    key: jax.Array,
    trie: Trie | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """`n` rollouts per request sampled from the policy, codes [B, n, M, Q]. With a `trie`
    every code is drawn among those that continue a real item (each rollout is legal); without
    one, from the level's whole vocabulary (the format reward then judges legality). Uses the
    same KV-cached decoding as beam search, one position per code."""
    cfg = model.cfg
    q, m = len(cfg.vocab), _items_per_rollout(model)
    mem, mem_mask = model.apply(variables, inputs, method="encode")
    b = mem_mask.shape[0]
    rows = b * n
    cache = model.apply(variables, mem, mem_mask, rows, method="init_cache")
    token = jnp.full((rows,), cfg.n_tokens - 1, jnp.int32)  # BOS
    codes = []
    nodes = jnp.zeros((rows,), jnp.int32)
    for pos in range(m * q):  # M * Q <= 20 positions, unrolled: each level has its own slice
        level = pos % q
        if level == 0:
            nodes = jnp.zeros((rows,), jnp.int32)  # a new item starts at the trie's root
        logits, cache = model.apply(variables, cache, token, pos, method="step")
        lo, v = int(cfg.offsets[level]), cfg.vocab[level]
        z = logits[:, lo : lo + v] / temperature
        if trie is not None:
            z = jnp.where(trie.valid_mask(level, nodes), z, -jnp.inf)
        key, sub = jax.random.split(key)
        code = jax.random.categorical(sub, z).astype(jnp.int32)
        if trie is not None:
            nodes = trie.step(level, nodes, code)
        codes.append(code)
        token = code + lo
    return jnp.stack(codes, -1).reshape(b, n, m, q)


sample_rollouts = jax.jit(sample, static_argnames=("model", "n", "temperature"))
