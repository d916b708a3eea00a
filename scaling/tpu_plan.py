"""Plans on real TPU topologies without a TPU: a rung's whole train step compiled ahead of time
by the TPU compiler (libtpu, the optional `tpu` extra: `make install-tpu`) for a slice's devices.

`jax.experimental.topologies.get_topology_desc("tpu", "v5p:4x4x4")` describes the devices of a
slice on any machine; a jitted step lowered with abstract inputs sharded over a mesh of them
compiles with the real TPU compiler, so its `memory_analysis()` is what each chip would hold and
its `cost_analysis()` what it would move. On top of that, a roofline estimate (`roofline`) of
the step time from the chip's datasheet peaks: the larger of compute time (the analytic matmul
FLOPs over the slice's bf16 peak) and memory time (the compiler's bytes accessed per device over
its HBM bandwidth). It is an estimate, a lower bound on the step time: it ignores
communication, latency and how well the kernels run (see the H100 calibration in the README).
"""

from __future__ import annotations

import os
import re
from typing import Any

# Per chip, from the vendors' datasheets: dense bf16 FLOP/s, HBM bytes, HBM bytes/s.
CHIPS: dict[str, tuple[float, float, float]] = {
    "v4": (275e12, 32 * 2**30, 1228e9),
    "v5e": (197e12, 16 * 2**30, 819e9),
    "v5p": (459e12, 95 * 2**30, 2765e9),
    "v6e": (918e12, 32 * 2**30, 1640e9),
    "h100": (989e12, 80e9, 3350e9),
    "h200": (989e12, 141e9, 4800e9),
}
# The slices `--search` tries per TPU generation, smallest first (what libtpu accepts: whole
# hosts of 2x2 chips).
_2D = ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16")
SLICES: dict[str, tuple[str, ...]] = {"v4": _3D, "v5p": _3D, "v5e": _2D, "v6e": _2D}


def known_topologies() -> list[str]:
    return [f"{gen}:{s}" for gen, slices in SLICES.items() for s in slices]


def parse_topology(name: str) -> tuple[str, int]:
    """(generation, chips) of "v5p:4x4x4"; one clear error listing the known ones."""
    gen, _, dims = name.partition(":")
    rank = len(SLICES[gen][0].split("x")) if gen in SLICES else 0
    ok = re.fullmatch(r"\d+(x\d+)+", dims) and len(dims.split("x")) == rank
    if gen not in SLICES or not ok:
        raise ValueError(
            f"unknown TPU topology {name!r}: expected GENERATION:DIMS with a generation of "
            f"{sorted(SLICES)} ({'AxB' if gen in ('v5e', 'v6e') else 'AxBxC'} chips), e.g. "
            f"{', '.join(known_topologies()[::4])}"
        )
    chips = 1
    for d in dims.split("x"):
        chips *= int(d)
    return gen, chips


def topology_devices(name: str) -> list[Any]:
    """The devices of slice `name`, from libtpu's topology description (no TPU needed)."""
    parse_topology(name)
    # Compiling needs no TPU: let several processes (test workers, two plans) load libtpu at
    # once instead of fighting over its lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401  (the optional extra)
    except ImportError:
        raise ValueError(
            "TPU plans need libtpu: install the tpu extra (`make install-tpu` or "
            "`pip install '.[tpu]'`)"
        ) from None
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's JaxRuntimeError: a shape it cannot lay out
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(
            f"TPU topology {name!r} was refused by libtpu ({first}); known: "
            f"{', '.join(known_topologies())}"
        ) from None


def roofline(
    chip: str, devices: int, chips: int, flops_per_step: float, bytes_per_device: float
) -> dict[str, float]:
    """Estimated step time (s) and MFU of a step on `chips` chips (`devices` JAX devices: v4
    shows 2 per chip): compute time = FLOPs / (chips x peak); memory time = the compiler's
    bytes accessed per device / (per-device HBM bandwidth); the step takes at least the
    larger. MFU = FLOPs / (chips x peak x step time)."""
    peak, _, bandwidth = CHIPS[chip]
    per_chip = devices / chips
    compute_s = flops_per_step / (chips * peak)
    memory_s = bytes_per_device / (bandwidth / per_chip) if bytes_per_device > 0 else 0.0
    step_s = max(compute_s, memory_s)
    return {
        "est_compute_s": compute_s,
        "est_memory_s": memory_s,
        "est_step_s": step_s,
        "est_mfu": flops_per_step / (chips * peak * step_s) if step_s > 0 else 0.0,
        "bound": "compute" if compute_s >= memory_s else "memory",
    }


