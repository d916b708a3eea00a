"""Balanced residual k-means (RQ-KMeans) in JAX: the OneRec tokenizer's quantiser.

Level l clusters the residuals left by levels < l with its own codebook of K codes, so an item's
semantic id is the tuple of its Q codes, coarse to fine.

Balance. Plain k-means on popularity-skewed embeddings leaves a few giant codes and many empty
ones (codebook collapse), which makes the first decoding step nearly uninformative. As in the
technical report's balanced k-means, every assignment step here gives each code exactly
n // K or n // K + 1 points: points are placed greedily, closest pairs first, into their nearest
code that still has room (`balanced_assign`), then each centroid moves to the mean of its points.
Utilisation is therefore 1.0 at every level by construction.

Cost. One Lloyd step is one [n, d] x [d, K] matmul with a top-t, then a few cheap sort rounds;
it runs on a sample of at most `train_per_code * K` points (as faiss does), and every point is
assigned once per level in chunks that bound memory. Mini-batch mode (`batch_size > 0`) replaces
the Lloyd steps by Sculley's running-mean updates over random batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

# Scores of one chunk are [chunk, K] floats; this many floats per chunk (64 MiB) bounds memory.
_CHUNK_FLOATS = 1 << 24


@dataclasses.dataclass(frozen=True)
class RQKMeansConfig:
    """How to fit the quantiser. Counts unless stated."""

    n_levels: int = 3
    n_codes: int = 256  # codes per level (K)
    n_iters: int = 12  # Lloyd steps per level (mini-batch mode: batches per level)
    balanced: bool = True  # equal-size codes (else plain nearest centroid)
    warm_iters: int = 0  # balanced: the first Lloyd steps assign to the nearest code (cheaper)
    candidates: int = 4  # codes per point the balanced assignment looks at before a refill
    train_per_code: int = 256  # Lloyd runs on at most this many sampled points per code
    init: str = "kmeans++"  # "kmeans++" | "random"
    init_per_code: int = 8  # k-means++ seeds from at most this many sampled points per code
    batch_size: int = 0  # > 0: mini-batch k-means with batches of this size
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("n_levels", "n_codes", "n_iters", "candidates", "train_per_code"):
            if getattr(self, f) < 1:
                raise ValueError(f"RQKMeansConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.init_per_code < 1 or self.batch_size < 0 or self.warm_iters < 0:
            raise ValueError(
                "RQKMeansConfig: init_per_code must be >= 1, batch_size and warm_iters >= 0"
            )
        if self.init not in ("kmeans++", "random"):
            raise ValueError(f"RQKMeansConfig.init must be kmeans++ or random, got {self.init!r}")


def _chunk_rows(n: int, k: int) -> int:
    return max(1, min(n, _CHUNK_FLOATS // k))


@functools.partial(jax.jit, static_argnames=("t", "chunk"))
def _candidates(
    x: jax.Array, c: jax.Array, closed: jax.Array, *, t: int, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """The t best open codes of each row of x and their scores -|x - c|^2, best first; closed
    codes score -inf. Computed in row chunks so memory stays bounded.

    The score must be the distance itself, not 2 x.c - |c|^2 (which ranks the same per row):
    `_rounds` compares scores across rows, and there |x|^2 would favour rows far from the origin.
    """
    n, d = x.shape
    n_chunks = -(-n // chunk)
    xp = jnp.pad(x, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, d)
    bias = jnp.where(closed, -jnp.inf, -jnp.sum(c * c, axis=1))

    def one(xb: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = 2.0 * jnp.dot(xb, c.T, preferred_element_type=jnp.float32) + bias[None, :]
        v, i = jax.lax.top_k(s, t)
        return i.astype(jnp.int32), v - jnp.sum(xb * xb, axis=1, keepdims=True)

    i, v = jax.lax.map(one, xp)
    return i.reshape(-1, t)[:n], v.reshape(-1, t)[:n]


@jax.jit
def _rounds(
    idx: jax.Array, score: jax.Array, a: jax.Array, remaining: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Greedy capacity-constrained assignment over candidate lists, in parallel rounds.

    Each round, every unassigned row proposes to its best candidate code that still has room;
    each code accepts the best-scoring proposals up to its remaining capacity, for good. A
    rejected row's candidate is then full, so it moves down its list: at most t rounds. Rows
    whose candidates are all full stay -1 for the caller to refill.
    """
    n = idx.shape[0]
    k = remaining.shape[0]
    rows = jnp.arange(n)

    def body(state: tuple) -> tuple:
        a, remaining, _ = state
        ok = (remaining[idx] > 0) & (a < 0)[:, None] & (score > -jnp.inf)
        has = jnp.any(ok, axis=1)
        first = jnp.argmax(ok, axis=1)
        code = jnp.where(has, idx[rows, first], k)
        s = score[rows, first]
        order = jnp.lexsort((-s, code))
        code_sorted = code[order]
        counts = jnp.bincount(code, length=k + 1)
        rank = jnp.arange(n) - (jnp.cumsum(counts) - counts)[code_sorted]
        room = jnp.concatenate([remaining, jnp.zeros(1, remaining.dtype)])
        accept = jnp.zeros(n, bool).at[order].set(rank < room[code_sorted])
        a = jnp.where(accept, code, a)
        taken = jnp.bincount(jnp.where(accept, code, k), length=k + 1)[:k]
        return a, remaining - taken, jnp.any(accept)

    a, remaining, _ = jax.lax.while_loop(lambda s: s[2], body, (a, remaining, jnp.array(True)))
    return a, remaining


