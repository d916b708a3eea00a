"""`onerec plan`: a rung's parameters and FLOPs (nothing allocated); with `--compile`, its
sharded train step compiled ahead of time on simulated CPU devices or, with `--topology`, on a
real TPU slice's devices by the TPU compiler (scaling/tpu_plan.py; the `tpu` extra); with
`--search`, the smallest slice per TPU generation on which the rung fits."""

from __future__ import annotations

import argparse
import json


def lines(row: dict) -> str:
    return "\n".join(
        f"{k:28s} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:28s} {v}"
        for k, v in row.items()
    )


def _plan(args: argparse.Namespace) -> int:
    tpu = bool(args.topology or args.search)
    for flag, value in (("--items", args.items), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise ValueError(f"plan {flag} must be >= 1, got {value}")
    if tpu:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu must not look for a local TPU
        from scaling import tpu_plan
        from scaling.compile_plan import parse_mesh

        if not args.rung:
            raise ValueError("onerec plan --topology/--search needs --rung NAME")
        sizes = {"batch": args.batch or tpu_plan.SWEEP_BATCH}
        sizes["n_items"] = args.items or tpu_plan.SWEEP_ITEMS
        options = {"remat": args.remat, "moment_dtype": args.moment_dtype, "unroll": args.unroll}
        if args.search:
            gens = args.generations.split(",") if args.generations else list(tpu_plan.SLICES)
            unknown = [g for g in gens if g not in tpu_plan.SLICES]
            if unknown:
                raise ValueError(f"--generations {unknown}: expected {sorted(tpu_plan.SLICES)}")
            rows = tpu_plan.search(args.rung, tuple(gens), **sizes, **options)
            print(json.dumps(rows, sort_keys=True) if args.json else "\n\n".join(map(lines, rows)))
            return 0
        mesh = parse_mesh(args.mesh) if args.mesh else None
        row = tpu_plan.tpu_plan(args.rung, args.topology, mesh, **sizes, **options)
        print(json.dumps(row, sort_keys=True) if args.json else lines(row))
        return 0
    if args.compile:
        from scaling.devices import simulate_devices

        simulate_devices(args.devices)
        from scaling.compile_plan import compile_plan, parse_mesh

        row = compile_plan(
            args.rung,
            parse_mesh(args.mesh),
            args.batch or 64,
            device_memory=args.device_memory,
            n_items=args.items or 20_000,
            bf16=args.bf16,
            remat=args.remat,
            moment_dtype=args.moment_dtype,
            unroll=args.unroll,
        )
        print(json.dumps(row, sort_keys=True) if args.json else lines(row))
        return 0
    from scaling import ladder

    if args.list:
        print("\n".join(sorted(ladder.RUNGS)))
        return 0
    if not args.rung:
        raise ValueError("onerec plan needs --rung NAME (--list shows them)")
    row = ladder.plan(args.rung, n_items=args.items or 20_000, context_len=args.context_len)
    print(json.dumps(row, sort_keys=True) if args.json else lines(row))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="parameters and FLOPs of a named rung (nothing allocated)")
    pl.add_argument("--rung", default=None, help="a rung of onerec_jax/model/rungs.py")
    pl.add_argument("--list", action="store_true", help="list the rungs")
    pl.add_argument(
        "--items",
        type=int,
        default=None,
        help="catalogue size for the id tables (default 20,000; TPU plans: the paper-scale "
        "sweep's 4,000,000)",
    )
    pl.add_argument(
        "--context-len", type=int, default=512, help="context tokens in the paper's accounting"
    )
    pl.add_argument(
        "--compile",
        action="store_true",
        help="lower and compile the sharded train step ahead of time (per-device memory, fits)",
    )
    pl.add_argument("--devices", type=int, default=8, help="with --compile: simulated devices")
    pl.add_argument("--mesh", default="", help="with --compile: e.g. data=8,fsdp=8 (-1: the rest)")
    pl.add_argument(
        "--batch",
        type=int,
        default=None,
        help="requests per step (default --compile: 64; TPU plans: the paper-scale sweep's 256)",
    )
    pl.add_argument("--bf16", action="store_true", help="with --compile: bf16 compute")
    pl.add_argument(
        "--remat",
        default="none",
        help="with --compile: rematerialisation of the layer stacks, none | full | dots",
    )
    pl.add_argument(
        "--moment-dtype",
        default="float32",
        help="with --compile: AdamW moments stored in float32 | bfloat16",
    )
    pl.add_argument(
        "--unroll", action="store_true", help="with --compile: the layer stacks unrolled"
    )
    pl.add_argument(
        "--device-memory", type=float, default=80e9, help="with --compile: bytes per device"
    )
    pl.add_argument(
        "--topology",
        default="",
        help="compile for a TPU slice, e.g. v5p:4x4x4 (the tpu extra; bf16; with --remat, "
        "--moment-dtype, --unroll; per-chip bytes against HBM and a roofline estimate)",
    )
    pl.add_argument(
        "--search",
        action="store_true",
        help="the smallest TPU slice (and mesh) per generation on which the rung fits",
    )
    pl.add_argument("--generations", default="", help="with --search: e.g. v5e,v5p (default all)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(fn=_plan)
