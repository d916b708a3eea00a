"""Softmax attention over batched heads with a hand-written backward pass.

XLA's automatic backward pass of `softmax(q k^T) v` differentiates through the softmax's max,
exp, sum and division and fuses the score matmuls with that elementwise chain; on XLA:CPU the
result runs ~1.3x slower than the textbook backward pass written out (48.7 -> 39.6 ms per
layer at [256 x 4 heads, 64 x 64 scores, head width 32], fwd + bwd; benchmarks/peers.py's
train step). The textbook pass needs only the softmax output p and the attention output o:

    dv = p^T do,   dp = do v^T,   ds = p * (dp - rowsum(do * o)),   dq = ds k,   dk = ds^T q

(rowsum(do * o) = rowsum(p * dp), as o = p v), with the score scale applied to ds.
Matmuls run in the operands' dtype (bf16 stays bf16 both ways); the softmax runs in float32,
and ds is formed in float32 from the p and o the forward pass kept in the operands' dtype (in
bf16 its gradients are as close to float32 autodiff as XLA's own bf16 backward pass: 0.7 %
against 0.6 % relative error, measured at 8 x 64 requests, 4 heads, 64 keys, head width 32).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, r: int
) -> tuple[jax.Array, jax.Array]:
    b, g, rl, hd = q.shape
    s = jnp.einsum("bgqk,bgsk->bgqs", q, k)  # in the operands' dtype; softmax in float32
    s = s.astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
    s = s.reshape(b, g, r, rl // r, -1)
    if mask is not None:
        s = jnp.where(mask[:, None, None, :, :], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    if mask is not None:  # a query with nothing to attend to gets zeros, not a uniform average
        p = jnp.where(jnp.any(mask, axis=-1)[:, None, None, :, None], p, 0.0)
    p = p.reshape(b, g, rl, -1).astype(q.dtype)
    return jnp.einsum("bgqs,bgsk->bgqk", p, v), p


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, r: int
) -> jax.Array:
    """Attention of q [B, G, r * L, K] (the r query heads of a key/value group folded into
    the query axis) over k, v [B, G, S, K]; `mask` [B, L, S] or [B, 1, S] (True: may attend)
    or None. Returns [B, G, r * L, K] in the operands' dtype."""
    return _forward(q, k, v, mask, r)[0]


def _fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, r: int
) -> tuple[jax.Array, tuple]:
    o, p = _forward(q, k, v, mask, r)
    return o, (q, k, v, p, o)


def _bwd(r: int, res: tuple, do: jax.Array) -> tuple:
    del r
    q, k, v, p, o = res
    f32 = jnp.float32
    dv = jnp.einsum("bgqs,bgqk->bgsk", p, do)
    dp = jnp.einsum("bgqk,bgsk->bgqs", do, v).astype(f32)
    rows = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
    ds = (p.astype(f32) * (dp - rows) / jnp.sqrt(f32(q.shape[-1]))).astype(q.dtype)
    dq = jnp.einsum("bgqs,bgsk->bgqk", ds, k)
    dk = jnp.einsum("bgqs,bgqk->bgsk", ds, q)
    return dq, dk, dv, None  # the mask has no cotangent


softmax_attention.defvjp(_fwd, _bwd)
