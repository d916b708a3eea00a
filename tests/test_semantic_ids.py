"""Semantic-id table, de-duplication and the jit-usable prefix trie."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec_jax.tokenizer import semantic_ids as sid


@st.composite
def code_tables(draw):
    """Random quantiser output: n items x Q levels with small vocabularies (many collisions)."""
    q = draw(st.integers(1, 3))
    vocab = tuple(draw(st.lists(st.integers(1, 5), min_size=q, max_size=q)))
    n = draw(st.integers(1, 60))
    cols = [draw(hnp.arrays(np.int64, n, elements=st.integers(0, k - 1))) for k in vocab]
    return np.stack(cols, axis=1), vocab


@settings(max_examples=40, deadline=None)
@given(code_tables())
def test_dedup_codes_in_range_and_unique(table):
    codes, vocab = table
    t = sid.SemanticIds.from_codes(codes, vocab)
    body = t.codes[1:]
    assert np.all((body >= 0) & (body < np.asarray(t.vocab)))
    assert len(np.unique(body, axis=0)) == len(body)
    # The first Q codes are the quantiser's; the extra level exists iff there were collisions.
    np.testing.assert_array_equal(body[:, : len(vocab)], codes)
    assert t.dedup == (sid.collision_rate(codes) > 0)
    assert sid.collision_rate(body) == 0.0
    items = np.arange(1, t.n_items + 1)
    np.testing.assert_array_equal(t.items_of(t.lookup(items)), items)


@settings(max_examples=12, deadline=None)
@given(code_tables())
def test_trie_accepts_exactly_the_table_prefixes(table):
    codes, vocab = table
    t = sid.SemanticIds.from_codes(codes, vocab)
    trie = t.trie()
    body = t.codes[1:]
    # Every tuple of each length over the vocab: accepted iff some item starts with it.
    spaces = [
        np.array(list(itertools.product(*[range(k) for k in t.vocab[:length]])), np.int32)
        for length in range(1, t.n_levels + 1)
    ]

    @jax.jit  # one compile per example: op-by-op dispatch would compile every primitive
    def run(trie, spaces, body):
        out = []
        for length, space in enumerate(spaces, start=1):
            parents = trie.walk(space[:, : length - 1])
            mask = trie.valid_mask(length - 1, parents)
            out.append((trie.walk(space), mask[jnp.arange(space.shape[0]), space[:, -1]]))
        return out, trie.item_of(trie.walk(body))

    results, items = run(trie, spaces, body)
    for space, (nodes, by_mask) in zip(spaces, results, strict=True):
        length = space.shape[1]
        real = {tuple(r) for r in body[:, :length].tolist()}
        expected = [tuple(r) in real for r in space.tolist()]
        assert (np.asarray(nodes) >= 0).tolist() == expected
        assert np.asarray(by_mask).tolist() == expected  # valid_mask agrees with step
    np.testing.assert_array_equal(np.asarray(items), np.arange(1, t.n_items + 1))


@settings(max_examples=25, deadline=None)
@given(code_tables())
def test_save_load_round_trip(tmp_path_factory, table):
    codes, vocab = table
    t = sid.SemanticIds.from_codes(codes, vocab, meta={"source": "test", "k": list(vocab)})
    d = tmp_path_factory.mktemp("sid")
    t.save(d)
    assert sid.SemanticIds.load(d) == t


def test_trie_inside_jit_and_dead_beams():
    codes = np.array([[0, 1], [0, 2], [3, 0], [3, 1]])
    t = sid.SemanticIds.from_codes(codes, (4, 3))
    trie = t.trie()

    @jax.jit
    def decode(first, second):
        n1 = trie.step(0, np.zeros(first.shape[0], np.int32), first)
        m = trie.valid_mask(1, n1)
        return m, trie.item_of(trie.step(1, n1, second))

    mask, items = decode(np.array([0, 3, 1]), np.array([2, 1, 0]))
    np.testing.assert_array_equal(
        np.asarray(mask), [[False, True, True], [True, True, False], [False, False, False]]
    )
    np.testing.assert_array_equal(np.asarray(items), [2, 4, 0])
    assert not np.asarray(trie.valid_mask(0, np.array([-1]))).any()


def test_collision_rate_and_dedup_rank():
    codes = np.array([[1, 1], [1, 1], [2, 0], [1, 1], [2, 0], [0, 0]])
    assert sid.collision_rate(codes) == pytest.approx(1 - 3 / 6)
    np.testing.assert_array_equal(sid.dedup_level(codes), [0, 1, 0, 2, 1, 0])
    t = sid.SemanticIds.from_codes(codes, (3, 2))
    assert t.vocab == (3, 2, 3) and t.dedup


def test_clear_errors(tmp_path):
    t = sid.SemanticIds.from_codes(np.array([[0, 1], [1, 0]]), (2, 2))
    with pytest.raises(sid.SemanticIdError, match="unknown item id 3"):
        t.lookup(np.array([1, 3]))
    with pytest.raises(sid.SemanticIdError, match="unknown item id 0"):
        t.lookup(np.array([0]))
    with pytest.raises(sid.SemanticIdError, match=r"code tuple \[1, 1\] is not"):
        t.items_of(np.array([[0, 1], [1, 1]]))
    with pytest.raises(sid.SemanticIdError, match=r"code tuple \[5, 0\] is not"):
        t.items_of(np.array([[5, 0]]))
    with pytest.raises(sid.SemanticIdError, match="outside vocab"):
        sid.SemanticIds(np.array([[-1, -1], [0, 2]]), (2, 2), dedup=False)
    with pytest.raises(sid.SemanticIdError, match="share the code tuple"):
        sid.SemanticIds(np.array([[-1, -1], [0, 1], [0, 1]]), (2, 2), dedup=False)
    with pytest.raises(sid.SemanticIdError, match="run `onerec tokenize` first"):
        sid.SemanticIds.load(tmp_path / "nothing")
    (tmp_path / sid.FILE_NAME).write_bytes(b"not a zip")
    with pytest.raises(sid.SemanticIdError, match="not a readable"):
        sid.SemanticIds.load(tmp_path)


def test_failed_save_keeps_the_old_table(tmp_path, monkeypatch):
    t = sid.SemanticIds.from_codes(np.array([[0, 1], [1, 0]]), (2, 2))
    t.save(tmp_path)
    before = (tmp_path / sid.FILE_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        sid.SemanticIds.from_codes(np.array([[1, 1], [0, 0]]), (2, 2)).save(tmp_path)
    assert (tmp_path / sid.FILE_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [sid.FILE_NAME]


def test_newer_format_version_is_refused(tmp_path):
    t = sid.SemanticIds.from_codes(np.array([[0], [1]]), (2,))
    t.save(tmp_path)
    with np.load(tmp_path / sid.FILE_NAME) as z:
        data = dict(z)
    data["format_version"] = np.int64(sid.FORMAT_VERSION + 1)
    np.savez(tmp_path / sid.FILE_NAME, **data)
    with pytest.raises(sid.SemanticIdError, match="format version 2"):
        sid.SemanticIds.load(tmp_path)


def test_damaged_files_get_one_clear_error(tmp_path):
    t = sid.SemanticIds.from_codes(np.array([[0, 1], [1, 0]]), (2, 2))
    t.save(tmp_path)
    path = tmp_path / sid.FILE_NAME
    with np.load(path) as z:
        good = dict(z)
    bad_cases = {
        "float codes": {"codes": good["codes"].astype(np.float64) + 0.5},
        "wrapping codes": {"codes": good["codes"].astype(np.int64) + 2**32},
        "float vocab": {"vocab": np.array([2.5, 2.0])},
        "2-d vocab": {"vocab": np.array([[2, 2]])},
        "bad meta": {"meta": np.asarray("{not json")},
        "list meta": {"meta": np.asarray("[1, 2]")},
        "array version": {"format_version": np.array([1, 1])},
    }
    for name, change in bad_cases.items():
        np.savez(path, **{**good, **change})
        with pytest.raises(sid.SemanticIdError, match=str(tmp_path)):
            sid.SemanticIds.load(tmp_path)
        assert name


def test_float_codes_and_out_of_range_nodes():
    t = sid.SemanticIds.from_codes(np.array([[0, 1], [1, 0]]), (2, 2))
    with pytest.raises(sid.SemanticIdError, match="integers"):
        t.items_of(np.array([[0.5, 1.7]]))
    trie = t.trie()
    # Node ids past the last node are dead: no valid codes, no child.
    assert not np.asarray(trie.valid_mask(1, np.array([2, 99]))).any()
    np.testing.assert_array_equal(np.asarray(trie.step(1, np.array([2]), np.array([0]))), [-1])


def test_find_gives_zero_for_tuples_that_name_no_item():
    """`find` (the format reward's legality check of codes sampled without the trie): the item
    of each legal tuple, 0 for unknown or out-of-vocabulary ones, in the input's shape."""
    t = sid.SemanticIds.from_codes(np.array([[0, 1], [1, 0]]), (2, 2))
    codes = np.array([[[0, 1], [1, 1]], [[5, 0], [1, 0]]])
    np.testing.assert_array_equal(t.find(codes), [[1, 0], [0, 2]])
