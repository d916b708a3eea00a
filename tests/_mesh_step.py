"""Run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_mesh.py):
the loss and gradients of small V1-MoE and V2-MoE models (capacity dispatch, padded targets),
initialised already sharded, on meshes given as arguments (`data=2,fsdp=2,tensor=2` ...) and
on one device; prints one JSON line per (family, mesh) with the loss, the gradient error
relative to one device's gradient norm, whether the initial parameters equal one device's, and
the share of parameter elements that are really split."""

import json
import sys

import jax
import numpy as np

from onerec_jax import config, sharding
from onerec_jax.configs import default
from onerec_jax.data import schema, sources
from onerec_jax.train import state as state_lib
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.model_factory import build_model

FAMILY = {
    "v1": ["model.v1.moe.n_experts=4", "model.v1.moe.top_k=2"],
    "v2": ["rung=v2-cpu-s", "model.v2.moe.n_experts=4", "model.v2.first_dense=1"],
}
# Dropless dispatch: on an `expert` mesh, tokens go to the expert shards by all-to-all
# (onerec_jax/model/expert_parallel.py).
FAMILY["v1-dropless"] = [*FAMILY["v1"], "model.v1.moe.dispatch=dropless"]
FAMILY["v2-dropless"] = [*FAMILY["v2"], "model.v2.moe.dispatch=dropless"]


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    families = sys.argv[1].split(",")  # v1,v2
    meshes = [{k: int(v) for k, v in (kv.split("=") for kv in a.split(","))} for a in sys.argv[2:]]
    src = sources.open_source("world:tiny", split="train")
    for family in families:
        extra = FAMILY[family]
        cfg = config.resolve(default.get_config(), ["batch_size=16", *extra])
        spec = schema_spec(cfg)
        raw = src.raw_batch(np.arange(16), spec.history_window, spec)
        b = schema.build_batch(raw, spec)
        items = b["target_item"]
        codes = np.stack([items % 16, items // 16 % 16, items // 256 % 16], -1).astype(np.int32)
        codes[items == 0] = -1
        b["target_codes"] = codes
        model = build_model(cfg, src, (16, 16, 16))
        _, tx, _ = state_lib.optimizer(cfg)
        ref = None
        for axes in [{"data": 1}, *meshes]:
            mesh = sharding.make_mesh(axes, jax.devices()[: int(np.prod(list(axes.values())))])
            state, _ = state_lib.sharded_state(cfg, model, tx, 3, mesh)
            put = sharding.batch_sharding(mesh)
            batch = jax.tree.map(lambda x, p=put: jax.make_array_from_process_local_data(p, x), b)

            def loss(params, batch=batch, moe_bias=state.moe_bias, model=model):
                return step_lib._micro_loss(params, moe_bias, model, batch, 0.0)

            with sharding.rules_on(mesh):
                lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(state.params)
                (total, metrics), grads = lowered.compile()(state.params)
            out = {
                "loss": float(total / metrics["items"]),
                "grads": [np.asarray(g) for g in jax.tree.leaves(grads)],
                "params": [np.asarray(x) for x in jax.tree.leaves(state.params)],
            }
            if ref is None:
                ref = out
            g_err = np.sqrt(
                sum(np.sum((a - r) ** 2) for a, r in zip(out["grads"], ref["grads"], strict=True))
            )
            g_norm = np.sqrt(sum(np.sum(r**2) for r in ref["grads"]))
            row = {
                "family": family,
                "mesh": axes,
                "loss": out["loss"],
                "ref_loss": ref["loss"],
                "grad_rel_err": float(g_err / g_norm),
                "same_init": all(
                    np.array_equal(a, r) for a, r in zip(out["params"], ref["params"], strict=True)
                ),
                "sharded_fraction": sharding.sharded_fraction(state.params),
                "all_to_all": "all_to_all" in lowered.as_text(),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
