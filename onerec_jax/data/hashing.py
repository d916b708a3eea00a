"""Counter-based randomness: a value is a pure function of its keys, so any index is reachable.

The session world needs "event k of session s of user u" to be the same number whichever example
asks for it, and cheap to compute for thousands of events at once. A stateful generator cannot give
that; hashing the keys with the splitmix64 finaliser can, vectorised over numpy uint64 arrays (their
multiplication wraps modulo 2**64, which is what the mixer relies on).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_LOW32 = np.uint64(0xFFFFFFFF)


_MASK = (1 << 64) - 1


def _mix_int(x: int) -> int:
    """mix64 on a Python int (exact modulo 2**64); scalars skip numpy's per-call overhead."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 with full avalanche."""
    x = np.asarray(x, np.uint64)
    if x.ndim == 0:
        return np.uint64(_mix_int(int(x)))
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def hash_u64(*keys: np.ndarray | int) -> np.ndarray:
    """Hash a tuple of integer keys (arrays broadcast) to uniform uint64 values.

    Scalar keys are folded in with Python ints; the first array key switches to numpy.
    """
    h: int | np.ndarray = 0x243F6A8885A308D3
    for k in keys:
        if isinstance(h, int) and np.ndim(k) == 0:
            h = _mix_int(h ^ _mix_int((int(k) + 0x9E3779B97F4A7C15) & _MASK))
            continue
        if np.ndim(k) == 0:
            kh = np.uint64(_mix_int((int(k) + 0x9E3779B97F4A7C15) & _MASK))
        else:
            k = np.asarray(k)
            kh = mix64((k.astype(np.uint64) if k.dtype != np.uint64 else k) + _GOLDEN)
        h = mix64((np.uint64(h) if isinstance(h, int) else h) ^ kh)
    return np.uint64(h) if isinstance(h, int) else h


def stream(h: np.ndarray, j: int) -> np.ndarray:
    """The j-th independent derived hash of `h` (cheaper than hashing the keys again)."""
    if np.ndim(h) == 0:
        return np.uint64(_mix_int(int(h) ^ ((j + 1) * 0x632BE59BD9B4E019 & _MASK)))
    return mix64(h ^ np.uint64((j + 1) * 0x632BE59BD9B4E019 % (1 << 64)))


def unit53(h: np.ndarray) -> np.ndarray:
    """float64 uniform in [0, 1) from the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def unit32_pair(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 uniforms in [0, 1) with 32 bits each, from one hash."""
    scale = 1.0 / (1 << 32)
    return (h & _LOW32).astype(np.float64) * scale, (h >> np.uint64(32)).astype(np.float64) * scale


def normal(h: np.ndarray) -> np.ndarray:
    """Standard normal by Box-Muller from the two 32-bit halves of `h`."""
    a, b = unit32_pair(h)
    return np.sqrt(-2.0 * np.log1p(-a)) * np.cos(2.0 * np.pi * b)


def permute(i: np.ndarray, n: int, *keys: int) -> np.ndarray:
    """A keyed bijection of [0, n): i -> pi(i), the same for the same keys.

    Why: a split of the world must enumerate its finite set of (user, session) requests without
    repeats (the first n draws are n distinct requests) while staying random-access. A 4-round
    Feistel network permutes the 2h-bit integers (4^h >= n); values that land outside [0, n) are
    walked through the network again ("cycle walking"), which keeps the map a bijection of
    [0, n). At most 3 in 4 values walk each round, so the loop ends after a handful of rounds.
    """
    if n < 1:
        raise ValueError(f"cannot permute an empty range (n = {n})")
    i = np.asarray(i, np.int64)
    if i.size and (i.min() < 0 or i.max() >= n):
        raise IndexError(f"permute: index out of [0, {n})")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    round_keys = [int(hash_u64(*keys, 0x5EED, r)) for r in range(4)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in round_keys:
            left, right = right, left ^ (mix64(right ^ np.uint64(k)) & mask)
        return (left << shift) | right

    x = feistel(i.astype(np.uint64))
    out = x >= np.uint64(n)
    while out.any():
        x[out] = feistel(x[out])
        out = x >= np.uint64(n)
    return x.astype(np.int64)
