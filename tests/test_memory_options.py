"""Memory options of one device: rematerialisation of the scanned layer stacks (`remat`) and
AdamW moments stored in bf16 (`optim.moment_dtype`); and unrolled layer stacks
(`unroll_layers`), which trade compile time for step time and must compute the same thing.

Tolerances: rematerialisation recomputes the same float32 operations, but XLA may fuse the
recomputed forward pass differently, so losses agree to 1e-6 relative and gradients to 1e-5 of
the gradient's norm (a wrong or missing term would be of the order of the norm itself).
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onerec_jax import config, flops, sharding
from onerec_jax.configs import default
from onerec_jax.data import schema, sources
from onerec_jax.model.decoder_block import DecoderBlock, LayerInputs, Mode, SharedInputs
from onerec_jax.model.layers import layer_stack
from onerec_jax.train import state as state_lib
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.model_factory import build_model
from onerec_jax.train.run_config import check_workdir_config, load_run_config, upgrade_config

VOCAB = (8, 8, 8)
FAMILY = {
    "v1": ["model.family=v1"],  # an encoder stack and a decoder stack
    # two decoder stacks (one dense, one MoE), so the MoE's bias collection and stats pass
    # through the rematerialised block
    "v2": ["model.family=v2", "model.v2.moe.n_experts=4", "model.v2.first_dense=1"],
}


@pytest.fixture(scope="module")
def src():
    return sources.open_source("world:tiny", split="train")


def _cfg(*overrides: str):
    return config.resolve(default.get_config(), ["batch_size=8", *overrides])


def _batch(cfg, src) -> dict:
    spec = schema_spec(cfg)
    b = schema.build_batch(src.raw_batch(np.arange(8), spec.history_window, spec), spec)
    # A stand-in tokenizer: item i -> (i % 8, i // 8 % 8, i // 64 % 8); padding -> -1.
    items = b["target_item"]
    codes = np.stack([items % 8, items // 8 % 8, items // 64 % 8], -1).astype(np.int32)
    codes[items == 0] = -1
    b["target_codes"] = codes
    return jax.tree.map(jnp.asarray, b)


def _state(model, tx, batch) -> step_lib.TrainState:
    """A training state of random parameters (normal, std 0.1) and zero MoE biases: the
    model's `init` is traced for its shapes only, because compiling it costs more than every
    other step of these tests."""
    inputs = {k: v for k, v in batch.items() if k not in step_lib.NOT_MODEL_INPUTS}
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs, batch["target_codes"]))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes["params"]
    )
    moe_bias = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get("moe_bias", {}))
    return step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), moe_bias=moe_bias
    )


def _policies(model, params, moe_bias, batch) -> list[str]:
    """The checkpoint policies in the forward pass's jaxpr, one per rematerialised stack."""
    inputs = {k: v for k, v in batch.items() if k not in step_lib.NOT_MODEL_INPUTS}
    jaxpr = jax.make_jaxpr(model.apply)(
        {"params": params, "moe_bias": moe_bias}, inputs, batch["target_codes"]
    )
    return re.findall(r"policy=(?:<function )?(\w+)", str(jaxpr))


