"""Plans that compile: a rung's full train step lowered and compiled ahead of time for abstract
sharded inputs on a device mesh (nothing is allocated), with the per-device memory and FLOPs of
the compiled executable.

On a machine without the devices, simulate them on the CPU: JAX must start with
XLA_FLAGS=--xla_force_host_platform_device_count=N (`onerec plan --devices N` sets it). The
memory figures are XLA's buffer assignment for the CPU backend: the sharded state, the batch and
the temporaries of one step on one device; a GPU or TPU compile lays temporaries out
differently, so treat `fits` as a plan, and confirm it on the device.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from onerec_jax import config, flops, sharding
from onerec_jax.configs import default
from onerec_jax.train import state as state_lib
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec, zero_batch
from onerec_jax.train.model_factory import build_model
from scaling.ladder import Catalogue


def parse_mesh(text: str) -> dict[str, int]:
    """ "data=8,fsdp=8" -> {"data": 8, "fsdp": 8}."""
    out = {}
    for item in filter(None, text.split(",")):
        name, sep, size = item.partition("=")
        if not sep or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE...]")
        out[name.strip()] = int(size)
    return out


def compile_plan(
    name: str,
    mesh_axes: dict[str, int],
    batch: int,
    device_memory: float = 80e9,
    n_items: int = 20_000,
    bf16: bool = False,
    remat: str = "none",
    moment_dtype: str = "float32",
    run_config: Any = None,
    unroll: bool = False,
    devices: Any = None,
) -> dict[str, Any]:
    """Compile rung `name`'s train step at `batch` requests on `mesh_axes` over all devices,
    with the memory options `remat` and `moment_dtype` and the layer stacks unrolled or not
    (`unroll_layers`; onerec_jax/configs/default.py). With
    `run_config` (a resolved run config: a sweep point's), that config is compiled instead of
    the default one, on `mesh_axes` and at its own batch and memory options. `devices`: the
    mesh's devices (default this machine's; a TPU slice's from scaling/tpu_plan.py)."""
    if run_config is not None:
        cfg = ml_collections.ConfigDict(run_config.to_dict())
        axes = {f"mesh.{k}": 1 for k in cfg.mesh} | {f"mesh.{k}": v for k, v in mesh_axes.items()}
        config.update(cfg, axes | {"mesh.data": mesh_axes.get("data", -1)}, "compile plan")
        batch, bf16, remat = cfg.batch_size, cfg.bf16, cfg.remat
        moment_dtype, unroll = cfg.optim.moment_dtype, cfg.unroll_layers
    else:
        overrides = [f"rung={name}", f"batch_size={batch}", f"bf16={bf16}", f"remat={remat}"]
        overrides += [f"optim.moment_dtype={moment_dtype}", f"unroll_layers={unroll}"]
        overrides += [f"mesh.{k}={v}" for k, v in mesh_axes.items()]  # data: the rest (-1)
        cfg = config.resolve(default.get_config(), overrides)
    codes = cfg.tokenizer_codes or 128
    model = build_model(cfg, Catalogue(n_items), (codes,) * 3)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), devices)
    if batch % sharding.batch_shards(mesh):
        raise ValueError(f"batch {batch} does not split over {sharding.batch_shards(mesh)} shards")
    ocfg, tx, schedule = state_lib.optimizer(cfg)
    _, key, abstract, shardings = state_lib.state_layout(cfg, model, tx, 3, mesh)
    state_in = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    batch_sh = sharding.batch_sharding(mesh)
    batch_in = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
        for k, v in zero_batch(schema_spec(cfg), batch, 3).items()
    }
    fn = step_lib.jit_train_step(model, tx, schedule, ocfg, mesh, shardings)
    t = time.perf_counter()
    compiled = fn.lower(state_in, batch_in, key).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    per_device = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params))
    counts = flops.counts(model)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    return {
        "rung": name,
        "family": cfg.model.family,
        "mesh": dict(mesh.shape),
        "devices": int(mesh.devices.size),
        "batch": batch,
        "bf16": bf16,
        "remat": remat,
        "moment_dtype": moment_dtype,
        "unroll_layers": unroll,
        "params_total": params,
        "per_device_bytes": int(per_device),
        "per_device_arguments_bytes": int(mem.argument_size_in_bytes),
        "per_device_temp_bytes": int(mem.temp_size_in_bytes),
        "per_device_output_bytes": int(mem.output_size_in_bytes),
        # what the compiler expects one device to read and write in a step (its cost model)
        "bytes_accessed_per_device": float(cost.get("bytes accessed", -1.0)),
        # analytic matmul FLOPs of the step (onerec_jax/flops.py): XLA's cost analysis counts
        # the body of a scanned layer stack once, not once per layer
        "flops_per_step": counts.flops_train * batch,
        "target_tokens_per_sample": counts.tokens_per_sample,  # semantic-id tokens with a loss
        "device_memory": device_memory,
        "fits": bool(per_device <= device_memory),
        "compile_s": round(compile_s, 2),
    }
