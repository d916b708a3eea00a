"""The smallest FSDP mesh on which each rung's train step fits a device's memory, from ahead-of-
time compiles on simulated CPU devices (`onerec plan --compile`; nothing is allocated).

    .venv/bin/python benchmarks/rung_plans.py [--batch 64] [--device-memory 80e9]

For each rung: fsdp = 1, 2, 4, ... 64 devices (the batch split over them too) until the
compiled step's per-device bytes (state shard + batch shard + temporaries, XLA's buffer
assignment for the CPU backend, float32 compute) fit `--device-memory`. Writes
benchmarks/results/rung_plans.json. CPU speed across simulated devices means nothing, so only
compile time and memory are reported; a GPU or TPU compile lays temporaries out differently.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def plan(rung: str, devices: int, batch: int, memory: float) -> dict:
    cmd = [sys.executable, "-m", "onerec_jax.cli", "plan", "--rung", rung, "--compile"]
    cmd += ["--devices", str(devices), "--mesh", f"fsdp={devices}", "--batch", str(batch)]
    cmd += ["--device-memory", str(memory), "--json"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"rung": rung, "devices": devices, "error": "compile timed out (1800 s)"}
    if out.returncode:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return {"rung": rung, "devices": devices, "error": last}
    return json.loads(out.stdout)


def main() -> None:
    from onerec_jax.model.rungs import RUNGS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="requests per step (the sweep's)")
    ap.add_argument("--device-memory", type=float, default=80e9)
    ap.add_argument("--rungs", nargs="*", default=sorted(RUNGS))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "rung_plans.json"))
    a = ap.parse_args()
    rows = []
    for rung in a.rungs:
        devices = 1
        while devices <= 64:
            row = plan(rung, devices, a.batch, a.device_memory)
            print(json.dumps(row, sort_keys=True), flush=True)
            if row.get("fits"):
                break
            devices *= 2
        rows.append(row)
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    for r in rows:
        gb = r.get("per_device_bytes", float("nan")) / 1e9
        print(f"{r['rung']:12s} fsdp={r['devices']:<3d} {gb:7.2f} GB/device fits={r.get('fits')}")


if __name__ == "__main__":
    main()
