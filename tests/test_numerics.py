"""Numerics of the train path: float32 logits in bf16 mode, the weight-decay mask, the
validation loss's standard error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import tiny_encoder

from onerec_jax.data import schema, sources
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Config
from onerec_jax.train import step as step_lib
from onerec_jax.train.validation import mean_and_stderr

SPEC = schema.SchemaSpec(pos_len=8, life_len=16)


@pytest.fixture(scope="module")
def batch():
    src = sources.open_source("world:tiny")
    b = schema.build_batch(src.raw_batch(np.arange(4), SPEC.history_window, SPEC), SPEC)
    items = b["target_item"]
    codes = np.stack([items % 8, items // 8 % 8, items // 64 % 8], -1).astype(np.int32)
    codes[items == 0] = -1
    out = {k: jnp.asarray(v) for k, v in b.items()}
    out["target_codes"] = jnp.asarray(codes)
    return src, out


def _models(src, dtype):
    enc = tiny_encoder(src, 8, 16)
    v1 = OneRecV1(V1Config(encoder=enc, vocab=(8, 8, 8), d_ff=64, dec_layers=1), dtype=dtype)
    v2 = OneRecV2(
        V2Config(context=enc, n_layers=1, d_model=32, n_heads=4, d_ff=64, vocab=(8, 8, 8)),
        dtype=dtype,
    )
    return {"v1": v1, "v2": v2}


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_bf16_models_give_float32_logits(batch, family):
    src, b = batch
    model = _models(src, jnp.bfloat16)[family]
    inputs = {k: v for k, v in b.items() if k not in ("user_id", "request_ts", "target_codes")}
    variables = jax.jit(model.init)(jax.random.key(0), inputs, b["target_codes"])
    mem, mask = model.apply(variables, inputs, method="encode")
    tokens = jnp.zeros((mask.shape[0] * 5, 3), jnp.int32)
    logits, _ = model.apply(variables, mem, mask, tokens, method="logits")
    assert logits.dtype == jnp.float32
    # bf16-rounded logits would all survive a round trip through bf16; float32 ones do not.
    rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
    assert float(jnp.mean(logits != rounded)) > 0.5


def test_weight_decay_skips_norms_embeddings_positions_and_biases(batch):
    src, b = batch
    model = _models(src, jnp.float32)["v1"]
    cfg = step_lib.OptimConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.5)
    tx, _ = step_lib.make_optimizer(cfg)
    state = step_lib.init_state(model, tx, b, jax.random.key(0))
    # Non-trivial norm scales, so a decay would show.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.5 if p[-1].key == "scale" else x, state.params
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt_state = tx.init(params)
    for _ in range(3):  # past the warmup, so the learning rate is not zero
        updates, opt_state = tx.update(zeros, opt_state, params)
        new = optax.apply_updates(params, updates)
    moved = jax.tree_util.tree_map_with_path(
        lambda p, a, c: (p[-1].key, bool(jnp.any(a != c))), params, new
    )
    seen = {}
    for name, changed in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)):
        seen.setdefault(name, set()).add(changed)
    for name in ("scale", "embedding", "dec_positions", "positions", "queries", "bias"):
        if name in seen:
            assert seen[name] == {False}, name
    assert {"scale", "embedding", "dec_positions", "kernel", "query"} <= set(seen)
    assert seen["kernel"] == {True} and seen["query"] == {True}
    with pytest.raises(ValueError, match="no weight-decay rule for 'mystery'"):
        step_lib.decay_mask({"block": {"mystery": jnp.ones(3)}})


def test_eval_loss_standard_error_is_the_ratio_estimators():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 6, 4000).astype(np.float64)
    sums = items * 5.0 + rng.normal(0, 1, 4000) * np.sqrt(items)
    mean, se = mean_and_stderr(sums, items)
    assert mean == pytest.approx(sums.sum() / items.sum())
    # Bootstrap over requests agrees with the delta-method error within 10 %.
    boots = []
    for _ in range(400):
        i = rng.integers(0, 4000, 4000)
        boots.append(sums[i].sum() / items[i].sum())
    assert se == pytest.approx(np.std(boots), rel=0.1)
    # Requests with no valid item carry no information; a lone request has no error bar.
    m1, s1 = mean_and_stderr(np.array([3.0, 0.0]), np.array([2.0, 0.0]))
    assert m1 == 1.5 and np.isnan(s1)


def test_eval_loss_of_a_capacity_moe_does_not_depend_on_batch_mates(batch):
    from onerec_jax.model.moe import MoEConfig

    src, b = batch
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=32, dispatch="capacity", capacity_factor=0.5)
    model = OneRecV1(
        V1Config(encoder=tiny_encoder(src, 8, 16), vocab=(8, 8, 8), d_ff=64, dec_layers=1, moe=moe)
    )
    tx, _ = step_lib.make_optimizer(step_lib.OptimConfig())
    state = step_lib.init_state(model, tx, b, jax.random.key(0))
    fn = jax.jit(lambda s, x: step_lib.eval_loss(s, x, model=model))
    together = fn(state, b)
    for i in range(2):
        alone = fn(state, jax.tree.map(lambda v, i=i: v[i : i + 1], b))
        np.testing.assert_allclose(alone["loss_sum"][0], together["loss_sum"][i], rtol=1e-5)
        assert alone["items"][0] == together["items"][i]


def _reference_attention(q, k, v, mask, r):
    """Plain softmax attention, differentiated by JAX: what the hand-written backward pass of
    `softmax_attention` must reproduce."""
    b, g, rl, hd = q.shape
    s = jnp.einsum("bgqk,bgsk->bgqs", q, k) / np.sqrt(hd)
    s = jnp.where(mask[:, None, None], s.reshape(b, g, r, rl // r, -1), -1e30)
    p = jax.nn.softmax(s, axis=-1) * jnp.any(mask, -1)[:, None, None, :, None]
    return jnp.einsum("bgqs,bgsk->bgqk", p.reshape(b, g, rl, -1), v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_attention_backward_equals_autodiff(dtype):
    from onerec_jax.model.softmax_attention import softmax_attention

    b, g, r, length, s, hd = 3, 2, 2, 5, 7, 8
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (b, g, r * length, hd))
    k = jax.random.normal(ks[1], (b, g, s, hd))
    v = jax.random.normal(ks[2], (b, g, s, hd))
    mask = jax.random.uniform(ks[3], (b, length, s)) > 0.4
    mask = mask.at[1, 2].set(False)  # a query with nothing to attend to: zeros, zero gradient
    do = jax.random.normal(ks[4], q.shape)
    want, vjp = jax.vjp(lambda *a: _reference_attention(*a, mask, r), q, k, v)
    want_grads = vjp(do)
    low = [x.astype(dtype) for x in (q, k, v)]
    got, vjp = jax.vjp(lambda *a: softmax_attention(*a, mask, r), *low)
    got_grads = vjp(do.astype(dtype))
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert got.dtype == dtype and all(x.dtype == dtype for x in got_grads)
    np.testing.assert_allclose(np.float32(got), want, atol=tol, rtol=tol)
    for x, y in zip(got_grads, want_grads, strict=True):
        scale = float(jnp.max(jnp.abs(y)))
        np.testing.assert_allclose(np.float32(x) / scale, y / scale, atol=tol)
    assert float(jnp.max(jnp.abs(got_grads[0][1, :, 2::length]))) == 0.0