def balanced_assign(x: jax.Array, c: jax.Array, *, t: int = 8) -> jax.Array:
    """Code [n] int32 of each row of x with every code holding n // K or n // K + 1 rows.

    Rows are placed greedily, best scores first, into their nearest code that still has room,
    looking first at their t nearest codes; rows left over (all t codes full) are looked at again
    against the codes with room, compacted to a power-of-two bucket so few shapes compile.
    """
    n, k = x.shape[0], c.shape[0]
    if n < k:
        raise ValueError(f"cannot balance {n} rows over {k} codes: need n >= K")
    if t < 1:
        raise ValueError(f"balanced_assign: t must be >= 1, got {t}")
    t = min(t, k)
    remaining = jnp.full(k, n // k, jnp.int32).at[: n % k].add(1)
    a = jnp.full(n, -1, jnp.int32)
    rows = np.arange(n)
    sub = x
    n_left = -1
    while True:
        idx, score = _candidates(sub, c, remaining == 0, t=t, chunk=_chunk_rows(len(sub), k))
        a_sub, remaining = _rounds(idx, score, a[rows], remaining)
        a = a.at[rows].set(a_sub)
        left = np.flatnonzero(np.asarray(a) < 0)
        if len(left) == 0:
            return a
        if len(left) == n_left:
            # Only non-finite scores are never accepted (a NaN row, or an overflow).
            raise ValueError(f"balanced_assign: {n_left} rows have no finite distance to any code")
        n_left = len(left)
        # Pad the leftover rows to a power of two with copies of a row that is already placed:
        # they propose nothing (a >= 0), so the padding cannot take capacity.
        size = 1 << int(len(left) - 1).bit_length()
        placed = int(np.flatnonzero(np.asarray(a) >= 0)[0])
        rows = np.concatenate([left, np.full(size - len(left), placed)])
        sub = x[rows]


def nearest(x: jax.Array, c: jax.Array) -> jax.Array:
    """Code [n] int32 of the nearest centroid of each row of x (no balance)."""
    k = c.shape[0]
    closed = jnp.zeros(k, bool)
    idx, _ = _candidates(jnp.asarray(x, jnp.float32), c, closed, t=1, chunk=_chunk_rows(len(x), k))
    return idx[:, 0]


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(1,))
def _update(x: jax.Array, c: jax.Array, a: jax.Array, *, k: int) -> jax.Array:
    counts = jnp.bincount(a, length=k)
    sums = jax.ops.segment_sum(x, a, num_segments=k)
    # An empty code (possible only without balance) keeps its centroid.
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(1, 2))
def _sculley(
    xb: jax.Array, c: jax.Array, seen: jax.Array, a: jax.Array, *, k: int
) -> tuple[jax.Array, jax.Array]:
    counts = jnp.bincount(a, length=k)
    sums = jax.ops.segment_sum(xb, a, num_segments=k)
    seen = seen + counts
    # Sculley's mini-batch update: each centre is the running mean of every point it was given.
    return c + (sums - counts[:, None] * c) / jnp.maximum(seen, 1)[:, None], seen


@functools.partial(jax.jit, static_argnames=("k",))
def _kmeans_pp(x: jax.Array, key: jax.Array, *, k: int) -> jax.Array:
    """k-means++ seeding: each next centre is drawn with probability proportional to D^2."""
    n = x.shape[0]
    key, k0 = jax.random.split(key)
    first = x[jax.random.randint(k0, (), 0, n)]
    c = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    d2 = jnp.sum((x - first[None, :]) ** 2, axis=1)

    def body(i: jax.Array, carry: tuple) -> tuple:
        c, d2, key = carry
        key, sub = jax.random.split(key)
        # All points may coincide with a centre already (duplicates): then draw uniformly.
        logits = jnp.where(jnp.sum(d2) > 0, jnp.log(jnp.maximum(d2, 1e-30)), 0.0)
        nxt = x[jax.random.categorical(sub, logits)]
        d2 = jnp.minimum(d2, jnp.sum((x - nxt[None, :]) ** 2, axis=1))
        return c.at[i].set(nxt), d2, key

    c, _, _ = jax.lax.fori_loop(1, k, body, (c, d2, key))
    return c


def _sample(x: jax.Array, m: int, key: jax.Array) -> jax.Array:
    """m distinct rows of x (all of x if m >= n), in row order for a cache-friendly gather."""
    n = x.shape[0]
    if m >= n:
        return x
    # NumPy draws m of n without replacement in milliseconds; jax.random.choice sorts n keys.
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    idx = np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    return x[jnp.asarray(idx)]


