"""bf16 compute whose backward pass stays bf16: the matmuls of the train step's gradient take
bf16 operands (a float32 operand would run at the TF32 rate on a GPU, half the bf16 one)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax import config
from onerec_jax.data.sources import open_source
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec, zero_batch
from onerec_jax.train.model_factory import build_model

DOTS = ("dot_general", "ragged_dot", "ragged_dot_general")


def _dots(jaxpr) -> list:
    """Every matmul equation of a jaxpr, those of its sub-jaxprs (scan, pjit, remat,
    shard_map, custom rules) included."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name in DOTS:
            out.append(e)
        for p in e.params.values():
            for sub in p if isinstance(p, list | tuple) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _dots(inner)
    return out


def _flops(e) -> float:
    x = e.invars[0].aval
    out = e.outvars[0].aval
    if e.primitive.name == "dot_general":
        (contract, _), _ = e.params["dimension_numbers"]
        k = int(np.prod([x.shape[i] for i in contract]))
    else:  # ragged_dot: x [M, K] against groups of w [G, K, N]
        k = x.shape[-1]
    return 2.0 * np.prod(out.shape) * k


@pytest.mark.parametrize(
    "rung,extra",
    [
        ("v1-0.07m", []),
        ("v2-0.09m", []),
        ("v2-0.09m", ["model.v2.moe.n_experts=4", "model.v2.moe.dispatch=capacity"]),
        ("v2-0.09m", ["model.v2.moe.n_experts=4", "model.v2.moe.dispatch=dropless"]),
    ],
)
def test_the_gradient_of_a_bf16_step_multiplies_bf16(rung, extra):
    cfg = config.resolve(
        config.load("scaling_micro"), [f"rung={rung}", "bf16=True", "batch_size=8", *extra]
    )
    model = build_model(cfg, open_source(cfg.source, seed=0, split="train"), (16, 16, 16))
    batch = {k: jnp.asarray(v) for k, v in zero_batch(schema_spec(cfg), 8, 3).items()}
    tx, _ = step_lib.make_optimizer(step_lib.OptimConfig())
    state = jax.eval_shape(lambda: step_lib.init_state(model, tx, batch, jax.random.key(0)))

    def grads(params):
        g = jax.grad(step_lib._micro_loss, has_aux=True)
        return g(params, state.moe_bias, model, batch, 0.0)

    dots = _dots(jax.make_jaxpr(grads)(state.params).jaxpr)
    f32 = jnp.dtype(jnp.float32)
    mixed = [e for e in dots if len({v.aval.dtype for v in e.invars[:2]}) > 1]
    assert not mixed, [str(e) for e in mixed[:2]]  # no bf16 x float32 (a float32 cotangent)
    total = sum(map(_flops, dots))
    in_f32 = sum(_flops(e) for e in dots if e.invars[0].aval.dtype == f32)
    # Only the MoE router multiplies in float32 (routing decisions at full precision): its
    # [T, D] x [D, E] matmuls are a sliver of the step's matmul FLOPs.
    assert in_f32 < 0.02 * total, (in_f32, total)
    assert len(dots) > 50  # the walk reached the layer stacks' bodies
