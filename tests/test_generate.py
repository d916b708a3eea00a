"""Trie-constrained beam search against exhaustive scoring of every item."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import tiny_encoder

from onerec_jax.data import schema, sources
from onerec_jax.generate import beam_search
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.tokenizer.semantic_ids import SemanticIds

SPEC = schema.SchemaSpec(pos_len=8, life_len=16)
N_ITEMS = 40


@pytest.fixture(scope="module")
def setup():
    src = sources.open_source("world:tiny")
    b = schema.build_batch(src.raw_batch(np.arange(3), SPEC.history_window, SPEC), SPEC)
    inputs = {k: jnp.asarray(v) for k, v in b.items() if k not in ("user_id", "request_ts")}
    rng = np.random.default_rng(0)
    # 40 items over a 5 x 4 x 3 code space: a sparse trie with uneven fan-out.
    codes = np.stack([rng.integers(0, k, N_ITEMS) for k in (5, 4, 3)], 1)
    table = SemanticIds.from_codes(codes, (5, 4, 3))
    enc = tiny_encoder(src, 8, 16)
    model = OneRecV1(V1Config(encoder=enc, vocab=table.vocab, d_ff=64, dec_layers=2, max_targets=1))
    dummy = jnp.zeros((3, 1, table.n_levels), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), inputs, dummy)
    return model, variables, inputs, table


@pytest.fixture(scope="module")
def exact(setup):
    """log p(item) = -sum of the level NLLs of its full code tuple, for every user and item."""
    model, variables, inputs, table = setup
    all_codes = jnp.asarray(table.codes[1:])[:, None, :]  # [N, 1, L]
    n = all_codes.shape[0]
    # Every (user, item) pair as one row: user u's features repeated once per item.
    rows = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), inputs)
    nll, _ = jax.jit(model.apply)(variables, rows, jnp.tile(all_codes, (3, 1, 1)))
    return -np.asarray(nll).sum(axis=(1, 2)).reshape(3, n)


def test_beam_search_finds_the_exact_top_items(setup, exact):
    model, variables, inputs, table = setup
    out = beam_search(model, variables, inputs, table.trie(), 64)
    items, logp = np.asarray(out["items"]), np.asarray(out["logprob"])
    n = table.n_items
    # With more beams than items, every item is found, ranked by its exact log-probability.
    for u in range(3):
        found = items[u][:n]
        assert sorted(found.tolist()) == list(range(1, n + 1))
        np.testing.assert_allclose(logp[u][:n], exact[u][found - 1], rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(logp[u][:n]) <= 1e-6)
        assert (items[u][n:] == 0).all() and np.isneginf(logp[u][n:]).all()
    np.testing.assert_array_equal(np.asarray(out["codes"])[:, :n], table.lookup(items[:, :n]))


def test_small_beam_returns_real_items_near_the_top(setup, exact):
    model, variables, inputs, table = setup
    out = beam_search(model, variables, inputs, table.trie(), 5)
    items = np.asarray(out["items"])
    assert items.shape == (3, 5) and (items > 0).all()
    for u in range(3):
        assert len(set(items[u].tolist())) == 5  # distinct items
        # Beam search is approximate, but its best item is the exact best in this small space.
        assert items[u][0] == np.argmax(exact[u]) + 1


def test_vocab_mismatch_is_an_error(setup):
    model, variables, inputs, _ = setup
    other = SemanticIds.from_codes(np.array([[0, 1], [1, 0]]), (2, 2))
    with pytest.raises(ValueError, match="vocab"):
        beam_search(model, variables, inputs, other.trie(), 4)
