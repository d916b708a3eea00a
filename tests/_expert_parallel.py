"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/test_mesh.py): one
dropless MoE layer (8 experts, top 2, padded tokens) on {data 2, expert 2} and on one device;
prints one JSON line: whether the sharded program has an all-to-all, and the output, loss and
gradient differences."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from onerec_jax import sharding
from onerec_jax.model.moe import MoE, MoEConfig

jax.config.update("jax_numpy_rank_promotion", "raise")
layer = MoE(MoEConfig(n_experts=8, top_k=2, d_ff=16, dispatch="dropless"))
x = jax.random.normal(jax.random.key(0), (8, 6, 12))
mask = jnp.ones((8, 6), bool).at[:2, 3:].set(False)
variables = layer.init(jax.random.key(1), x, mask)
params = nn.unbox(variables["params"])


def loss(params):
    y, stats = layer.apply({"params": params, "moe_bias": variables["moe_bias"]}, x, mask)
    return jnp.sum(y**2) + stats["aux_loss"], y


step = jax.value_and_grad(loss, has_aux=True)
(ref_loss, ref_y), ref_g = jax.jit(step)(params)
with sharding.rules_on(sharding.make_mesh({"data": 2, "expert": 2})):
    lowered = jax.jit(step).lower(params)
    (got_loss, got_y), got_g = lowered.compile()(params)
diff = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g), strict=True)
]
print(
    json.dumps(
        {
            "all_to_all": "all_to_all" in lowered.as_text(),
            "loss_rel": float(abs(got_loss - ref_loss) / abs(ref_loss)),
            "y_max": float(jnp.max(jnp.abs(got_y - ref_y))),
            "grad_max": max(diff),
            "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_g)),
        }
    )
)
