"""The semantic-id table: item <-> code tuple maps, collision de-duplication and a prefix trie.

Item ids are the sources' dense ids 1..n_items (0 is padding). A table holds one code tuple per
item, `codes[item] = (c_0, ..., c_{L-1})` with c_l in [0, vocab[l]); row 0 is -1. When the
quantiser gives two items the same Q codes, `from_codes` appends a de-duplication level whose
code is the item's rank among the items sharing its tuple (by item id), so every tuple is
unique and decoding a tuple names exactly one item.

The trie is a pytree of dense arrays, usable inside `jit`: nodes at depth l are the distinct
length-l prefixes in lexicographic order, so the children of a node are contiguous. Per depth it
stores CSR offsets into the sorted child codes; `valid_mask` gathers a fixed-width window of
child codes per node (the largest fan-out at that depth), and `step` moves a batch of nodes down
one level. Memory is O(n_items * L), never O(K^L).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
FILE_NAME = "semantic_ids.npz"


class SemanticIdError(ValueError):
    """An unknown item, an invalid code tuple, or a table file that cannot be read."""


def _mixed_radix(codes: np.ndarray, vocab: tuple[int, ...]) -> np.ndarray:
    """One int64 key per tuple that sorts like the tuple (lexicographic)."""
    if float(np.prod(np.asarray(vocab, np.float64))) >= 2.0**62:
        raise SemanticIdError(f"code space {vocab} is too large for 64-bit keys")
    key = np.zeros(codes.shape[0], np.int64)
    for level, k in enumerate(vocab):
        key = key * k + codes[:, level].astype(np.int64)
    return key


def dedup_level(codes: np.ndarray) -> np.ndarray:
    """Rank [n] of each row among the rows with the same tuple, in row order (0 if unique)."""
    n = codes.shape[0]
    order = np.lexsort(codes.T[::-1])  # lexicographic, stable: ties keep row order
    sc = codes[order]
    new = np.ones(n, bool)
    new[1:] = np.any(sc[1:] != sc[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def collision_rate(codes: np.ndarray) -> float:
    """1 - distinct tuples / items: the share of items a decoder could not tell apart."""
    if len(codes) == 0:
        return 0.0
    return 1.0 - len(np.unique(codes, axis=0)) / len(codes)


class SemanticIds:
    """Item <-> code tuple table. Build with `from_codes`, or `load` a saved one."""

    def __init__(
        self, codes: np.ndarray, vocab: tuple[int, ...], dedup: bool, meta: dict | None = None
    ):
        codes = np.asarray(codes, np.int32)
        vocab = tuple(int(k) for k in vocab)
        if codes.ndim != 2 or codes.shape[1] != len(vocab) or codes.shape[0] < 2:
            raise SemanticIdError(
                f"codes must be [n_items + 1, {len(vocab)}] with n_items >= 1, got {codes.shape}"
            )
        if np.any(codes[0] != -1):
            raise SemanticIdError("row 0 (the padding item) must be all -1")
        body = codes[1:]
        bad = np.flatnonzero(np.any((body < 0) | (body >= np.asarray(vocab)), axis=1))
        if len(bad):
            raise SemanticIdError(
                f"item {bad[0] + 1} has codes {body[bad[0]].tolist()} outside vocab {vocab}"
            )
        self.codes, self.vocab, self.dedup = codes, vocab, bool(dedup)
        self.meta = dict(meta or {})
        keys = _mixed_radix(body, vocab)
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]
        dup = np.flatnonzero(self._keys[1:] == self._keys[:-1])
        if len(dup):
            a, b = self._order[dup[0]] + 1, self._order[dup[0] + 1] + 1
            raise SemanticIdError(f"items {a} and {b} share the code tuple {codes[a].tolist()}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_codes(
        cls, codes: np.ndarray, vocab: tuple[int, ...] | list[int], meta: dict | None = None
    ) -> SemanticIds:
        """Table from quantiser codes [n_items, Q] of items 1..n_items; adds a de-duplication
        level (size = the largest group sharing a tuple) only if some tuples collide."""
        codes = np.asarray(codes, np.int64)
        vocab = tuple(int(k) for k in vocab)
        rank = dedup_level(codes)
        dedup = bool(rank.max(initial=0) > 0)
        if dedup:
            codes = np.concatenate([codes, rank[:, None]], axis=1)
            vocab = (*vocab, int(rank.max()) + 1)
        full = np.concatenate([np.full((1, codes.shape[1]), -1), codes]).astype(np.int32)
        return cls(full, vocab, dedup, meta)

    # ---------------------------------------------------------------- lookups
    @property
    def n_items(self) -> int:
        return self.codes.shape[0] - 1

    @property
    def n_levels(self) -> int:
        return len(self.vocab)

    def lookup(self, items: np.ndarray) -> np.ndarray:
        """Codes [..., L] of item ids [...]; an id outside 1..n_items raises."""
        items = np.asarray(items)
        if not np.issubdtype(items.dtype, np.integer):
            raise SemanticIdError(f"item ids must be integers, got dtype {items.dtype}")
        bad = (items < 1) | (items > self.n_items)
        if np.any(bad):
            raise SemanticIdError(
                f"unknown item id {items[bad].flat[0]}: this table covers items 1..{self.n_items}"
            )
        return self.codes[items]

    def items_of(self, codes: np.ndarray) -> np.ndarray:
        """Item ids [...] of code tuples [..., L]; a tuple that names no item raises."""
        items = self.find(codes)
        if not np.all(items > 0):
            flat = np.asarray(codes).reshape(-1, self.n_levels)
            bad = flat[np.flatnonzero(items.reshape(-1) == 0)[0]].tolist()
            raise SemanticIdError(f"code tuple {bad} is not the semantic id of any item")
        return items

    def find(self, codes: np.ndarray) -> np.ndarray:
        """Item ids [...] of code tuples [..., L], 0 where a tuple names no item (codes sampled
        without the trie: the format reward's legality check)."""
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise SemanticIdError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.shape[-1:] != (self.n_levels,):
            raise SemanticIdError(f"code tuples must end in {self.n_levels}, got {codes.shape}")
        flat = codes.reshape(-1, self.n_levels)
        out_of_range = np.any((flat < 0) | (flat >= np.asarray(self.vocab)), axis=1)
        safe = np.where(out_of_range[:, None], 0, flat)
        key = _mixed_radix(safe, self.vocab)
        pos = np.minimum(np.searchsorted(self._keys, key), len(self._keys) - 1)
        found = (self._keys[pos] == key) & ~out_of_range
        return np.where(found, self._order[pos] + 1, 0).reshape(codes.shape[:-1])

    def trie(self) -> Trie:
        return Trie.build(self.codes[1:], self.vocab)

    # ---------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write `semantic_ids.npz` into `directory` atomically (a failure leaves the old file)."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / FILE_NAME
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".semantic_ids.", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format_version=np.int64(FORMAT_VERSION),
                    codes=self.codes,
                    vocab=np.asarray(self.vocab, np.int64),
                    dedup=np.bool_(self.dedup),
                    meta=np.asarray(json.dumps(self.meta, sort_keys=True)),
                )
            # mkstemp makes the file owner-only; a table is meant to be shared like any output.
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SemanticIds:
        """Read a table written by `save` (a directory or the .npz itself), checking it."""
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / FILE_NAME
        if not p.is_file():
            raise SemanticIdError(f"{p}: no semantic-id table (run `onerec tokenize` first)")
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # zip/format errors of a damaged file
            raise SemanticIdError(f"{p}: not a readable semantic-id table ({e})") from e
        missing = {"format_version", "codes", "vocab", "dedup", "meta"} - set(data)
        if missing:
            raise SemanticIdError(f"{p}: not a semantic-id table (missing {sorted(missing)})")
        fv = data["format_version"]
        if fv.shape != () or not np.issubdtype(fv.dtype, np.integer):
            raise SemanticIdError(f"{p}: format_version must be an integer scalar")
        version = int(fv)
        if version != FORMAT_VERSION:
            raise SemanticIdError(
                f"{p}: format version {version}; this onerec_jax reads version {FORMAT_VERSION}"
            )
        codes, vocab = data["codes"], data["vocab"]
        # Check before any cast: float codes would truncate and int64 ones could wrap silently.
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise SemanticIdError(f"{p}: codes must be a 2-D integer array, got {codes.dtype}")
        if vocab.ndim != 1 or not np.issubdtype(vocab.dtype, np.integer) or np.any(vocab < 1):
            raise SemanticIdError(f"{p}: vocab must be a 1-D array of positive integers")
        if np.any(codes > np.iinfo(np.int32).max) or np.any(codes < -1):
            raise SemanticIdError(f"{p}: codes out of range")
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as e:
            raise SemanticIdError(f"{p}: meta is not JSON ({e})") from e
        if not isinstance(meta, dict) or data["dedup"].shape != ():
            raise SemanticIdError(f"{p}: meta must be a JSON object and dedup a scalar")
        try:
            return cls(codes, tuple(vocab.tolist()), bool(data["dedup"]), meta)
        except SemanticIdError as e:
            raise SemanticIdError(f"{p}: {e}") from e

    def fingerprint(self) -> str:
        """sha256 of the code table and its vocabulary: two tables that assign any item other
        codes (a permutation of the same shape included) differ."""
        h = hashlib.sha256(repr(self.vocab).encode())
        h.update(np.ascontiguousarray(self.codes, np.int32).tobytes())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SemanticIds)
            and self.vocab == other.vocab
            and self.dedup == other.dedup
            and np.array_equal(self.codes, other.codes)
            and self.meta == other.meta
        )

    def __repr__(self) -> str:
        return f"SemanticIds(n_items={self.n_items}, vocab={self.vocab}, dedup={self.dedup})"


