"""Small building blocks shared by V1 and V2, every parameter named with logical axes.

Parameters are float32; `dtype` is the compute dtype (bf16 on accelerators). Matmuls take
and give `dtype` (the hardware accumulates in float32 inside them), so the backward pass stays
in bf16; softmax, normalisation, activations of the experts and the loss run in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from onerec_jax.model.softmax_attention import softmax_attention

# Fan-in scaled normal, the usual transformer init; one definition so every layer agrees.
dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


@jax.custom_vjp
def _dot_f32_out(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w of low-precision operands, the float32 accumulator kept as the output (logits);
    the backward pass runs in the operands' dtype (below)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _dot_f32_out_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return _dot_f32_out(x, w), (x, w)


def _dot_f32_out_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The float32 cotangent is rounded to the operands' dtype first: without this the two
    # backward matmuls would take a float32 operand (TF32 on a GPU, half the bf16 rate).
    x, w = res
    g = g.astype(x.dtype)
    return jnp.dot(g, w.T), jnp.dot(x.T, g)


_dot_f32_out.defvjp(_dot_f32_out_fwd, _dot_f32_out_bwd)


def matmul(
    x: jax.Array, w: jax.Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """x [..., K] @ w [K, N] in `dtype`. In bf16 the output is bf16 (the hardware accumulates
    in float32 inside the matmul), so the cotangents of the backward pass are bf16 and its
    matmuls run at the bf16 rate; `out_dtype=float32` (the output head) keeps the float32
    accumulator as the output, with a backward pass still in bf16 (`_dot_f32_out`).

    The leading axes are flattened first: XLA:CPU runs the backward pass of a 2-D dot ~1.7x
    faster than that of the same contraction written over [B, L, K] (the weight gradient then
    contracts one axis, not two; measured at 64 x 117 x 128 -> 512).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
    low = jnp.dtype(dtype) != jnp.float32
    if low and out_dtype is not None and jnp.dtype(out_dtype) == jnp.float32:
        y = _dot_f32_out(x2, w.astype(dtype))
    else:
        y = jnp.dot(x2, w.astype(dtype))
    return y.reshape(*lead, w.shape[-1])


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), x.shape[-1:]
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.reshape((1,) * (y.ndim - 1) + (-1,))).astype(self.dtype)