def _assign(x: jax.Array, c: jax.Array, cfg: RQKMeansConfig) -> jax.Array:
    return balanced_assign(x, c, t=cfg.candidates) if cfg.balanced else nearest(x, c)


def fit_level(
    x: jax.Array, k: int, key: jax.Array, cfg: RQKMeansConfig, bar: Any = None
) -> jax.Array:
    """Centroids [k, d] of one level fitted to the rows of x."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"cannot fit {k} codes to {n} points: lower n_codes to at most {n}")
    k_init, k_train, k_batches = jax.random.split(key, 3)
    if cfg.init == "kmeans++":
        c = _kmeans_pp(_sample(x, cfg.init_per_code * k, k_init), k_init, k=k)
    else:
        c = _sample(x, k, k_init)
    c = jnp.array(c, jnp.float32)  # a fresh buffer: the steps donate it
    if cfg.batch_size > 0:
        batch = max(cfg.batch_size, k)
        seen = jnp.zeros(k, jnp.float32)
        for key_i in jax.random.split(k_batches, cfg.n_iters):
            xb = x[jax.random.randint(key_i, (batch,), 0, n)]
            c, seen = _sculley(xb, c, seen, _assign(xb, c, cfg), k=k)
            if bar is not None:
                bar.update(1)
    else:
        xs = _sample(x, cfg.train_per_code * k, k_train)
        for i in range(cfg.n_iters):
            a = nearest(xs, c) if i < cfg.warm_iters else _assign(xs, c, cfg)
            c = _update(xs, c, a, k=k)
            if bar is not None:
                bar.update(1)
    return c


@dataclasses.dataclass
class RQKMeans:
    """A fitted quantiser: one codebook [K, d] per level."""

    codebooks: list[jax.Array]

    @property
    def n_levels(self) -> int:
        return len(self.codebooks)

    def encode(self, x: np.ndarray | jax.Array) -> np.ndarray:
        """Codes [n, Q] int32 of new rows by nearest centroid per level (a new item is not
        balanced against the catalogue; the fitted catalogue's codes come from `fit`)."""
        resid = jnp.asarray(x, jnp.float32)
        codes = []
        for c in self.codebooks:
            a = nearest(resid, c)
            resid = resid - c[a]
            codes.append(a)
        return np.asarray(jnp.stack(codes, axis=1))

    def decode(self, codes: np.ndarray | jax.Array) -> np.ndarray:
        """Reconstruction [n, d]: the sum of each level's chosen centroid."""
        codes = jnp.asarray(codes)
        out = sum(c[codes[:, i]] for i, c in enumerate(self.codebooks))
        return np.asarray(out)


def fit(
    x: np.ndarray | jax.Array, cfg: RQKMeansConfig, *, progress: bool = True
) -> tuple[RQKMeans, np.ndarray]:
    """Fit Q levels on x [n, d]; returns the quantiser and the codes [n, Q] of x (balanced)."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"RQ-KMeans needs a finite [n, d] matrix, got shape {x.shape}")
    keys = jax.random.split(jax.random.key(cfg.seed), cfg.n_levels)
    resid = x
    books, codes = [], []
    with tqdm(
        total=cfg.n_levels * cfg.n_iters, desc="rq-kmeans", disable=not progress, leave=False
    ) as bar:
        for level in range(cfg.n_levels):
            c = fit_level(resid, cfg.n_codes, keys[level], cfg, bar)
            a = _assign(resid, c, cfg)
            resid = resid - c[a]
            books.append(c)
            codes.append(a)
    return RQKMeans(books), np.asarray(jnp.stack(codes, axis=1))


def code_usage(codes: np.ndarray, n_codes: int) -> dict[str, list[float]]:
    """Per level: utilisation (share of codes used), perplexity, largest load / ideal load."""
    codes = np.asarray(codes)
    n = len(codes)
    out: dict[str, list[float]] = {"utilisation": [], "perplexity": [], "max_load": []}
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=n_codes).astype(np.float64)
        q = counts[counts > 0] / n
        out["utilisation"].append(float(np.count_nonzero(counts) / n_codes))
        out["perplexity"].append(float(math.exp(-np.sum(q * np.log(q)))))
        out["max_load"].append(float(counts.max() / (n / n_codes)))
    return out


def level_metrics(x: np.ndarray, codes: np.ndarray, codebooks: list[Any]) -> dict[str, list[float]]:
    """`code_usage` plus the relative squared reconstruction error sum |x - x_hat_l|^2 / sum |x|^2
    after levels 0..l (float64)."""
    x = np.asarray(x, np.float64)
    out = code_usage(codes, len(codebooks[0]))
    total = float(np.sum(x * x))
    recon = np.zeros_like(x)
    out["recon_error"] = []
    for level, book in enumerate(codebooks):
        recon += np.asarray(book, np.float64)[np.asarray(codes)[:, level]]
        err = float(np.sum((x - recon) ** 2))
        out["recon_error"].append(err / total if total > 0 else 0.0)
    return out
