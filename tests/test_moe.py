"""Sparse MoE against a plain loop over experts; balancing; logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax import sharding
from onerec_jax.model import moe

D, F, E, K = 8, 16, 4, 2


def _setup(dispatch="dropless", cf=1.25, n_shared=0, b=3, length=7, seed=0, k=K):
    cfg = moe.MoEConfig(
        n_experts=E, top_k=k, d_ff=F, n_shared=n_shared, dispatch=dispatch, capacity_factor=cf
    )
    x = jax.random.normal(jax.random.key(seed), (b, length, D))
    variables = nn.unbox(moe.MoE(cfg).init(jax.random.key(seed + 1), x))
    return cfg, x, variables


def _loop_reference(cfg, x, variables, capacity=None):
    """Token by token, expert by expert, in NumPy float64: the definition of the layer."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    bias = np.asarray(variables["moe_bias"]["bias"], np.float64)
    xt = np.asarray(x, np.float64).reshape(-1, D)
    silu = lambda z: z / (1 + np.exp(-z))
    out = np.zeros_like(xt)
    used = np.zeros(E, int)
    dropped = 0
    for t in range(len(xt)):
        logits = xt[t] @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-(probs + bias), kind="stable")[: cfg.top_k]
        # k = 1: the raw probability (Switch); k > 1: renormalised over the chosen experts.
        gates = probs[chosen] / (probs[chosen].sum() if cfg.top_k > 1 else 1.0)
        for e, g in zip(chosen, gates, strict=True):
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            h = silu(xt[t] @ p["w_gate"][e]) * (xt[t] @ p["w_up"][e])
            out[t] += g * (h @ p["w_down"][e])
        if "shared" in p:
            s = p["shared"]
            out[t] += (silu(xt[t] @ s["gate"]["kernel"]) * (xt[t] @ s["up"]["kernel"])) @ s["down"][
                "kernel"
            ]
    return out.reshape(x.shape), dropped / (len(xt) * cfg.top_k)


@pytest.mark.parametrize("n_shared,k", [(0, K), (1, K), (0, 1)])
def test_dropless_matches_loop(n_shared, k):
    cfg, x, v = _setup(n_shared=n_shared, k=k)
    y, stats = jax.jit(moe.MoE(cfg).apply)(v, x)
    ref, _ = _loop_reference(cfg, x, v)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    assert float(stats["dropped"]) == 0.0
    np.testing.assert_allclose(float(jnp.sum(stats["load"])), 1.0, rtol=1e-6)


@pytest.mark.parametrize("cf", [0.5, 1.0, 8.0])
def test_capacity_matches_loop_with_drops(cf):
    cfg, x, v = _setup("capacity", cf)
    y, stats = moe.MoE(cfg).apply(v, x)
    capacity = int(np.ceil(cf * x.shape[0] * x.shape[1] * K / E))
    ref, dropped = _loop_reference(cfg, x, v, capacity)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(stats["dropped"]), dropped, atol=1e-7)
    if cf == 0.5:
        assert dropped > 0  # the case must really drop something
    if cf == 8.0:
        y_free, _ = moe.MoE(moe.MoEConfig(**{**cfg.__dict__, "dispatch": "dropless"})).apply(v, x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_free), rtol=1e-5, atol=1e-6)


def _scatter_with_padding(x_1xTxD, rows, length, seed):
    """The T tokens of x spread in order over [rows, length] with identical padding tokens
    before, between and after them (as padded target items are), and the token mask."""
    t = x_1xTxD.shape[1]
    rng = np.random.default_rng(seed)
    where = np.sort(rng.choice(np.arange(1, rows * length), t, replace=False))
    mask = np.zeros(rows * length, bool)
    mask[where] = True
    flat = jnp.full((rows * length, D), 0.5).at[where].set(x_1xTxD[0])
    return flat.reshape(rows, length, D), jnp.asarray(mask.reshape(rows, length))


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_padding_takes_no_slot_no_capacity_and_no_share_of_the_stats(dispatch):
    """Masked (padding) tokens: zero routed output, no capacity, left out of load, max_load,
    dropped and aux_loss; the valid tokens get exactly what they get without the padding."""
    cfg, x, v = _setup(dispatch, cf=1.0, b=1, length=12)
    layer = jax.jit(moe.MoE(cfg).apply)
    y_alone, alone = layer(v, x)
    x_pad, mask = _scatter_with_padding(x, 4, 10, seed=3)
    y_pad, padded = layer(v, x_pad, mask)
    np.testing.assert_allclose(np.asarray(y_pad)[np.asarray(mask)], y_alone[0], atol=1e-6)
    assert not np.asarray(y_pad)[~np.asarray(mask)].any()
    for name in ("load", "max_load", "dropped", "aux_loss"):
        np.testing.assert_allclose(padded[name], alone[name], rtol=1e-6, err_msg=name)
    if dispatch == "capacity":
        assert float(alone["dropped"]) > 0  # capacity really binds, and binds the same way
    # An all-true mask is the same as no mask.
    y_all, st_all = layer(v, x, jnp.ones(x.shape[:2], bool))
    np.testing.assert_array_equal(np.asarray(y_all), np.asarray(y_alone))
    np.testing.assert_array_equal(np.asarray(st_all["dropped"]), np.asarray(alone["dropped"]))