class Dense(nn.Module):
    """x @ W (+ b) over the last axis, with logical names for W's (in, out) axes."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    # Output dtype (default: `dtype`). The output head sets float32: the matmul accumulates in
    # float32 anyway, and rounding logits to bf16 before a softmax or a beam's top-k loses ties.
    out_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(dense_init, self.axes),
            (x.shape[-1], self.features),
        )
        y = matmul(x, w, self.dtype, self.out_dtype)
        if self.use_bias:
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                (self.features,),
            )
            y = y + b.reshape((1,) * (y.ndim - 1) + (-1,))
        return y.astype(self.out_dtype or self.dtype)


def grouped_swiglu(
    x_RxD: jax.Array, ids_R: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Row r through the SwiGLU expert ids_R[r] of the stacked weights [E, ...], all experts in
    one grouped matmul (`jax.lax.ragged_dot` over the rows sorted by expert), float32 out.
    Rows with an id >= E sort last, outside every group: their output is not defined (zero on
    XLA:CPU) and the caller masks it."""
    order = jnp.argsort(ids_R, stable=True)
    sizes = jnp.bincount(ids_R, length=w_gate.shape[0]).astype(jnp.int32)  # ids >= E dropped
    x = x_RxD[order]
    f32 = jnp.float32
    # Matmuls in the operands' dtype (a bf16 backward pass), the activation in float32.
    g = jax.lax.ragged_dot(x, w_gate, sizes).astype(f32)
    u = jax.lax.ragged_dot(x, w_up, sizes).astype(f32)
    h = (jax.nn.silu(g) * u).astype(x_RxD.dtype)
    y = jax.lax.ragged_dot(h, w_down, sizes).astype(f32)
    return jnp.zeros_like(y).at[order].set(y)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down: D -> F -> D."""

    d_ff: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        g = Dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
        u = Dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
        return Dense(d, ("mlp", "embed"), dtype=self.dtype, name="down")(jax.nn.silu(g) * u)


class Mlp(nn.Module):
    """gelu(x W_up) W_down: D -> F -> D, the plain transformer FFN (two matrices, not three)."""

    d_ff: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        u = Dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
        return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="down")(jax.nn.gelu(u))


FFN_KINDS = ("swiglu", "mlp")


def ffn(kind: str, d_ff: int, dtype: jnp.dtype, name: str | None = None) -> nn.Module:
    """The dense FFN of a block: "swiglu" (3 matrices) or "mlp" (2 matrices, GELU)."""
    if kind == "swiglu":
        return SwiGLU(d_ff, dtype=dtype, name=name)
    if kind == "mlp":
        return Mlp(d_ff, dtype=dtype, name=name)
    raise ValueError(f"unknown ffn kind {kind!r}; expected one of {FFN_KINDS}")


def ffn_matrices(kind: str) -> int:
    """Weight matrices of one dense FFN (its params are this * D * F)."""
    return {"swiglu": 3, "mlp": 2}[kind]


def attend(
    q_BxLxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    mask: jax.Array | None,
    dtype: jnp.dtype,
) -> jax.Array:
    """Softmax attention of H query heads over G <= H key/value heads (grouped-query when
    G < H: head h reads group h // (H / G)). `mask` [B, L, S] or [B, 1, S] is True where a query
    may attend; scores and softmax are float32; a query with nothing to attend to gets zeros.
    Returns [B, L, H, K]."""
    return attend_heads_major(
        q_BxLxHxK, jnp.swapaxes(k_BxSxGxK, 1, 2), jnp.swapaxes(v_BxSxGxK, 1, 2), mask, dtype
    )


def attend_heads_major(
    q_BxLxHxK: jax.Array,
    k_BxGxSxK: jax.Array,
    v_BxGxSxK: jax.Array,
    mask: jax.Array | None,
    dtype: jnp.dtype,
) -> jax.Array:
    """`attend` of keys/values laid out heads-major, [B, G, S, K], as a decoding cache keeps
    them: nothing of the cache is transposed per step."""
    b, length, h, hd = q_BxLxHxK.shape
    g = k_BxGxSxK.shape[1]
    if h % g:
        raise ValueError(f"{h} query heads cannot share {g} key/value groups")
    r = h // g
    # Heads-major operands with the r heads of a group folded into the query axis:
    # [B, G, r * L, K] against [B, G, S, K]. Batch axes lead, so XLA:CPU runs plain batched
    # matmuls (3.5x faster forward than contracting [B, L, H, K] in place, measured at B 64,
    # L 117, 4 x 32 heads), and grouped K/V are never repeated per head.
    q = q_BxLxHxK.astype(dtype).reshape(b, length, g, r, hd).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b, g, r * length, hd)
    k, v = k_BxGxSxK.astype(dtype), v_BxGxSxK.astype(dtype)
    o = softmax_attention(q, k, v, mask, r)
    return o.reshape(b, g, r, length, hd).transpose(0, 3, 1, 2, 4).reshape(b, length, h, hd)


class Attention(nn.Module):
    """Multi-head attention of queries x [B, Lq, D] over a memory [B, Lk, D].

    `mask` [B, Lq, Lk] (or [B, 1, Lk]) is True where a query may attend (see `attend`).
    `project_kv` gives the memory's keys/values [B, Lk, H, K]; passing them back as `kv` skips
    the projection, which is how generation computes cross-attention K/V once per user and how
    a KV cache is fed. `kv_proj=False` builds no key/value weights: K/V always come from outside
    (OneRec-V2's lazy cross-attention), possibly with fewer heads (grouped-query).
    """

    n_heads: int
    d_model: int
    dtype: jnp.dtype = jnp.float32
    kv_proj: bool = True

    def setup(self) -> None:
        d, h = self.d_model, self.n_heads
        if d % h:
            raise ValueError(f"model width {d} is not divisible by {h} heads")
        hd = d // h

        def w(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
            return self.param(name, nn.with_logical_partitioning(dense_init, axes), shape)

        self.w_query = w("query", (d, h, hd), ("embed", "heads", "kv"))
        if self.kv_proj:
            self.w_key = w("key", (d, h, hd), ("embed", "heads", "kv"))
            self.w_value = w("value", (d, h, hd), ("embed", "heads", "kv"))
        self.w_out = w("out", (h, hd, d), ("heads", "kv", "embed"))

    def _proj(self, x: jax.Array, w: jax.Array) -> jax.Array:
        d, h, k = w.shape
        y = matmul(x, w.reshape(d, h * k), self.dtype)
        return y.reshape(*x.shape[:-1], h, k).astype(self.dtype)

    def project_kv(self, mem_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._proj(mem_BxSxD, self.w_key), self._proj(mem_BxSxD, self.w_value)

    def project_qkv(self, x_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values [B, L, H, K] of the same input in one matmul against the
        three weights side by side: one [D, 3 H K] product instead of three [D, H K] ones
        (a decoding step's self-attention; 2,048 beams x width 128: 15 -> 10 ms per V2 step)."""
        d, h, k = self.w_query.shape
        w = jnp.concatenate(
            [m.reshape(d, h * k) for m in (self.w_query, self.w_key, self.w_value)], axis=1
        )
        y = matmul(x_BxLxD, w, self.dtype).reshape(*x_BxLxD.shape[:-1], 3, h, k)
        return y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]

    def __call__(
        self,
        x_BxQxD: jax.Array,
        kv: jax.Array | tuple[jax.Array, jax.Array],
        mask: jax.Array | None,
    ) -> jax.Array:
        q = self._proj(x_BxQxD, self.w_query)
        k, v = kv if isinstance(kv, tuple) else self.project_kv(kv)
        return self.out(attend(q, k, v, mask, self.dtype))

    def out(self, o: jax.Array) -> jax.Array:
        """The output projection of attended values [..., H, K] -> [..., D]."""
        h, hd, d = self.w_out.shape
        y = matmul(o.reshape(*o.shape[:-2], h * hd), self.w_out.reshape(h * hd, d), self.dtype)
        return y.astype(self.dtype)


# Activation rematerialisation of a scanned stack (the config's `remat`): what the forward pass
# of one layer keeps for the backward pass. The scan always keeps each layer's input (its
# carry); inside a layer:
#   none  everything (no recomputation);
#   full  nothing: the backward pass runs the layer's forward again;
#   dots  the outputs of matmuls without batch dimensions, i.e. the weight matmuls, which
#         `matmul` writes as 2-D dots. Attention's score and value einsums carry batch
#         dimensions (`attend`), so the [B, H, L, S] scores and probabilities, the largest
#         activations for long contexts and cheap to recompute, are not kept. (`checkpoint_dots`
#         would keep those too.)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(remat: str) -> None:
    """Raise one ValueError naming the config field when `remat` is not a policy."""
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"config field remat: unknown rematerialisation policy {remat!r}; "
            f"expected one of {tuple(REMAT_POLICIES)}"
        )


