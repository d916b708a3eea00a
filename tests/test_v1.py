"""OneRec V1 model: shapes, causality, masking, sharding names, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import assert_padding_users_change_nothing, listed, param_listing, tiny_encoder

from onerec_jax import sharding
from onerec_jax.data import schema, sources
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.train.loss import loss_fn

SPEC = schema.SchemaSpec(pos_len=16, life_len=32)
VOCAB = (8, 8, 8, 3)


@pytest.fixture(scope="module")
def batch():
    src = sources.open_source("world:tiny")
    raw = src.raw_batch(np.arange(4), max_events=SPEC.history_window, spec=SPEC)
    b = schema.build_batch(raw, SPEC)
    enc = tiny_encoder(src, 16, 32, n_layers=2)
    codes = np.asarray(jax.random.randint(jax.random.key(7), (4, 5, 4), 0, 3))
    x = {k: jnp.asarray(v) for k, v in b.items() if k not in ("user_id", "request_ts")}
    return enc, x, jnp.asarray(codes)


def _model(enc, **kw):
    return OneRecV1(V1Config(encoder=enc, vocab=VOCAB, d_ff=64, **kw))


@pytest.fixture(scope="module")
def dense(batch):
    """The default dense model, initialised and compiled once for the tests that share it."""
    enc, x, codes = batch
    model = _model(enc)
    return model, jax.jit(model.init)(jax.random.key(0), x, codes), jax.jit(model.apply)


@pytest.mark.slow
@pytest.mark.parametrize("moe", [None, MoEConfig(n_experts=4, top_k=2, d_ff=32)])
def test_shapes_finite_with_and_without_jit(batch, moe):
    enc, x, codes = batch
    model = _model(enc, moe=moe)
    v = jax.jit(model.init)(jax.random.key(0), x, codes)
    nll, stats = model.apply(v, x, codes)  # op by op: slow to dispatch, so only here
    nll_j, _ = jax.jit(model.apply)(v, x, codes)
    assert nll.shape == (4, 5, 4) and bool(jnp.all(jnp.isfinite(nll)))
    np.testing.assert_allclose(np.asarray(nll), np.asarray(nll_j), rtol=1e-5, atol=1e-5)
    if moe is not None:
        assert stats["load"].shape == (2, 4)  # one row per decoder layer
        assert v["moe_bias"]["blocks"]["MoE_0"]["bias"].shape == (2, 4)


# Every variable of the MoE model below, captured before V1 and V2 shared one decoder block:
# checkpoints are keyed by these paths, so a change here breaks restoring old runs.
V1_VARIABLES = """
moe_bias/blocks/MoE_0/bias 2x4
params/blocks/MoE_0/router 2x32x4
params/blocks/MoE_0/w_down 2x4x32x32
params/blocks/MoE_0/w_gate 2x4x32x32
params/blocks/MoE_0/w_up 2x4x32x32
params/blocks/RMSNorm_0/scale 2x32
params/blocks/RMSNorm_1/scale 2x32
params/blocks/RMSNorm_2/scale 2x32
params/blocks/cross_attn/key 2x32x4x8
params/blocks/cross_attn/out 2x4x8x32
params/blocks/cross_attn/query 2x32x4x8
params/blocks/cross_attn/value 2x32x4x8
params/blocks/self_attn/key 2x32x4x8
params/blocks/self_attn/out 2x4x8x32
params/blocks/self_attn/query 2x32x4x8
params/blocks/self_attn/value 2x32x4x8
params/dec_positions 5x32
params/encoder/author_embed/embedding 129x64
params/encoder/dur_embed/embedding 32x32
params/encoder/encoder/block/Attention_0/key 2x32x4x8
params/encoder/encoder/block/Attention_0/out 2x4x8x32
params/encoder/encoder/block/Attention_0/query 2x32x4x8
params/encoder/encoder/block/Attention_0/value 2x32x4x8
params/encoder/encoder/block/RMSNorm_0/scale 2x32
params/encoder/encoder/block/RMSNorm_1/scale 2x32
params/encoder/encoder/block/SwiGLU_0/down/kernel 2x64x32
params/encoder/encoder/block/SwiGLU_0/gate/kernel 2x32x64
params/encoder/encoder/block/SwiGLU_0/up/kernel 2x32x64
params/encoder/final_norm/scale 32
params/encoder/flags_embed/embedding 256x32
params/encoder/item_embed/embedding 501x32
params/encoder/life_in/kernel 256x64
params/encoder/life_out/kernel 64x32
params/encoder/play_embed/embedding 32x32
params/encoder/pos_in/kernel 256x64
params/encoder/pos_out/kernel 64x32
params/encoder/positions 41x32
params/encoder/qformer0/Attention_0/key 32x4x8
params/encoder/qformer0/Attention_0/out 4x8x32
params/encoder/qformer0/Attention_0/query 32x4x8
params/encoder/qformer0/Attention_0/value 32x4x8
params/encoder/qformer0/RMSNorm_0/scale 32
params/encoder/qformer0/RMSNorm_1/scale 32
params/encoder/qformer0/SwiGLU_0/down/kernel 64x32
params/encoder/qformer0/SwiGLU_0/gate/kernel 32x64
params/encoder/qformer0/SwiGLU_0/up/kernel 32x64
params/encoder/queries 4x32
params/encoder/short_in/kernel 256x64
params/encoder/short_out/kernel 64x32
params/encoder/static0_embed/embedding 65536x32
params/encoder/static1_embed/embedding 1024x32
params/encoder/static2_embed/embedding 1024x32
params/encoder/static3_embed/embedding 1024x32
params/encoder/static4_embed/embedding 1024x32
params/encoder/static_in/kernel 160x32
params/encoder/static_out/kernel 32x32
params/encoder/tag_embed/embedding 33x32
params/encoder/tdelta_embed/embedding 32x32
params/final_norm/scale 32
params/head/kernel 32x28
params/tokens/embedding 28x32
"""


def test_variable_paths_and_shapes_are_the_checkpoint_layout(batch):
    enc, x, codes = batch
    model = _model(enc, moe=MoEConfig(n_experts=4, top_k=2, d_ff=32))
    assert param_listing(model, x, codes) == listed(V1_VARIABLES)


def test_every_parameter_has_a_logical_rule(batch):
    enc, x, codes = batch
    model = _model(enc, moe=MoEConfig(n_experts=4, top_k=2, d_ff=32))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x, codes)
    sharding.check_logical(boxed["params"])


@pytest.mark.parametrize("session_wise", [False, True])
def test_decoder_is_causal(batch, dense, session_wise):
    enc, x, codes = batch
    if session_wise:
        model = _model(enc, session_wise=True)
        v, apply = jax.jit(model.init)(jax.random.key(0), x, codes), jax.jit(model.apply)
    else:
        _, v, apply = dense
    base, _ = apply(v, x, codes)
    assert base.shape == (4, 5, 4) and bool(jnp.all(jnp.isfinite(base)))
    # Changing the last level of item 2 changes only what comes after it.
    changed = codes.at[:, 2, 3].set((codes[:, 2, 3] + 1) % 3)
    nll, _ = apply(v, x, changed)
    diff = np.abs(np.asarray(nll - base)) > 1e-6
    assert diff[:, 2, 3].all()
    assert not diff[:, :2].any() and not diff[:, 2, :3].any()
    # Point-wise items are independent sequences; session-wise later items see earlier ones.
    assert diff[:, 3:].any() == session_wise


def test_padded_history_events_are_ignored(batch, dense):
    _, x, codes = batch
    _, v, apply = dense
    # Training requests of the world mostly fill every pathway: pad the older half of the first
    # two users' events (pathways are newest first, padding last) so there is padding to test.
    x = dict(x)
    for p in ("short", "pos", "life"):
        m = x[f"{p}_mask"]
        older = jnp.arange(m.shape[1])[None, :] >= m.shape[1] // 2
        x[f"{p}_mask"] = m & ~(older & (jnp.arange(m.shape[0]) < 2)[:, None])
    base, _ = apply(v, x, codes)
    noisy = dict(x)
    for p in ("short", "pos", "life"):
        pad = ~x[f"{p}_mask"]
        assert bool(pad.any())
        noisy[f"{p}_item"] = jnp.where(pad, 17, x[f"{p}_item"])
        noisy[f"{p}_flags"] = jnp.where(pad, 3, x[f"{p}_flags"])
    nll, _ = apply(v, noisy, codes)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("session_wise", [False, True])
def test_padded_targets_take_no_moe_capacity_and_no_share_of_the_stats(batch, session_wise):
    """Padded target items (-1 code rows) do not route: users with no targets at all put in
    front of the batch (where capacity dispatch would serve them first) change neither a valid
    item's loss nor any MoE statistic."""
    enc, x, codes = batch
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=32, dispatch="capacity", capacity_factor=1.0)
    model = _model(enc, moe=moe, session_wise=session_wise)
    codes = codes.at[0, 2:].set(-1).at[2, 4:].set(-1)  # padded items among the real users too
    assert_padding_users_change_nothing(model, x, codes)