def test_remat_and_unrolling_give_the_same_gradients_through_a_decoder_stack():
    """The default suite's check of `layer_stack(remat=..., unroll=...)`, on a bare two-layer
    stack of V1-order decoder blocks (whose Python-valued `Mode` argument is static): "full"
    and "dots", and the unrolled stack, give the gradients of "none", and PREFILL (no
    gradient) the same outputs; the unrolled stack's scan really is unrolled."""
    n, t, b, s, d = 4, 4, 2, 6, 32
    kx, km, kw = jax.random.split(jax.random.key(0), 3)
    x_NxTxD = jax.random.normal(kx, (n, t, d))
    shared = SharedInputs(
        cross_mask=jnp.arange(s)[None, None, :] < jnp.asarray([4, 6])[:, None, None],
        memory=jax.random.normal(km, (b, s, d)),
        causal=jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (n, t, t)),
    )
    w_NxTxD = jax.random.normal(kw, (n, t, d))
    stacks = {
        remat: layer_stack(DecoderBlock, 2, (0, nn.broadcast, nn.broadcast), remat, (4,))(
            4, d, 64, "swiglu", None, lazy=False
        )
        for remat in ("none", "full", "dots")
    }
    stacks["unrolled"] = layer_stack(
        DecoderBlock, 2, (0, nn.broadcast, nn.broadcast), "none", (4,), unroll=True
    )(4, d, 64, "swiglu", None, lazy=False)
    init = jax.jit(stacks["none"].init, static_argnums=4)  # op by op, init takes seconds
    params = init(jax.random.key(1), x_NxTxD, LayerInputs(), shared, Mode.TRAIN)

    @jax.jit
    def grads_and_prefill(params, x):
        def loss(params, x, stack):
            y, _ = stack.apply(params, x, LayerInputs(), shared, Mode.TRAIN)
            return jnp.sum(y * w_NxTxD)

        out = {}
        for remat, stack in stacks.items():
            _, kv = stack.apply(params, x[:1, :1], LayerInputs(), shared, Mode.PREFILL)
            out[remat] = jax.grad(loss, argnums=(0, 1))(params, x, stack), kv.cross_kv
        return out

    def unroll_of(stack):
        jaxpr = jax.make_jaxpr(lambda x: stack.apply(params, x, LayerInputs(), shared, Mode.TRAIN))
        return re.findall(r"unroll=(\d+)", str(jaxpr(x_NxTxD)))

    assert unroll_of(stacks["none"]) == ["1"] and unroll_of(stacks["unrolled"]) == ["2"]
    out = grads_and_prefill(params, x_NxTxD)
    norm = float(optax.tree.norm(out["none"][0]))
    for remat in ("full", "dots", "unrolled"):
        diff = float(optax.tree.norm(jax.tree.map(jnp.subtract, out[remat][0], out["none"][0])))
        assert diff <= 1e-5 * norm, (remat, diff, norm)
        for a, b_ in zip(
            jax.tree.leaves(out[remat][1]), jax.tree.leaves(out["none"][1]), strict=True
        ):
            np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-6)


# Slow (10 to 17 s each on 2 cores, mostly one compile of three models' gradients): the
# default suite checks the stack above.
@pytest.mark.slow
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_remat_gives_the_same_loss_and_gradients(family, src):
    """`remat` "full" and "dots" change what the backward pass recomputes, not what it
    computes: the same parameters give the same loss and gradients as "none". The
    rematerialised models really are different programs (their jaxprs hold the checkpoint
    with its policy), and the parameter tree is the same, so a checkpoint restores under any
    policy."""
    models = {}
    for remat in ("none", "full", "dots"):
        cfg = _cfg(*FAMILY[family], f"remat={remat}")
        models[remat] = build_model(cfg, src, VOCAB)
    models["unrolled"] = build_model(_cfg(*FAMILY[family], "unroll_layers=True"), src, VOCAB)
    batch = _batch(cfg, src)
    tx, _ = step_lib.make_optimizer(step_lib.OptimConfig())
    state = _state(models["none"], tx, batch)

    stacks = 2  # V1: encoder + decoder; V2: dense + MoE decoder stacks
    assert _policies(models["none"], state.params, state.moe_bias, batch) == []
    full = _policies(models["full"], state.params, state.moe_bias, batch)
    dots = _policies(models["dots"], state.params, state.moe_bias, batch)
    assert full == ["nothing_saveable"] * stacks
    assert dots == ["DotsSaveable"] * stacks

    shapes = {r: flops.param_shapes(m) for r, m in models.items()}
    assert shapes["full"] == shapes["none"] == shapes["dots"] == shapes["unrolled"]

    @jax.jit
    def loss_and_grads(params):
        grad = jax.value_and_grad(step_lib._micro_loss, has_aux=True)
        return {r: grad(params, state.moe_bias, m, batch, 0.01) for r, m in models.items()}

    out = loss_and_grads(state.params)
    (loss0, _), g0 = out["none"]
    norm = float(optax.tree.norm(g0))
    assert np.isfinite(float(loss0)) and norm > 0
    for remat in ("full", "dots", "unrolled"):
        (loss, _), g = out[remat]
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, err_msg=remat)
        diff = float(optax.tree.norm(jax.tree.map(jnp.subtract, g, g0)))
        assert diff <= 1e-5 * norm, (remat, diff, norm)


def test_an_unknown_remat_policy_is_one_error_naming_the_field(src):
    with pytest.raises(ValueError, match=r"config field remat: .*'some'.*'none', 'full', 'dots'"):
        build_model(_cfg("remat=some"), src, VOCAB)
    with pytest.raises(ValueError, match=r"config field remat: .*'dot'"):
        layer_stack(object, 2, (), "dot")
    with pytest.raises(ValueError, match=r"optim\.moment_dtype: 'float16'"):
        step_lib.make_optimizer(step_lib.OptimConfig(moment_dtype="float16"))