def layer_stack(
    block: type[nn.Module],
    n_layers: int,
    in_axes: tuple,
    remat: str = "none",
    static_argnums: tuple[int, ...] = (),
    unroll: bool = False,
) -> type[nn.Module]:
    """`block` scanned over `n_layers` layers: one compiled body whatever the depth, every
    parameter (and MoE bias) stacked on a leading axis named "layers" for sharding, each layer
    initialised from its own key. `block.__call__(carry, *args)` must return (carry, y); the
    y are stacked over layers. `in_axes` says, per argument after the carry, `0` (sliced per
    layer) or `nn.broadcast` (the same for every layer; closed over, so it may hold Python
    values). The one place the model code calls `nn.scan`.

    `remat` (REMAT_POLICIES) checkpoints each layer; the parameters keep their names and
    shapes, so a checkpoint restores whatever the policy. A rematerialised block's Python-valued
    arguments (a `Mode`) must be named in `static_argnums`, positions in `block.__call__`
    counting `self` as 0 (flax's convention).

    `unroll` compiles one copy of the layer per layer (the scan's body unrolled `n_layers`
    times; parameters, their names and checkpoints are the same). A rolled scan keeps each
    activation the backward pass needs in one buffer stacked over layers, which XLA fills
    with zeros and copies every step (on 2 CPU cores a V1 step at the TIGER shape of
    benchmarks/peers.py took 1.97 s rolled, 1.54 s unrolled); unrolled, each layer's
    activations are plain buffers.
    The price is compile time growing with depth, so it is off by default."""
    check_remat(remat)
    if remat != "none":
        # Inside a rolled scan the recomputation cannot be merged with the forward pass, and
        # the CSE barrier only costs (flax's `checkpoint` docstring); unrolled, the layers are
        # straight-line code in which XLA could merge them and undo the rematerialisation.
        block = nn.remat(
            block,
            prevent_cse=unroll,
            policy=REMAT_POLICIES[remat],
            static_argnums=static_argnums,
        )
    return nn.scan(
        block,
        variable_axes={"params": 0, "moe_bias": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=n_layers,
        unroll=n_layers if unroll else 1,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
