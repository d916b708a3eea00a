"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/test_mesh.py): one
dropless MoE layer (8 experts, top 2, padded tokens) on {data 2, expert 2} and {data 4}
against the layer with no mesh; prints one JSON line per mesh: whether the program has an
all-to-all, the rows of its top-k, and the output, loss and gradient differences."""

import json
import re

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
(ref_loss, ref_y), ref_g = jax.jit(step)(params)  # no mesh: the single-device layer
for axes in ({"data": 2, "expert": 2}, {"data": 4}):
    with sharding.rules_on(sharding.make_mesh(axes)):
        lowered = jax.jit(step).lower(params)
        compiled = lowered.compile()
        (got_loss, got_y), got_g = compiled(params)
    leaves = zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g), strict=True)
    # Rows of each top-k the program runs: the router's top-k on each device's own 12 tokens,
    # not on all 48 gathered.
    topk = r"\(f32\[(\d+),2\]\{1,0\}, s32\[\d+,2\]\{1,0\}\) custom-call"
    top_k_rows = sorted({int(n) for n in re.findall(topk, compiled.as_text())})
    row = {
        "mesh": axes,
        "all_to_all": "all_to_all" in lowered.as_text(),
        "top_k_rows": top_k_rows,
        "per_device": "sdy.manual_computation" in lowered.as_text()
        or "shard_map" in lowered.as_text(),
        "loss_rel": float(abs(got_loss - ref_loss) / abs(ref_loss)),
        "y_max": float(jnp.max(jnp.abs(got_y - ref_y))),
        "grad_max": max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves),
        "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_g)),
    }
    print(json.dumps(row))
