"""The pure train step: learning, gradient accumulation equivalence, MoE bias, donation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import tiny_encoder

from onerec_jax.data import schema, sources
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.train import step as step_lib

SPEC = schema.SchemaSpec(pos_len=8, life_len=16)


@pytest.fixture(scope="module")
def setup():
    src = sources.open_source("world:tiny")
    raw = src.raw_batch(np.arange(8), max_events=SPEC.history_window, spec=SPEC)
    b = schema.build_batch(raw, SPEC)
    # A stand-in tokenizer: item i -> (i % 8, i // 8 % 8, i // 64 % 8); padding -> -1.
    items = b["target_item"]
    codes = np.stack([items % 8, items // 8 % 8, items // 64 % 8], -1).astype(np.int32)
    codes[items == 0] = -1
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    batch["target_codes"] = jnp.asarray(codes)
    assert not bool(batch["target_mask"].all())  # some padded targets, so weighting matters
    enc = tiny_encoder(src, 8, 16)
    return enc, batch


_COMPILED: dict = {}


def _run(enc, batch, steps, moe=None, **opt):
    """Train `steps` steps from the same init; compiled steps are cached per configuration."""
    key = (moe, tuple(sorted(opt.items())))
    if key not in _COMPILED:
        model = OneRecV1(V1Config(encoder=enc, vocab=(8, 8, 8), d_ff=64, dec_layers=1, moe=moe))
        cfg = step_lib.OptimConfig(learning_rate=3e-3, warmup_steps=1, total_steps=100, **opt)
        tx, schedule = step_lib.make_optimizer(cfg)
        _COMPILED[key] = (model, tx, step_lib.jit_train_step(model, tx, schedule, cfg))
    model, tx, fn = _COMPILED[key]
    state = step_lib.init_state(model, tx, batch, jax.random.key(0))
    history = []
    for i in range(steps):
        state, m = fn(state, batch, jax.random.key(i))
        history.append({k: np.asarray(v) for k, v in m.items()})
    return state, history


def test_loss_falls_and_metrics_are_named(setup):
    enc, batch = setup
    _, hist = _run(enc, batch, 25)
    assert hist[-1]["train/loss"] < 0.5 * hist[0]["train/loss"]
    assert {"train/loss", "train/grad_norm", "train/lr", "train/items"} <= set(hist[0])
    assert float(hist[0]["train/items"]) == float(np.asarray(batch["target_mask"]).sum())


def test_grad_accumulation_equals_full_batch(setup):
    enc, batch = setup
    # Micro-batches hold different numbers of valid targets, so only item-weighted accumulation
    # reproduces the full-batch gradient. (Parameters are not compared element-wise: Adam's
    # first step is ~lr * sign(g), which float noise flips where g is ~0.)
    _, h1 = _run(enc, batch, 3)
    _, h2 = _run(enc, batch, 3, grad_accum=4)
    for a, b in zip(h1, h2, strict=True):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(a["train/grad_norm"], b["train/grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("balance", ["loss_free", pytest.param("none", marks=pytest.mark.slow)])
def test_moe_bias_moves_only_when_loss_free(setup, balance):
    enc, batch = setup
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=32, balance=balance, bias_rate=0.01)
    state, hist = _run(enc, batch, 2, moe=moe)
    bias = np.asarray(jax.tree.leaves(state.moe_bias)[0])
    assert bias.shape == (1, 4)
    assert (np.abs(bias).sum() > 0) == (balance == "loss_free")
    assert "moe/max_load" in hist[0] and 1.0 <= float(hist[0]["moe/max_load"]) <= 2.0


def test_moe_stats_and_bias_see_valid_tokens_only_across_micro_batches(setup):
    """Users with only padded targets neither route nor count: with them as a whole micro-batch
    of their own, the step's MoE load, drop rate and bias update equal one full batch's."""
    enc, batch = setup
    pad = np.arange(8) >= 4
    padded = dict(batch)
    padded["target_mask"] = jnp.where(pad[:, None], False, batch["target_mask"])
    padded["target_codes"] = jnp.where(pad[:, None, None], -1, batch["target_codes"])
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=32, dispatch="capacity", capacity_factor=1.0)
    s1, h1 = _run(enc, padded, 1, moe=moe)
    s2, h2 = _run(enc, padded, 1, moe=moe, grad_accum=2)
    for name in ("moe/max_load", "moe/dropped", "moe/aux_loss"):
        np.testing.assert_allclose(h2[0][name], h1[0][name], rtol=1e-5, err_msg=name)
    assert float(h1[0]["moe/dropped"]) > 0
    np.testing.assert_array_equal(*(np.asarray(jax.tree.leaves(s.moe_bias)[0]) for s in (s1, s2)))


def test_state_is_donated(setup):
    enc, batch = setup
    model, tx, fn = _COMPILED.get((None, ())) or (None, None, None)
    if fn is None:
        _run(enc, batch, 1)
        model, tx, fn = _COMPILED[(None, ())]
    state = step_lib.init_state(model, tx, batch, jax.random.key(0))
    new, _ = fn(state, batch, jax.random.key(1))
    assert jax.tree.leaves(state.params)[0].is_deleted()
    assert int(new.step) == 1
    _, schedule = step_lib.make_optimizer(step_lib.OptimConfig())
    bad = step_lib.jit_train_step(model, tx, schedule, step_lib.OptimConfig(grad_accum=3))
    with pytest.raises(ValueError, match="divisible"):
        bad(new, batch, jax.random.key(2))


def test_bf16_compute_keeps_f32_params_and_tracks_f32(setup):
    """bf16 compute: parameters and optimizer state stay float32, and the loss and gradient
    of the same parameters agree with float32 compute to bf16 precision."""
    enc, batch = setup
    cfg = V1Config(encoder=enc, vocab=(8, 8, 8), d_ff=64, dec_layers=1)
    m32, m16 = OneRecV1(cfg), OneRecV1(cfg, dtype=jnp.bfloat16)
    tx, _ = step_lib.make_optimizer(step_lib.OptimConfig())
    state = step_lib.init_state(m32, tx, batch, jax.random.key(0))

    @jax.jit
    def loss_and_grad(params):
        def f(model):
            g = jax.grad(step_lib._micro_loss, has_aux=True)
            grads, aux = g(params, state.moe_bias, model, batch, 0.0)
            return aux["loss"], grads

        return f(m32), f(m16)

    (l32, g32), (l16, g16) = loss_and_grad(state.params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))
    assert abs(float(l16) - float(l32)) < 0.02 * float(l32)
    n32 = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g32)))
    pairs = zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True)
    diff = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in pairs))
    assert float(diff) < 0.05 * float(n32)