@flax.struct.dataclass
class Trie:
    """Prefix trie of a table as dense arrays; a pytree, so it can be closed over or passed
    into jitted functions (beam search). Node 0 at depth 0 is the root.

    starts[l]: int32 [n_nodes_l + 1], CSR offsets of node children into codes[l];
    codes[l]: int32 [n_nodes_{l+1}], the child codes, sorted within each parent; the child at
      position j is node j at depth l + 1;
    leaf_item: int32 [n_items], the item of each full-length node.
    """

    starts: tuple[jax.Array, ...]
    codes: tuple[jax.Array, ...]
    leaf_item: jax.Array
    vocab: tuple[int, ...] = flax.struct.field(pytree_node=False)
    fanout: tuple[int, ...] = flax.struct.field(pytree_node=False)

    @classmethod
    def build(cls, codes: np.ndarray, vocab: tuple[int, ...]) -> Trie:
        """Trie of unique tuples codes [n_items, L] (row i is item i + 1)."""
        codes = np.asarray(codes, np.int64)
        n, depth = codes.shape
        order = np.lexsort(codes.T[::-1])
        sc = codes[order]
        starts, child_codes, fanout = [], [], []
        # parent[i]: node id (at the current depth) of sorted row i's prefix; the root is 0.
        parent = np.zeros(n, np.int64)
        n_nodes = 1
        for level in range(depth):
            new = np.ones(n, bool)
            new[1:] = (parent[1:] != parent[:-1]) | (sc[1:, level] != sc[:-1, level])
            child = np.cumsum(new) - 1  # node id at depth level + 1, in sorted order
            first = np.flatnonzero(new)
            counts = np.bincount(parent[first], minlength=n_nodes)
            starts.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            child_codes.append(sc[first, level].astype(np.int32))
            fanout.append(int(counts.max()))
            parent, n_nodes = child, len(first)
        if n_nodes != n:
            raise SemanticIdError(f"{n - n_nodes} items share a full code tuple: de-duplicate")
        leaf_item = np.empty(n, np.int32)
        leaf_item[parent] = order + 1
        return cls(
            starts=tuple(jnp.asarray(s) for s in starts),
            codes=tuple(jnp.asarray(c) for c in child_codes),
            leaf_item=jnp.asarray(leaf_item),
            vocab=tuple(int(k) for k in vocab),
            fanout=tuple(fanout),
        )

    @property
    def depth(self) -> int:
        return len(self.vocab)

    def _window(self, level: int, nodes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Child codes [B, F], their validity and their positions, F = fan-out at `level`."""
        starts, codes = self.starts[level], self.codes[level]
        n_nodes = starts.shape[0] - 1
        live = (nodes >= 0) & (nodes < n_nodes)  # ids past the last node are dead, not clamped
        nodes = jnp.clip(nodes, 0, n_nodes - 1)
        lo = starts[nodes]
        count = jnp.where(live, starts[nodes + 1] - lo, 0)
        j = jnp.arange(self.fanout[level])
        pos = jnp.clip(lo[:, None] + j[None, :], 0, codes.shape[0] - 1)
        return codes[pos], j[None, :] < count[:, None], pos

    def valid_mask(self, level: int, nodes: jax.Array) -> jax.Array:
        """bool [B, vocab[level]]: the codes that extend each node (depth `level`) to a prefix
        of some item. Nodes < 0 (dead beams) get an all-False row."""
        nodes = jnp.asarray(nodes, jnp.int32)
        child, ok, _ = self._window(level, nodes)
        ok = ok & (nodes >= 0)[:, None]
        rows = jnp.broadcast_to(jnp.arange(nodes.shape[0])[:, None], child.shape)
        mask = jnp.zeros((nodes.shape[0], self.vocab[level]), bool)
        return mask.at[rows, child].max(ok)

    def step(self, level: int, nodes: jax.Array, codes: jax.Array) -> jax.Array:
        """Node ids [B] at depth level + 1 after appending `codes` [B]; -1 where the prefix is
        not in the trie (or the node was already -1)."""
        nodes = jnp.asarray(nodes, jnp.int32)
        child, ok, pos = self._window(level, nodes)
        hit = ok & (child == jnp.asarray(codes, jnp.int32)[:, None]) & (nodes >= 0)[:, None]
        found = jnp.any(hit, axis=1)
        return jnp.where(found, pos[jnp.arange(nodes.shape[0]), jnp.argmax(hit, axis=1)], -1)

    def walk(self, prefixes: jax.Array) -> jax.Array:
        """Node ids [B] of code prefixes [B, l] (l <= depth); -1 where not a prefix."""
        prefixes = jnp.asarray(prefixes, jnp.int32)
        nodes = jnp.zeros(prefixes.shape[0], jnp.int32)
        for level in range(prefixes.shape[1]):  # static depth (<= 4), not a loop over tokens
            nodes = self.step(level, nodes, prefixes[:, level])
        return nodes

    def item_of(self, leaves: jax.Array) -> jax.Array:
        """Item ids [B] of full-depth nodes; 0 (padding) where the node is -1."""
        leaves = jnp.asarray(leaves, jnp.int32)
        return jnp.where(leaves >= 0, self.leaf_item[jnp.clip(leaves, 0)], 0)