def test_loss_sum_and_mean_and_masking():
    nll = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
    valid = jnp.array([[True, False, True], [False, False, True]])
    loss, m = loss_fn(nll, valid, "sum")
    items = np.asarray(nll).sum(-1)[np.asarray(valid)]
    assert float(loss) == pytest.approx(items.mean())
    assert float(m["items"]) == 3
    loss_mean, _ = loss_fn(nll, valid, "mean")
    assert float(loss_mean) == pytest.approx(items.mean() / 4)


def test_learns_a_batch(batch, dense):
    _, x, codes = batch
    model, v, _ = dense
    params, rest = v["params"], {k: val for k, val in v.items() if k != "params"}
    opt = optax.adam(3e-3)
    state = opt.init(params)
    valid = jnp.ones((4, 5), bool)

    @jax.jit
    def step(params, state):
        def f(p):
            nll, _ = model.apply({"params": p, **rest}, x, codes)
            return loss_fn(nll, valid)[0]

        loss, g = jax.value_and_grad(f)(params)
        up, state = opt.update(g, state, params)
        return optax.apply_updates(params, up), state, loss

    losses = []
    for _ in range(40):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0]


def test_config_and_input_errors(batch):
    enc, x, codes = batch
    with pytest.raises(ValueError, match="loss"):
        V1Config(loss="max")
    model = _model(enc)
    with pytest.raises(ValueError, match="expected"):
        jax.eval_shape(model.init, jax.random.key(0), x, codes[:, :, :3])