def candidate_meshes(devices: int, batch: int, moe: bool) -> list[dict[str, int]]:
    """Meshes worth trying on `devices` devices for a batch of `batch` requests: FSDP over as
    many devices as the batch splits over (data-parallel on top of it), the rest as tensor
    parallelism; for MoE rungs the same with experts over the FSDP devices."""
    out = []
    shards = 1
    while shards * 2 <= min(devices, batch) and batch % (shards * 2) == 0:
        shards *= 2
    tensor = devices // shards
    for data in (1, 2, 4, 8):
        if shards % data == 0 and shards // data >= 1:
            mesh = {"data": data, "fsdp": shards // data, "tensor": tensor, "expert": 1}
            out.append(mesh)
            if moe and shards // data > 1:
                out.append({"data": data, "fsdp": 1, "tensor": tensor, "expert": shards // data})
    return out


def tpu_plan(
    rung: str,
    topology: str,
    mesh_axes: dict[str, int] | None = None,
    batch: int | None = None,
    bf16: bool = True,
) -> dict[str, Any]:
    """Compile `rung`'s train step (forward, backward, optimizer update; bf16 compute) for the
    slice `topology` on `mesh_axes` (default: the first of `candidate_meshes`) at `batch`
    requests (default: the rung's), and return the mesh plan's keys plus per-chip bytes
    against the chip's HBM and the roofline estimate. A rung that does not fit reports
    `fits: false`; one whose compile fails (e.g. the compiler itself runs out of HBM) too,
    with the reason."""
    from scaling.compile_plan import compile_plan
    from scaling.ladder import rung_config

    gen, chips = parse_topology(topology)
    devices = topology_devices(topology)
    cfg = rung_config(rung)
    batch = batch or int(cfg.batch_size)
    axes = mesh_axes or candidate_meshes(len(devices), batch, _is_moe(rung))[0]
    hbm = CHIPS[gen][1] * chips / len(devices)  # per JAX device (v4: 2 per chip)
    base = {"rung": rung, "topology": topology, "chip": gen, "chips": chips}
    base.update(devices=len(devices), batch=batch, hbm_per_device=hbm)
    try:
        row = compile_plan(rung, axes, batch, hbm, bf16=bf16, devices=devices)
    except Exception as e:  # the compiler refusing a program that cannot fit, among others
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return {**base, "mesh": axes, "fits": False, "error": f"{type(e).__name__}: {first}"}
    moved = row["bytes_accessed_per_device"]
    est = roofline(gen, len(devices), chips, row["flops_per_step"], moved)
    tokens = batch * _tokens_per_request(cfg)
    return {**row, **base, **est, "est_tokens_per_s": tokens / est["est_step_s"]}


def _tokens_per_request(cfg: Any) -> int:
    """Context and target tokens one training request feeds the model (the sweep's unit)."""
    d = cfg.data
    return int(d.short_len + d.pos_len + d.life_len + d.max_targets * 3)


def search(rung: str, generations: tuple[str, ...] = tuple(SLICES)) -> list[dict[str, Any]]:
    """Per TPU generation, the smallest slice (and mesh) on which `rung` fits, trying the
    slices of `SLICES` smallest first (skipping, uncompiled, those whose HBM cannot even hold
    the float32 parameters and AdamW moments) and `candidate_meshes` on each."""
    from scaling.ladder import plan

    state_bytes = 12.0 * plan(rung)["params_total"]  # float32 params and two AdamW moments
    out = []
    for gen in generations:
        found = None
        for dims in SLICES[gen]:
            topology = f"{gen}:{dims}"
            _, chips = parse_topology(topology)
            if state_bytes / chips > CHIPS[gen][1]:  # the state alone cannot fit: no compile
                continue
            n = len(topology_devices(topology))
            for axes in candidate_meshes(n, _batch_of(rung), _is_moe(rung)):
                row = tpu_plan(rung, topology, axes)
                if row["fits"]:
                    found = row
                    break
            if found:
                break
        out.append(found or {"rung": rung, "chip": gen, "fits": False, "topology": None})
    return out


def _batch_of(rung: str) -> int:
    from scaling.ladder import rung_config

    return int(rung_config(rung).batch_size)


def _is_moe(rung: str) -> bool:
    from scaling.ladder import rung_config

    cfg = rung_config(rung)
    return bool(cfg.model.get(cfg.model.family, {}).get("moe", {}).get("n_experts", 0))
