"""`onerec sweep`: run a sweep, print one command per point, or plan it without running.

    onerec sweep --sweep experiments/sweeps/micro.py --dir runs/micro            # run (resumable)
    onerec sweep --sweep ... --dir ... --print-commands                          # for a scheduler
    onerec sweep --sweep experiments/sweeps/paper_ladder.py --dir ... --dry-run --devices 8

The dry run resolves every point (steps, tokens, FLOPs, data passes) and, per rung, compiles the
train step ahead of time on simulated devices (scaling/compile_plan.py) to find the smallest
FSDP mesh whose per-device memory fits `--device-memory`: a 0.015B-8B sweep is planned here and
run on a cluster.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
from typing import Any

from tqdm import tqdm


def commands(sweep_file: str, sweep_dir: str) -> list[str]:
    """One `onerec sweep --point NAME` command per point of the sweep, in its order, with
    absolute paths (a scheduler's job may start elsewhere). A point that turns out too short
    to train (an iso-FLOP point under min_steps) exits 0 without training."""
    from scaling import sweep as sweep_lib

    sw = sweep_lib.load(sweep_file)
    where = f"--sweep {shlex.quote(str(pathlib.Path(sweep_file).resolve()))} "
    where += f"--dir {shlex.quote(str(pathlib.Path(sweep_dir).resolve()))}"
    return [f"onerec sweep {where} --point {shlex.quote(p.name)}" for p in sw.points]


def _mesh_search(r: Any, devices: int, device_memory: float, n_items: int) -> dict[str, Any]:
    """The smallest FSDP axis (a divisor of `devices`; data parallel over the rest) on which
    the point's run config (r: sweep.Resolved) fits a device's memory."""
    from scaling.compile_plan import compile_plan

    last: dict[str, Any] = {}
    errors = []
    for f in (k for k in range(1, devices + 1) if devices % k == 0):
        try:
            last = compile_plan(
                r.point.rung, {"fsdp": f}, r.cfg.batch_size, device_memory=device_memory,
                n_items=n_items, run_config=r.cfg,
            )  # fmt: skip
        except ValueError as e:  # this split does not divide the batch: try the next
            errors.append(f"fsdp={f}: {e}")
            continue
        if last["fits"]:
            break
    if not last:
        return {"mesh": None, "fits": False, "plan_error": "; ".join(errors)}
    return {k: last[k] for k in ("mesh", "per_device_bytes", "fits")}


def dry_run(
    sweep_file: str, sweep_dir: str, devices: int, device_memory: float, memory: bool = True
) -> list[dict[str, Any]]:
    """Each point's plan: parameters, steps, tokens, FLOPs, data passes and (with `memory`)
    the mesh and per-device bytes; nothing is trained or written."""
    from onerec_jax.data.sources import distinct_requests
    from scaling import runner
    from scaling import sweep as sweep_lib

    sw = sweep_lib.load(sweep_file)
    d = pathlib.Path(sweep_dir)
    base = runner.base_config(sw)
    tbl = runner.built_table(d)
    vocab = tbl.vocab if tbl is not None else (base.tokenizer_codes or 128,) * 3
    resolved, notes = sweep_lib.resolve(sw, vocab)
    src = sweep_lib._train_source(base)
    distinct = distinct_requests(src)
    plans: dict[tuple[str, int], dict[str, Any]] = {}
    rows = []
    for r in tqdm(resolved, desc="plan", unit="point", disable=not memory):
        row = r.planned | {
            "data_passes": round(r.steps * r.cfg.batch_size / distinct, 3),
            "table": "built" if tbl is not None else f"not built yet: vocab {list(vocab)} assumed",
        }
        if memory:
            key = (r.point.rung, r.point.overrides)  # the same run config but for steps
            if key not in plans:
                plans[key] = _mesh_search(r, devices, device_memory, src.n_items)
            row |= plans[key]
        rows.append(row)
    return rows + [{"note": n} for n in notes]


def _show(rows: list[dict[str, Any]]) -> str:
    head = f"{'point':24s} {'N active':>13s} {'steps':>7s} {'tokens':>9s} {'FLOPs':>9s} passes"
    lines = [head + "  mesh                        GB/device fits"]
    for r in rows:
        if "note" in r:
            lines.append(f"# {r['note']}")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in (r.get("mesh") or {}).items() if v > 1) or "1 device"
        gb = f"{r['per_device_bytes'] / 1e9:9.2f}" if "per_device_bytes" in r else f"{'-':>9s}"
        lines.append(
            f"{r['point']:24s} {r['params_active'] - r['params_embedding']:13,d} {r['steps']:7d} "
            f"{r['tokens_planned']:9.3g} {r['flops_planned']:9.3g} {r['data_passes']:6.2f}"
            f"  {mesh:27s} {gb} {r.get('fits', '-')}"
        )
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    if args.print_commands:
        cmds = commands(args.sweep, args.dir)
        print(f"# {len(cmds)} points; or as an array job: onerec sweep --sweep {args.sweep} "
              f"--dir {args.dir} --index $SLURM_ARRAY_TASK_ID  (0 .. {len(cmds) - 1})")  # fmt: skip
        print("\n".join(cmds))
        return 0
    if args.dry_run:
        if not args.no_memory:
            from scaling.devices import simulate_devices

            simulate_devices(args.devices)  # before JAX starts
        rows = dry_run(args.sweep, args.dir, args.devices, args.device_memory, not args.no_memory)
        print("\n".join(json.dumps(r, sort_keys=True) for r in rows) if args.json else _show(rows))
        return 0
    from scaling import runner
    from scaling import sweep as sweep_lib

    sw = sweep_lib.load(args.sweep)
    only = list(args.point or [])
    if args.index is not None:
        if not 0 <= args.index < len(sw.points):
            raise IndexError(f"--index {args.index}: sweep has {len(sw.points)} points (0 .. n-1)")
        only.append(sw.points[args.index].name)
    return runner.run(
        sw, args.dir, only=only or None, wait=args.wait, stale_after_s=args.stale_after
    )


def register(sub: Any) -> None:
    """Add `onerec sweep` to the CLI's subparsers."""
    sw = sub.add_parser(
        "sweep",
        help="run a scaling sweep (resumable; several runners may share --dir)",
        description=__doc__.split("\n\n")[0],
    )
    sw.add_argument("--sweep", required=True, help="a sweep file (experiments/sweeps/*.py)")
    sw.add_argument("--dir", required=True, help="the sweep directory (runs, table, results)")
    sw.add_argument("--point", action="append", help="run only this point (repeatable)")
    sw.add_argument("--index", type=int, default=None, help="run only the I-th point (arrays)")
    sw.add_argument("--wait", action="store_true", help="then wait for points others hold")
    sw.add_argument(
        "--stale-after", type=float, default=600.0, help="seconds without a heartbeat before "
        "another runner's claim is taken over",
    )  # fmt: skip
    sw.add_argument("--print-commands", action="store_true", help="one command per point")
    sw.add_argument("--dry-run", action="store_true", help="plan every point, train nothing")
    sw.add_argument("--devices", type=int, default=8, help="with --dry-run: devices per run")
    sw.add_argument("--device-memory", type=float, default=80e9, help="with --dry-run: bytes")
    sw.add_argument("--no-memory", action="store_true", help="with --dry-run: skip compiles")
    sw.add_argument("--json", action="store_true", help="with --dry-run: JSON lines")
    sw.set_defaults(fn=_cli)
