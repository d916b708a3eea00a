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

import math
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

    # v4 and v5p run "megacore": one JAX device per chip (its two TensorCores fused), as
    # jobs on them do; v5e and v6e have one core per chip.
    chip_config = "megacore" if name.startswith(("v4:", "v5p:")) else "default"
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name=chip_config
        )
        return list(topo.devices)
    except Exception as e:  # libtpu's JaxRuntimeError: a shape it cannot lay out
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(
            f"TPU topology {name!r} was refused by libtpu ({first}); known: "
            f"{', '.join(known_topologies())}"
        ) from None


def roofline(
    chip: str, chips: int, flops_per_step: float, bytes_per_chip: float | None
) -> dict[str, float | str | None]:
    """Estimated step time (s) and MFU of a step on `chips` chips: compute time = FLOPs /
    (chips x peak); memory time = bytes each chip moves / its HBM bandwidth; the step takes at
    least the larger. MFU = FLOPs / (chips x peak x step time). Without a byte count only
    the compute bound is given (and no MFU: it would be 1 by construction)."""
    peak, _, bandwidth = CHIPS[chip]
    compute_s = flops_per_step / (chips * peak)
    if bytes_per_chip is None:
        return {
            "est_compute_s": compute_s,
            "est_memory_s": None,
            "est_step_s": compute_s,
            "est_mfu": None,
            "bound": "compute (no byte count)",
        }
    memory_s = bytes_per_chip / bandwidth
    step_s = max(compute_s, memory_s)
    return {
        "est_compute_s": compute_s,
        "est_memory_s": memory_s,
        "est_step_s": step_s,
        "est_mfu": flops_per_step / (chips * peak * step_s),
        "bound": "compute" if compute_s >= memory_s else "memory",
    }


def candidate_meshes(devices: int, batch: int, n_experts: int = 0) -> list[dict[str, int]]:
    """Meshes worth compiling on `devices` devices for a batch of `batch` requests, least
    memory per device first: FSDP over as many devices as the batch splits over (a power of
    two), tensor parallelism over the rest; for MoE rungs also the experts split over the
    largest power of two dividing both `n_experts` and those devices (FSDP over what is
    left). Data parallelism only adds per-device memory, so it is not tried."""
    shards = 1
    while shards * 2 <= min(devices, batch) and batch % (shards * 2) == 0:
        shards *= 2
    tensor = devices // shards
    out = [{"data": 1, "fsdp": shards, "tensor": tensor, "expert": 1}]
    expert = math.gcd(n_experts, shards) if n_experts else 1
    expert = 1 << (expert.bit_length() - 1)  # a power of two: it must divide `shards`
    if expert > 1:
        out.insert(0, {"data": 1, "fsdp": shards // expert, "tensor": tensor, "expert": expert})
    return out


# The paper-scale sweep's settings (experiments/sweeps/paper_ladder.py: world:large).
SWEEP_BATCH, SWEEP_ITEMS = 256, 4_000_000
# What the TPU compiler says when a program cannot fit a chip (anything else is a real error).
_OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "out of memory", "Ran out of memory", "exceeds")


def tpu_plan(
    rung: str,
    topology: str,
    mesh_axes: dict[str, int] | None = None,
    batch: int = SWEEP_BATCH,
    n_items: int = SWEEP_ITEMS,
    remat: str = "none",
    moment_dtype: str = "float32",
    unroll: bool = False,
) -> dict[str, Any]:
    """Compile `rung`'s train step (forward, backward, optimizer update; bf16 compute) for the
    slice `topology` on `mesh_axes` (default: the first of `candidate_meshes`) at `batch`
    requests over `n_items` items (default: the paper-scale sweep's), and return the mesh
    plan's keys plus per-chip bytes against the chip's HBM and the roofline estimate. A plan
    the compiler refuses for memory reports `fits: false` with its reason; any other failure
    (a mesh the batch cannot split over, a bug) is raised."""
    from scaling.compile_plan import compile_plan

    gen, chips = parse_topology(topology)
    devices = topology_devices(topology)
    if len(devices) != chips:
        raise ValueError(f"{topology}: libtpu gave {len(devices)} devices for {chips} chips")
    axes = mesh_axes or candidate_meshes(chips, batch, _n_experts(rung))[0]
    hbm = CHIPS[gen][1]
    base = {"rung": rung, "topology": topology, "chip": gen, "chips": chips}
    base.update(batch=batch, n_items=n_items, hbm_per_chip=hbm)
    try:
        row = compile_plan(
            rung,
            axes,
            batch,
            device_memory=hbm,
            n_items=n_items,
            bf16=True,
            remat=remat,
            moment_dtype=moment_dtype,
            unroll=unroll,
            devices=devices,
        )
    except Exception as e:
        text = str(e)
        if not any(m in text for m in _OUT_OF_MEMORY):
            raise
        first = (text.strip().splitlines() or [""])[0][:300]
        return {**base, "mesh": axes, "fits": False, "error": f"{type(e).__name__}: {first}"}
    # Bytes a chip moves per step: at least its state and outputs (read and written once);
    # the compiler's count when larger (it counts a scanned layer stack's body once).
    state_io = row["per_device_arguments_bytes"] + row["per_device_output_bytes"]
    moved = max(row["bytes_accessed_per_device"], float(state_io))
    est = roofline(gen, chips, row["flops_per_step"], moved)
    out = {**row, **base, **est, "est_bytes_per_chip": moved}
    out["est_requests_per_s"] = batch / est["est_step_s"]
    # target semantic-id tokens with a loss: the sweep's token unit (flops.Counts)
    tokens = batch * row["target_tokens_per_sample"]
    out["est_target_tokens_per_s"] = tokens / est["est_step_s"]
    return out


def _n_experts(rung: str) -> int:
    from scaling.ladder import rung_config

    cfg = rung_config(rung)
    return int(cfg.model[cfg.model.family].get("moe", {}).get("n_experts", 0))


def search(
    rung: str,
    generations: tuple[str, ...] = tuple(SLICES),
    batch: int = SWEEP_BATCH,
    n_items: int = SWEEP_ITEMS,
    **options: Any,
) -> list[dict[str, Any]]:
    """Per TPU generation, the smallest slice (and mesh) on which `rung` fits, trying the
    slices of `SLICES` smallest first (skipping, uncompiled, those whose HBM cannot even hold
    the float32 parameters and AdamW moments) and `candidate_meshes` on each. `options`:
    `remat`, `moment_dtype`, `unroll` of `tpu_plan`."""
    from scaling.ladder import plan

    per_param = 4.0 + (4.0 if options.get("moment_dtype", "float32") == "float32" else 2.0) * 2
    state_bytes = per_param * plan(rung, n_items=n_items)["params_total"]
    out = []
    for gen in generations:
        found = None
        for dims in SLICES[gen]:
            topology = f"{gen}:{dims}"
            _, chips = parse_topology(topology)
            if state_bytes / chips > CHIPS[gen][1]:  # the state alone cannot fit: no compile
                continue
            for axes in candidate_meshes(chips, batch, _n_experts(rung)):
                row = tpu_plan(rung, topology, axes, batch, n_items, **options)
                if row["fits"]:
                    found = row
                    break
            if found:
                break
        out.append(found or {"rung": rung, "chip": gen, "fits": False, "topology": None})
    return out
