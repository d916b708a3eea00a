"""Trie-constrained beam search against exhaustive scoring of every item."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import tiny_encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onerec_jax.data import schema, sources
from onerec_jax.generate import beam_search
from onerec_jax.model.decoder_block import KVCache
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.v1 import OneRecV1, V1Cache, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Cache, V2Config
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


def test_beam_512_on_a_smaller_catalogue(setup, exact):
    """The widest beam generation is meant for, 512: every item found once, the rest empty
    (-inf)."""
    model, variables, inputs, table = setup
    out = beam_search(model, variables, inputs, table.trie(), 512)
    items, logp = np.asarray(out["items"]), np.asarray(out["logprob"])
    n = table.n_items
    assert items.shape == (3, 512)
    for u in range(3):
        assert sorted(items[u][:n].tolist()) == list(range(1, n + 1))
        assert items[u][0] == np.argmax(exact[u]) + 1
    assert (items[:, n:] == 0).all() and np.isneginf(logp[:, n:]).all()


# The session-wise case is also covered end to end by the exact-sessions test below.
@pytest.mark.parametrize("session_wise", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cached_step_equals_full_prefix_logits(setup, session_wise):
    """One position at a time through the KV cache gives the logits of the whole prefix."""
    _, _, inputs, table = setup
    src = sources.open_source("world:tiny")
    cfg = V1Config(
        encoder=tiny_encoder(src, 8, 16),
        vocab=table.vocab,
        d_ff=64,
        max_targets=2,
        session_wise=session_wise,
        moe=MoEConfig(n_experts=4, top_k=2, d_ff=32),
    )
    model = OneRecV1(cfg)
    codes = jnp.asarray(table.codes[1:7].reshape(3, 2, table.n_levels))
    variables = jax.jit(model.init)(jax.random.key(1), inputs, codes)
    g = 1 if session_wise else 2
    ids = (codes + jnp.asarray(cfg.offsets)[None, None, :]).reshape(3 * g, -1)
    bos = jnp.full((3 * g, 1), cfg.n_tokens - 1, jnp.int32)
    inp = jnp.concatenate([bos, ids[:, :-1]], axis=1)

    @jax.jit
    def both(variables):
        mem, mask = model.apply(variables, inputs, method=OneRecV1.encode)
        full, _ = model.apply(variables, mem, mask, inp, method=OneRecV1.logits)
        cache = model.apply(variables, mem, mask, 3 * g, method=OneRecV1.init_cache)
        assert isinstance(cache, V1Cache)

        def one(cache, p):
            lg, cache = model.apply(variables, cache, inp[:, p], p, method=OneRecV1.step)
            return cache, lg

        _, steps = jax.lax.scan(one, cache, jnp.arange(inp.shape[1]))
        return full, jnp.swapaxes(steps, 0, 1)

    full, steps = both(variables)
    np.testing.assert_allclose(np.asarray(steps), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_caches_reorder_only_their_per_beam_rows():
    """After a top-k, generation moves each beam's self-attention rows to its new slot
    (`take_rows`); the per-user parts (cross-attention K/V, context sets, masks) stay."""
    k = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4, 1, 1)  # [L, N, T, H, K]
    kv = KVCache(k, -k)
    rows = jnp.array([2, 2, 0])
    user = jnp.ones((2, 1, 5, 1, 1))  # [L, B, S, H, K]
    mask = jnp.ones((1, 5), bool)
    for cache, moved_kv in (
        (V1Cache(kv, (user, user), mask), lambda c: [c.self_kv]),
        (V2Cache(kv, None, user, mask), lambda c: [c.dense_kv]),
        (V2Cache(None, kv, user, mask), lambda c: [c.moe_kv]),
    ):
        moved = cache.take_rows(rows)
        assert type(moved) is type(cache)
        for new in moved_kv(moved):
            np.testing.assert_array_equal(new.k, k[:, rows])
            np.testing.assert_array_equal(new.v, -k[:, rows])
        for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(moved), strict=True):
            assert (a is b) == (a.shape[1] != 3)  # only the N = 3 beam rows are new arrays


def test_session_wise_search_finds_the_exact_top_sessions(setup):
    """A session-wise model over 10 items, sessions of 2: beam 100 covers every ordered pair,
    and its ranking equals exhaustive scoring of all 100 sessions."""
    _, _, inputs, _ = setup
    src = sources.open_source("world:tiny")
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, k, 10) for k in (3, 2, 2)], 1)
    table = SemanticIds.from_codes(codes, (3, 2, 2))
    n, q = table.n_items, table.n_levels
    cfg = V1Config(
        encoder=tiny_encoder(src, 8, 16),
        vocab=table.vocab,
        d_ff=64,
        max_targets=2,
        session_wise=True,
    )
    model = OneRecV1(cfg)
    pairs = np.array([(a, b) for a in range(1, n + 1) for b in range(1, n + 1)])
    variables = jax.jit(model.init)(jax.random.key(2), inputs, jnp.zeros((3, 2, q), jnp.int32))
    rows = jax.tree.map(lambda x: jnp.repeat(x, len(pairs), axis=0), inputs)
    session_codes = jnp.asarray(np.tile(table.lookup(pairs), (3, 1, 1)))
    nll, _ = jax.jit(model.apply)(variables, rows, session_codes)
    exact = -np.asarray(nll).sum(axis=(1, 2)).reshape(3, len(pairs))
    out = beam_search(model, variables, inputs, table.trie(), len(pairs))
    sessions, logp = np.asarray(out["sessions"]), np.asarray(out["logprob"])
    index = {tuple(p): i for i, p in enumerate(pairs.tolist())}
    for u in range(3):
        found = [index[tuple(s)] for s in sessions[u].tolist()]
        assert sorted(found) == list(range(len(pairs)))
        np.testing.assert_allclose(logp[u], exact[u][found], rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(logp[u]) <= 1e-5)
    np.testing.assert_array_equal(np.asarray(out["items"]), sessions[:, :, 0])


# V2's case is slow (the same dropless decoding path; one more compile of a MoE search).
@pytest.mark.parametrize("family", ["v1", pytest.param("v2", marks=pytest.mark.slow)])
def test_capacity_moe_beams_do_not_depend_on_batch_mates(setup, family):
    """Capacity dispatch would share expert slots among all B x W beam rows of a step, so a
    user's beams would depend on who else is in the batch. Decoding routes dropless (the same
    parameters), so each user's beams are the same alone as batched."""
    _, _, inputs, table = setup
    src = sources.open_source("world:tiny")
    moe = MoEConfig(n_experts=8, top_k=2, d_ff=32, dispatch="capacity", capacity_factor=1.0)
    if family == "v1":
        enc = tiny_encoder(src, 8, 16)
        model = OneRecV1(V1Config(encoder=enc, vocab=table.vocab, d_ff=64, moe=moe, max_targets=1))
    else:
        ctx = tiny_encoder(src, 8, 16, d_model=16)
        cfg = V2Config(context=ctx, d_model=32, d_ff=64, vocab=table.vocab, moe=moe, max_targets=1)
        model = OneRecV2(cfg)
    dummy = jnp.zeros((3, 1, table.n_levels), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(3), inputs, dummy)
    trie = table.trie()
    batched = beam_search(model, variables, inputs, trie, 8)
    for u in range(3):
        one = jax.tree.map(lambda a, u=u: a[u : u + 1], inputs)
        alone = beam_search(model, variables, one, trie, 8)
        np.testing.assert_array_equal(np.asarray(alone["items"])[0], batched["items"][u])
        np.testing.assert_allclose(
            np.asarray(alone["logprob"])[0], batched["logprob"][u], rtol=1e-5, atol=1e-5
        )


