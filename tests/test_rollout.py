"""Rollouts for alignment: their log-probabilities agree with beam search's scores, sampling
follows the policy's distribution, and the trie keeps every sampled rollout legal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import tiny_encoder

from onerec_jax.data import schema, sources
from onerec_jax.generate import beam_search
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Config
from onerec_jax.rl.rollout import rollout_logp, sample_rollouts
from onerec_jax.tokenizer.semantic_ids import SemanticIds

SPEC = schema.SchemaSpec(pos_len=8, life_len=16)
VOCAB = (5, 4, 3)


# V2 runs the same rollout code through its own `encode` / `logits` / `step` (slow suite).
@pytest.fixture(scope="module", params=["v1", pytest.param("v2", marks=pytest.mark.slow)])
def setup(request):
    src = sources.open_source("world:tiny")
    b = schema.build_batch(src.raw_batch(np.arange(3), SPEC.history_window, SPEC), SPEC)
    inputs = {k: jnp.asarray(v) for k, v in b.items() if k not in ("user_id", "request_ts")}
    # 40 distinct tuples of the 60 in a 5 x 4 x 3 code space (no dedup level): a sparse trie.
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in VOCAB], indexing="ij"), -1).reshape(-1, 3)
    codes = grid[np.random.default_rng(0).choice(len(grid), 40, replace=False)]
    table = SemanticIds.from_codes(codes, VOCAB)
    assert table.vocab == VOCAB
    if request.param == "v1":
        enc = tiny_encoder(src, 8, 16)
        model = OneRecV1(V1Config(encoder=enc, vocab=table.vocab, d_ff=64, max_targets=1))
    else:
        ctx = tiny_encoder(src, 8, 16, d_model=16)
        cfg = V2Config(context=ctx, d_model=32, d_ff=64, vocab=table.vocab, max_targets=1)
        model = OneRecV2(cfg)
    dummy = jnp.zeros((3, 1, table.n_levels), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), inputs, dummy)
    # A peaked policy (the head's weights x 8), so that sampling errors would show.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8 if "head" in jax.tree_util.keystr(p) else x, variables["params"]
    )
    return model, {**variables, "params": params}, inputs, table


def test_rollout_logp_equals_beam_search_scores(setup):
    model, variables, inputs, table = setup
    out = beam_search(model, variables, inputs, table.trie(), 8)
    codes = jnp.asarray(out["codes"])[:, :, None, :]  # [B, 8, 1, Q]
    logp_of = jax.jit(rollout_logp, static_argnums=(0, 4))
    logp = logp_of(model, variables, inputs, codes, False)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(out["logprob"]), atol=1e-4)
    per_code = logp_of(model, variables, inputs, codes, True)
    assert per_code.shape == (3, 8, table.n_levels)
    np.testing.assert_allclose(np.asarray(per_code).sum(-1), np.asarray(logp), atol=1e-4)


def test_sampling_follows_the_policy(setup):
    """Without the trie the sampler draws from the policy itself: over all 60 code tuples the
    exact probabilities sum to 1, and 4,000 draws per user land within a total-variation
    distance of 0.08 of them (a sampler that, say, ignored the earlier codes would not)."""
    model, variables, inputs, _ = setup
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in VOCAB], indexing="ij"), -1).reshape(-1, 3)
    every = jnp.asarray(np.broadcast_to(grid[None, :, None, :], (3, len(grid), 1, 3)))
    p = np.exp(np.asarray(rollout_logp(model, variables, inputs, every), np.float64))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-4)
    n = 4000
    draws = np.asarray(sample_rollouts(model, variables, inputs, n, jax.random.key(1)))
    assert draws.shape == (3, n, 1, 3)
    flat = (draws[:, :, 0] * np.asarray([12, 3, 1])).sum(-1)  # index into the grid
    for u in range(3):
        freq = np.bincount(flat[u], minlength=len(grid)) / n
        tv = 0.5 * np.abs(freq - p[u]).sum()
        assert tv < 0.08, (u, tv)
    assert p.max() > 0.2  # the policy is peaked enough for the check to mean something


def test_trie_keeps_every_sample_legal_and_the_key_decides(setup):
    model, variables, inputs, table = setup
    trie = table.trie()
    a = np.asarray(sample_rollouts(model, variables, inputs, 64, jax.random.key(2), trie))
    assert (table.find(a[:, :, 0]) > 0).all()
    free = np.asarray(sample_rollouts(model, variables, inputs, 64, jax.random.key(2)))
    assert (table.find(free[:, :, 0]) == 0).any()  # 40 of 60 tuples are items: some are not
    again = np.asarray(sample_rollouts(model, variables, inputs, 64, jax.random.key(2), trie))
    other = np.asarray(sample_rollouts(model, variables, inputs, 64, jax.random.key(3), trie))
    np.testing.assert_array_equal(a, again)
    assert (a != other).any()


def test_rollout_shape_is_checked(setup):
    model, variables, inputs, _ = setup
    with pytest.raises(ValueError, match=r"expected \[B, G, 1, 3\]"):
        rollout_logp(model, variables, inputs, jnp.zeros((3, 2, 2, 3), jnp.int32))


@pytest.mark.slow
def test_capacity_moe_rollouts_are_scored_dropless():
    """With capacity dispatch a rollout's training-mode score would depend on its batch mates
    (G beams of a user pile onto the same experts); rollout_logp routes dropless, as decoding
    does, so it still equals beam search's scores."""
    from onerec_jax.model.moe import MoEConfig

    src = sources.open_source("world:tiny")
    b = schema.build_batch(src.raw_batch(np.arange(3), SPEC.history_window, SPEC), SPEC)
    inputs = {k: jnp.asarray(v) for k, v in b.items() if k not in ("user_id", "request_ts")}
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in VOCAB], indexing="ij"), -1).reshape(-1, 3)
    table = SemanticIds.from_codes(grid[:40], VOCAB)
    moe = MoEConfig(n_experts=8, top_k=2, d_ff=32, dispatch="capacity", capacity_factor=0.5)
    enc = tiny_encoder(src, 8, 16)
    model = OneRecV1(V1Config(encoder=enc, vocab=VOCAB, d_ff=64, moe=moe, max_targets=1))
    variables = jax.jit(model.init)(jax.random.key(4), inputs, jnp.zeros((3, 1, 3), jnp.int32))
    out = beam_search(model, variables, inputs, table.trie(), 16)
    codes = jnp.asarray(out["codes"])[:, :, None, :]
    logp = jax.jit(rollout_logp, static_argnums=0)(model, variables, inputs, codes)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(out["logprob"]), atol=1e-4)
