"""OneRec-V2 lazy decoder: cached generation, grouped K/V sets, MoE stacks, training."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import assert_padding_users_change_nothing, listed, param_listing, tiny_encoder

from onerec_jax import sharding
from onerec_jax.data import schema, sources
from onerec_jax.generate import beam_search
from onerec_jax.model import decoder_block
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Cache, V2Config
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import step as step_lib

SPEC = schema.SchemaSpec(pos_len=8, life_len=16)
VOCAB = (5, 4, 3)


@pytest.fixture(scope="module")
def data():
    src = sources.open_source("world:tiny")
    b = schema.build_batch(src.raw_batch(np.arange(3), SPEC.history_window, SPEC), SPEC)
    inputs = {k: jnp.asarray(v) for k, v in b.items() if k not in ("user_id", "request_ts")}
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, k, 30) for k in VOCAB], 1)
    table = SemanticIds.from_codes(codes, VOCAB)
    return src, inputs, table


def _cfg(src, table, **kw):
    base = dict(
        context=tiny_encoder(src, 8, 16, d_model=16),  # context narrower than the decoder
        n_layers=3,
        d_model=32,
        n_heads=4,
        d_ff=64,
        vocab=table.vocab,
        max_targets=2,
    )
    return V2Config(**{**base, **kw})


LAZY = {
    "default": {},
    "grouped_sets": {"l_kv": 2, "s_kv": 2, "g_kv": 2},
    "moe": {"moe": MoEConfig(n_experts=4, top_k=2, d_ff=32, n_shared=1), "first_dense": 1},
}


@pytest.mark.parametrize(
    "case", [pytest.param("default", marks=pytest.mark.slow), "grouped_sets", "moe"]
)
def test_cached_step_equals_full_logits_and_layers_read_their_set(data, case):
    src, inputs, table = data
    cfg = _cfg(src, table, **LAZY[case])
    model = OneRecV2(cfg)
    q = table.n_levels
    codes = jnp.asarray(table.codes[1:7].reshape(3, 2, q))
    variables = jax.jit(model.init)(jax.random.key(1), inputs, codes)
    ids = (codes + jnp.asarray(cfg.offsets)[None, None, :]).reshape(6, q)
    inp = jnp.concatenate([jnp.full((6, 1), cfg.n_tokens - 1, jnp.int32), ids[:, :-1]], axis=1)

    @jax.jit
    def both(variables):
        ctx, mask = model.apply(variables, inputs, method="encode")
        full, _ = model.apply(variables, ctx, mask, inp, method="logits")
        cache = model.apply(variables, ctx, mask, 6, method="init_cache")
        assert isinstance(cache, V2Cache)
        assert (cache.moe_kv is None) == (cfg.moe is None)

        def one(cache, p):
            lg, cache = model.apply(variables, cache, inp[:, p], p, method="step")
            return cache, lg

        _, steps = jax.lax.scan(one, cache, jnp.arange(q))
        return ctx, full, jnp.swapaxes(steps, 0, 1)

    ctx, full, steps = both(variables)
    np.testing.assert_allclose(np.asarray(steps), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert ctx.shape == (cfg.l_kv, 3, 1 + 20 + 8 + 4, cfg.s_kv, cfg.kv_heads, 8)
    # Each set is RMS-normalised per head: mean square ms / (ms + eps) <= 1 (scale starts at 1),
    # where the raw projections' mean squares are ~1e-3.
    ms = np.mean(np.asarray(ctx) ** 2, axis=-1)
    assert (ms > 0.95).all() and (ms <= 1.0 + 1e-5).all()
    assert [cfg.kv_set(i) for i in range(3)] == ([0, 0, 1] if cfg.l_kv == 2 else [0, 0, 0])
    params = variables["params"]
    # No K/V projection in the decoder's cross-attention: the context supplies them.
    for stack in ("dense", "moe"):
        if stack in params:
            assert set(params[stack]["cross_attn"]) == {"query", "out"}
    assert ("moe" in params) == (cfg.moe is not None)


# Every variable of the grouped-set MoE model below, captured before V1 and V2 shared one decoder
# block: checkpoints are keyed by these paths, so a change here breaks restoring old runs.
V2_VARIABLES = """
moe_bias/moe/MoE_0/bias 2x4
params/context/author_embed/embedding 129x64
params/context/dur_embed/embedding 32x32
params/context/flags_embed/embedding 256x32
params/context/item_embed/embedding 501x16
params/context/life_in/kernel 240x32
params/context/life_out/kernel 32x16
params/context/play_embed/embedding 32x32
params/context/pos_in/kernel 240x32
params/context/pos_out/kernel 32x16
params/context/positions 33x16
params/context/qformer0/Attention_0/key 16x4x4
params/context/qformer0/Attention_0/out 4x4x16
params/context/qformer0/Attention_0/query 16x4x4
params/context/qformer0/Attention_0/value 16x4x4
params/context/qformer0/RMSNorm_0/scale 16
params/context/qformer0/RMSNorm_1/scale 16
params/context/qformer0/SwiGLU_0/down/kernel 64x16
params/context/qformer0/SwiGLU_0/gate/kernel 16x64
params/context/qformer0/SwiGLU_0/up/kernel 16x64
params/context/queries 4x16
params/context/short_in/kernel 240x32
params/context/short_out/kernel 32x16
params/context/static0_embed/embedding 65536x32
params/context/static1_embed/embedding 1024x32
params/context/static2_embed/embedding 1024x32
params/context/static3_embed/embedding 1024x32
params/context/static4_embed/embedding 1024x32
params/context/static_in/kernel 160x16
params/context/static_out/kernel 16x16
params/context/tag_embed/embedding 33x32
params/context/tdelta_embed/embedding 32x32
params/dec_positions 5x32
params/dense/RMSNorm_0/scale 1x32
params/dense/RMSNorm_1/scale 1x32
params/dense/RMSNorm_2/scale 1x32
params/dense/SwiGLU_0/down/kernel 1x64x32
params/dense/SwiGLU_0/gate/kernel 1x32x64
params/dense/SwiGLU_0/up/kernel 1x32x64
params/dense/cross_attn/out 1x4x8x32
params/dense/cross_attn/query 1x32x4x8
params/dense/self_attn/key 1x32x4x8
params/dense/self_attn/out 1x4x8x32
params/dense/self_attn/query 1x32x4x8
params/dense/self_attn/value 1x32x4x8
params/final_norm/scale 32
params/head/kernel 32x15
params/kv/kernel 16x64
params/kv_norm/scale 8
params/moe/MoE_0/router 2x32x4
params/moe/MoE_0/shared/down/kernel 2x32x32
params/moe/MoE_0/shared/gate/kernel 2x32x32
params/moe/MoE_0/shared/up/kernel 2x32x32
params/moe/MoE_0/w_down 2x4x32x32
params/moe/MoE_0/w_gate 2x4x32x32
params/moe/MoE_0/w_up 2x4x32x32
params/moe/RMSNorm_0/scale 2x32
params/moe/RMSNorm_1/scale 2x32
params/moe/RMSNorm_2/scale 2x32
params/moe/cross_attn/out 2x4x8x32
params/moe/cross_attn/query 2x32x4x8
params/moe/self_attn/key 2x32x4x8
params/moe/self_attn/out 2x4x8x32
params/moe/self_attn/query 2x32x4x8
params/moe/self_attn/value 2x32x4x8
params/tokens/embedding 15x32
"""


def test_variable_paths_and_shapes_are_the_checkpoint_layout(data):
    src, inputs, table = data
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=32, n_shared=1)
    kw = dict(moe=moe, first_dense=1, l_kv=2, s_kv=2, g_kv=2, vocab=(5, 4, 3, 2))
    model = OneRecV2(_cfg(src, table, **kw))
    codes = jnp.zeros((3, 2, 4), jnp.int32)
    assert param_listing(model, inputs, codes) == listed(V2_VARIABLES)


def test_v1_and_v2_run_the_same_decoder_block(data):
    """One block class serves both families (in their own orders), and the layer-scan helper
    is the only place the model code scans layers."""
    src, inputs, table = data
    v1 = OneRecV1(V1Config(encoder=tiny_encoder(src, 8, 16), vocab=table.vocab, max_targets=2))
    v2 = OneRecV2(_cfg(src, table, moe=MoEConfig(n_experts=4, d_ff=32), first_dense=1))
    codes = jnp.zeros((3, 2, table.n_levels), jnp.int32)
    for model in (v1, v2):
        ran = set()

        def spy(next_fun, args, kwargs, context, ran=ran):
            ran.add(type(context.module))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(spy):
            jax.eval_shape(model.init, jax.random.key(0), inputs, codes)
        assert decoder_block.DecoderBlock in ran
        # No block of its own: the only module class of the model's file that runs is the model.
        assert {c for c in ran if c.__module__ == type(model).__module__} == {type(model)}
    model_dir = pathlib.Path(decoder_block.__file__).parent
    scans = sorted(p.name for p in model_dir.glob("*.py") if "nn.scan(" in p.read_text())
    assert scans == ["layers.py"]


def test_every_parameter_has_a_logical_rule(data):
    src, inputs, table = data
    cfg = _cfg(src, table, **LAZY["moe"])
    model = OneRecV2(cfg)
    codes = jnp.zeros((3, 2, table.n_levels), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), inputs, codes)
    sharding.check_logical(boxed["params"])


def test_beam_search_finds_the_exact_top_items(data):
    src, inputs, table = data
    model = OneRecV2(_cfg(src, table, l_kv=3, g_kv=2, max_targets=1))
    dummy = jnp.zeros((3, 1, table.n_levels), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), inputs, dummy)
    all_codes = jnp.asarray(table.codes[1:])[:, None, :]
    n = table.n_items
    rows = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), inputs)
    nll, _ = jax.jit(model.apply)(variables, rows, jnp.tile(all_codes, (3, 1, 1)))
    exact = -np.asarray(nll).sum(axis=(1, 2)).reshape(3, n)
    out = beam_search(model, variables, inputs, table.trie(), 64)
    items, logp = np.asarray(out["items"]), np.asarray(out["logprob"])
    for u in range(3):
        assert sorted(items[u][:n].tolist()) == list(range(1, n + 1))
        np.testing.assert_allclose(logp[u][:n], exact[u][items[u][:n] - 1], rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(logp[u][:n]) <= 1e-6)


def test_train_step_learns_a_batch_with_moe(data):
    src, inputs, table = data
    cfg = _cfg(src, table, **LAZY["moe"])
    model = OneRecV2(cfg)
    batch = dict(inputs)
    batch["target_item"] = jnp.asarray(np.arange(1, 7).reshape(3, 2))
    batch["target_mask"] = jnp.ones((3, 2), bool)
    batch["target_codes"] = jnp.asarray(table.codes[1:7].reshape(3, 2, table.n_levels))
    ocfg = step_lib.OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=40)
    tx, schedule = step_lib.make_optimizer(ocfg)
    state = step_lib.init_state(model, tx, batch, jax.random.key(0))
    fn = step_lib.jit_train_step(model, tx, schedule, ocfg)
    losses = []
    for i in range(30):
        state, m = fn(state, batch, jax.random.key(i))
        losses.append(float(m["train/loss"]))
    assert losses[-1] < 0.3 * losses[0]
    assert "moe/max_load" in m and np.isfinite(float(m["moe/max_load"]))


def test_padded_targets_take_no_moe_capacity_and_no_share_of_the_stats(data):
    """As V1's test: users with only padded targets in front of the batch change no valid
    item's loss and no MoE statistic under capacity dispatch."""
    src, inputs, table = data
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=32, dispatch="capacity", capacity_factor=1.0)
    model = OneRecV2(_cfg(src, table, moe=moe))
    codes = jnp.asarray(table.codes[1:7].reshape(3, 2, table.n_levels)).at[1, 1].set(-1)
    assert_padding_users_change_nothing(model, inputs, codes)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"g_kv": 3}, "g_kv 3 must divide"),
        ({"s_kv": 3}, "s_kv must be 1 or 2"),
        ({"l_kv": 4}, "l_kv <= n_layers"),
        ({"moe": MoEConfig(n_experts=2, top_k=1), "first_dense": 5}, "first_dense 5"),
    ],
)
def test_bad_configs_fail_clearly(data, kw, match):
    src, _, table = data
    with pytest.raises(ValueError, match=match):
        _cfg(src, table, **kw)