def _moments(opt_state) -> list:
    """The scale_by_adam states in an optimizer state."""
    return [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]


def test_bf16_moments_round_only_what_is_stored():
    """The update is computed in float32 from float32 copies of the moments: the first step,
    which reads zero moments, equals the float32 optimizer's exactly; only what is stored is
    rounded, so the stored moments equal the float32 ones rounded to bf16."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "dense": {"kernel": jax.random.normal(k1, (16, 8))},
        "norm": {"scale": jnp.ones((8,))},
    }
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params) for k in (k2, k3)]
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx, _ = step_lib.make_optimizer(
            step_lib.OptimConfig(learning_rate=0.1, warmup_steps=0, moment_dtype=dtype)
        )
        s = tx.init(params)
        u1, s = tx.update(grads[0], s, params)
        out[dtype] = (u1, s)
    (u32, s32), (u16, s16) = out["float32"], out["bfloat16"]
    assert jax.tree.structure(s16) == jax.tree.structure(s32)  # checkpoints key on this tree
    for a, b in zip(jax.tree.leaves(u16), jax.tree.leaves(u32), strict=True):
        np.testing.assert_array_equal(a, b)
    (m32,), (m16,) = _moments(s32), _moments(s16)
    for mom in ("mu", "nu"):
        for a, b in zip(
            jax.tree.leaves(getattr(m16, mom)), jax.tree.leaves(getattr(m32, mom)), strict=True
        ):
            assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32
            np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))


def test_bf16_moments_fit_a_least_squares_problem():
    """A few AdamW steps with bf16 moments on a small least-squares fit: the loss stays finite
    and falls at every step, the parameters stay float32, the moments bf16."""
    kx, kw = jax.random.split(jax.random.key(0))
    x_NxK = jax.random.normal(kx, (64, 16))
    y_NxO = x_NxK @ jax.random.normal(kw, (16, 4))
    tx, _ = step_lib.make_optimizer(
        step_lib.OptimConfig(
            learning_rate=0.05, warmup_steps=1, total_steps=40, moment_dtype="bfloat16"
        )
    )

    def loss(params):
        return jnp.mean((x_NxK @ params["dense"]["kernel"] - y_NxO) ** 2)

    def step(carry, _):
        params, opt_state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    params = {"dense": {"kernel": jnp.zeros((16, 4))}}
    (params, opt_state), losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=40))(
        (params, tx.init(params))
    )
    losses = np.asarray(losses)
    # Step 0 runs at learning rate 0 (the warmup starts there); from step 1 on it falls.
    assert np.all(np.isfinite(losses)) and np.all(np.diff(losses[1:]) < 0), losses
    assert losses[-1] < 0.2 * losses[0], losses
    assert params["dense"]["kernel"].dtype == jnp.float32
    (moments,) = _moments(opt_state)
    assert {x.dtype for x in jax.tree.leaves((moments.mu, moments.nu))} == {jnp.dtype(jnp.bfloat16)}


def _bf16_v1(src):
    cfg = _cfg(
        "optim.moment_dtype=bfloat16",
        "optim.learning_rate=0.01",
        "optim.warmup_steps=1",
        "steps=100",
    )
    model = build_model(cfg, src, VOCAB)
    ocfg, tx, schedule = state_lib.optimizer(cfg)
    assert ocfg.moment_dtype == "bfloat16"
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    # The layout `sharded_state` initialises into (optax.tree_map_params over the state).
    _, _, abstract, shardings = state_lib.state_layout(cfg, model, tx, len(VOCAB), mesh)
    return cfg, model, (ocfg, tx, schedule), mesh, abstract, shardings


def test_bf16_moments_shard_like_their_parameters(src):
    """The state layout of a tiny V1 with bf16 moments (nothing compiled): each moment tree
    has its parameters' structure, bf16 leaves and its parameters' shardings."""
    *_, abstract, shardings = _bf16_v1(src)
    (moments,), (moment_shardings,) = _moments(abstract.opt_state), _moments(shardings.opt_state)
    assert {x.dtype for x in jax.tree.leaves(abstract.params)} == {jnp.dtype(jnp.float32)}
    for mom in ("mu", "nu"):
        tree = getattr(moments, mom)
        assert jax.tree.structure(tree) == jax.tree.structure(abstract.params)
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
        assert getattr(moment_shardings, mom) == shardings.params


# Slow (about 10 s on 2 cores, mostly the train step's compile); the default suite trains the
# least-squares fit above.
@pytest.mark.slow
def test_bf16_moments_train_a_tiny_v1_on_a_mesh(src):
    """A tiny V1 laid out by `state_layout` trains a few steps with bf16 moments through the
    jitted, sharded train step: finite, falling loss; float32 parameters, bf16 moments."""
    cfg, model, (ocfg, tx, schedule), mesh, _, shardings = _bf16_v1(src)
    batch = _batch(cfg, src)
    state = jax.device_put(_state(model, tx, batch), shardings)
    fn = step_lib.jit_train_step(model, tx, schedule, ocfg, mesh, shardings)
    put = sharding.batch_sharding(mesh)
    batch = jax.tree.map(lambda x: jax.device_put(x, put), batch)
    losses = []
    for i in range(8):
        state, m = fn(state, batch, jax.random.key(i))
        losses.append(float(m["train/loss"]))
    # Step 0 runs at learning rate 0 (the warmup starts there); from step 1 on it falls.
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.95 * losses[0], losses
    assert np.all(np.diff(losses[1:]) < 0), losses
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    (moments,) = _moments(state.opt_state)
    assert {x.dtype for x in jax.tree.leaves((moments.mu, moments.nu))} == {jnp.dtype(jnp.bfloat16)}


def test_plan_takes_the_memory_options():
    """`onerec plan` parses --remat and --moment-dtype (defaults: today's behaviour)."""
    from onerec_jax.cli import build_parser

    args = build_parser().parse_args(
        ["plan", "--rung", "v2-1b", "--compile", "--remat", "dots", "--moment-dtype", "bfloat16"]
    )
    assert (args.remat, args.moment_dtype) == ("dots", "bfloat16")
    args = build_parser().parse_args(["plan", "--rung", "v2-1b", "--compile"])
    assert (args.remat, args.moment_dtype) == ("none", "float32")


def test_run_configs_without_the_memory_fields_load_and_resume(tmp_path):
    """A config.json written before `remat` and `optim.moment_dtype` existed reads with their
    old behaviour; a resumed run may change `remat` (memory only) but not the moment dtype
    (it changes the results)."""
    today = config.resolve(default.get_config())
    saved = today.to_dict()
    del saved["remat"], saved["optim"]["moment_dtype"]
    up = upgrade_config(saved)
    assert up.remat == "none" and up.optim.moment_dtype == "float32"
    assert config.flatten(up.to_dict()) == config.flatten(today.to_dict())

    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # a run that saved a checkpoint
    assert load_run_config(tmp_path).remat == "none"
    check_workdir_config(config.resolve(default.get_config(), ["remat=full"]), tmp_path)
    assert load_run_config(tmp_path).remat == "full"
    bf16 = config.resolve(default.get_config(), ["optim.moment_dtype=bfloat16"])
    with pytest.raises(ValueError, match=r"optim\.moment_dtype"):
        check_workdir_config(bf16, tmp_path)


# Slow (three compiles of a rung's whole train step, about 25 s on 2 cores).
@pytest.mark.slow
def test_plan_compiles_with_the_memory_options():
    """`compile_plan` (what `onerec plan --compile --remat R --moment-dtype M` runs) compiles
    the options into the step: bf16 moments take 4 of the 12 bytes per parameter off the
    arguments (params and two moments, float32), and rematerialisation shrinks the
    temporaries."""
    from scaling.compile_plan import compile_plan

    rows = {
        (r, m): compile_plan("v1-cpu-s", {}, 8, remat=r, moment_dtype=m)
        for r, m in (("none", "float32"), ("none", "bfloat16"), ("full", "float32"))
    }
    base = rows["none", "float32"]
    saved = (
        base["per_device_arguments_bytes"] - rows["none", "bfloat16"]["per_device_arguments_bytes"]
    )
    assert saved == 4 * base["params_total"]
    assert rows["full", "float32"]["per_device_temp_bytes"] < base["per_device_temp_bytes"]
    assert rows["full", "float32"]["remat"] == "full"
    assert rows["none", "bfloat16"]["moment_dtype"] == "bfloat16"


def test_bf16_moments_refuse_a_b2_whose_steps_would_round_away():
    with pytest.raises(ValueError, match=r"bfloat16 moments need optim.b2 <= 0.98 \(got 0.999\)"):
        step_lib.make_optimizer(step_lib.OptimConfig(moment_dtype="bfloat16", b2=0.999))
    step_lib.make_optimizer(step_lib.OptimConfig(moment_dtype="float32", b2=0.999))