@pytest.mark.slow
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_beams_name_only_catalogue_items_for_any_trie(setup, data):
    """Any table over the model's code space (1 item up to every tuple, uneven fan-out) and
    any beam: every returned item is a catalogue item whose codes are the returned codes, and a
    slot with no item (fewer items than beams) is item 0 with log-probability -inf."""
    model, variables, inputs, fixture_table = setup
    vocab = fixture_table.vocab  # the model's levels (the fixture's table has a dedup level)
    space = np.stack(np.meshgrid(*(np.arange(k) for k in vocab), indexing="ij"), -1)
    space = space.reshape(-1, len(vocab))
    n = data.draw(st.integers(1, len(space)), label="items")
    pick = data.draw(st.permutations(range(len(space))), label="order")[:n]
    codes = np.concatenate([np.full((1, len(vocab)), -1), space[np.asarray(pick)]])
    table = SemanticIds(codes, vocab, dedup=False)
    beam = data.draw(st.sampled_from([1, 3, 8, 64]), label="beam")
    out = beam_search(model, variables, inputs, table.trie(), beam)
    items, logp = np.asarray(out["items"]), np.asarray(out["logprob"])
    assert ((items >= 0) & (items <= n)).all()
    real = items > 0
    assert (np.isfinite(logp) == real).all()
    assert real.sum(1).tolist() == [min(beam, n)] * len(items)
    np.testing.assert_array_equal(np.asarray(out["codes"])[real], table.codes[items[real]])
