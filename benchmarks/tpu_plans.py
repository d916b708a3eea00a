"""Which TPU slice each V1 and V2 rung needs: `onerec plan --search` for every rung, by the
TPU compiler (the tpu extra), and the roofline estimate calibrated against H100 step times.

    .venv/bin/python benchmarks/tpu_plans.py [--rungs v1-0.015b ...] [--generations v5e v5p]
        [--json benchmarks/results/tpu_plans.json]

For each rung (the paper-scale sweep's batch of 256 requests over 4M items, bf16 compute,
float32 state) and TPU generation: the smallest slice of scaling/tpu_plan.py's list on which the
compiled train step fits per chip (slices whose HBM cannot hold the float32 parameters and
moments are skipped uncompiled), its mesh, per-chip bytes, FLOPs per step and the roofline
estimate of step time, target tokens/s and MFU. Results are written after every rung, and a
rung already in the JSON is not compiled again, so an interrupted run continues. Prints a
Markdown table, and beside it the H100 calibration: the compute-bound estimate (analytic FLOPs
/ 989 TFLOP/s) against step times measured on one H100 (issue 18).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu must not look for a local TPU

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNGS = [
    "v1-0.015b",
    "v1-0.121b",
    "v1-0.935b",
    "v1-2.633b",
    "v2-0.1b",
    "v2-0.2b",
    "v2-0.5b",
    "v2-1b",
    "v2-2b",
    "v2-4b",
    "v2-8b",
    "v2-4b-a0.5b",
]
# One H100 (80 GB), bf16, median step time in ms, the code before the performance work
# (measured by an earlier session; issue 18's calibration points).
H100_MS = {
    ("v1-0.015b", 512): 104,
    ("v1-0.121b", 256): 372,
    ("v1-0.935b", 64): 123,
    ("v2-0.1b", 256): 90,
    ("v2-0.1b", 1024): 318,
    ("v2-0.5b", 128): 93,
    ("v2-1b", 64): 90,
    ("v2-1b", 256): 246,
    ("v2-2b", 32): 108,
}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from scaling import ladder, tpu_plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rungs", nargs="+", default=RUNGS)
    ap.add_argument("--generations", nargs="+", default=list(tpu_plan.SLICES))
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/tpu_plans.json"))
    a = ap.parse_args()
    path = pathlib.Path(a.json)
    done = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    for rung in a.rungs:
        for gen in a.generations:
            key = f"{rung} {gen}"
            if key in done["rows"]:
                continue
            (row,) = tpu_plan.search(rung, (gen,))
            done["rows"][key] = row
            print(json.dumps({k: row.get(k) for k in ("rung", "topology", "mesh", "fits")}))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done, indent=1, sort_keys=True, default=str) + "\n")
    print(
        "| rung | params | batch | chip | smallest slice (mesh) | per-chip GB | TFLOP/step | "
        "roofline estimate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in done["rows"].values():
        if not r.get("fits"):
            print(f"| {r['rung']} | | | {r['chip']} | none of the slices tried | | | |")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        print(
            f"| {r['rung']} | {r['params_total'] / 1e9:.3f}B | {r['batch']} | {r['chip']} | "
            f"{r['topology']} ({mesh}) | {r['per_device_bytes'] / 1e9:.1f} | "
            f"{r['flops_per_step'] / 1e12:.1f} | {r['est_step_s'] * 1e3:.1f} ms, "
            f"{r['est_target_tokens_per_s'] / 1e6:.2f} M target tokens/s, MFU "
            f"{r['est_mfu']:.0%} ({r['bound']}-bound) |"
        )
    print("\n| rung | batch | H100 measured ms | compute-bound estimate ms | measured / estimate |")
    print("|---|---|---|---|---|")
    peak = tpu_plan.CHIPS["h100"][0]
    for (rung, batch), ms in H100_MS.items():
        est = ladder.plan(rung)["flops_per_sample"] * batch / peak * 1e3
        print(f"| {rung} | {batch} | {ms} | {est:.1f} | {ms / est:.1f}x |")


if __name__ == "__main__":
    main()