def test_dropless_override_runs_a_capacity_layer_without_drops():
    """Generation's override: the same parameters, routed dropless whatever the config says."""
    cfg, x, v = _setup("capacity", cf=0.5)
    y, stats = jax.jit(lambda v, x: moe.MoE(cfg).apply(v, x, dispatch="dropless"))(v, x)
    _, capped = moe.MoE(cfg).apply(v, x)
    ref, _ = _loop_reference(cfg, x, v)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    assert float(stats["dropped"]) == 0.0 and float(capped["dropped"]) > 0


@pytest.mark.parametrize("k", range(1, E + 1))
def test_router_gets_a_gradient_through_the_gates_for_every_top_k(k):
    """No aux loss here: the router's only gradient is through the gates. Renormalising one
    chosen gate makes it exactly 1 (no gradient), so k = 1 uses the raw probability."""
    cfg, x, v = _setup(k=k)
    target = jax.random.normal(jax.random.key(9), x.shape)

    def loss(router):
        params = {**v["params"], "router": router}
        y, _ = moe.MoE(cfg).apply({"params": params, "moe_bias": v["moe_bias"]}, x)
        return jnp.sum(y * target)

    g = jax.jit(jax.grad(loss))(v["params"]["router"])
    assert float(jnp.linalg.norm(g)) > 1e-2


def test_aux_loss_is_one_for_uniform_routing_and_grows_with_collapse():
    experts = jnp.array([[0, 1], [2, 3], [0, 2]])
    uniform = jnp.full((3, E), 1.0 / E)
    assert float(moe.aux_loss(experts, uniform)) == pytest.approx(1.0)
    collapsed = jnp.zeros((3, E)).at[:, 0].set(1.0)
    assert float(moe.aux_loss(jnp.zeros((3, 1), jnp.int32), collapsed)) == pytest.approx(E)


def test_loss_free_bias_balances_a_skewed_router():
    cfg, x, v = _setup(b=16, length=16)
    # Skew the router towards expert 0 (inputs with a positive mean, a router column that sums
    # them); the bias alone, no gradient, must undo it.
    x = x + 1.0
    v["params"]["router"] = v["params"]["router"].at[:, 0].add(0.5)
    layer = moe.MoE(cfg)
    apply = jax.jit(layer.apply)
    _, first = apply(v, x)
    bias = v["moe_bias"]["bias"]
    for _ in range(300):
        _, stats = apply({**v, "moe_bias": {"bias": bias}}, x)
        bias = moe.update_bias(bias, stats["load"], 0.003)
    _, last = apply({**v, "moe_bias": {"bias": bias}}, x)
    assert float(first["max_load"]) > 1.8
    assert float(last["max_load"]) < 1.15
    np.testing.assert_array_equal(
        np.sign(np.asarray(moe.update_bias(jnp.zeros(4), jnp.array([0.5, 0.25, 0.25, 0.0]), 1))),
        [-1, 0, 0, 1],
    )


def test_gradients_reach_router_and_experts_not_bias():
    cfg, x, v = _setup()

    def loss(params):
        y, stats = moe.MoE(cfg).apply({"params": params, "moe_bias": v["moe_bias"]}, x)
        return jnp.sum(y**2) + stats["aux_loss"]

    g = jax.grad(loss)(v["params"])
    for name in ("router", "w_gate", "w_up", "w_down"):
        assert np.isfinite(np.asarray(g[name])).all() and float(jnp.abs(g[name]).sum()) > 0


def test_bf16_compute_close_to_f32():
    cfg, x, v = _setup()
    y32, _ = moe.MoE(cfg).apply(v, x)
    y16, _ = moe.MoE(cfg, dtype=jnp.bfloat16).apply(v, x)
    assert y16.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), atol=0.05, rtol=0.05)


def test_every_parameter_has_a_sharding_rule():
    cfg = moe.MoEConfig(n_experts=E, top_k=K, d_ff=F, n_shared=1)
    boxed = jax.eval_shape(moe.MoE(cfg).init, jax.random.key(0), jnp.zeros((1, 2, D)))["params"]
    sharding.check_logical(boxed)
    mesh = sharding.make_mesh({"data": 1})
    specs = sharding.shardings(boxed, mesh)
    assert specs["w_gate"].spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
    bad = {"w": nn.LogicallyPartitioned(jnp.zeros(2), ("nonsense",))}
    with pytest.raises(ValueError, match="'nonsense' has no sharding rule"):
        sharding.check_logical(bad)
    with pytest.raises(ValueError, match="no logical axis names"):
        sharding.check_logical({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 1})


def test_config_errors():
    with pytest.raises(ValueError, match="top_k"):
        moe.MoEConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="dispatch"):
        moe.MoEConfig(dispatch="sparse")
