"""V1 and V2 on MovieLens-100k over seeds: each experiment's recipe trained, then scored on the
validation split (where the recipes were chosen) and on the test split.

    .venv/bin/python benchmarks/ml100k_models.py [--families v1 v2] [--seeds 1 2 3]
        [--out runs/ml100k] [--json benchmarks/results/ml100k_models.json]
        [--set FIELD=VALUE ...]   (extra --config overrides, e.g. for a tuning run)

Per family and seed: `onerec train --config experiments/{family}_ml100k.py --workdir
OUT/{family}[_tag]_sS --config.seed=S`, then `onerec eval --split validation|test --json` (the
seed changes the tokenizer, the init and the data order). The recipes were chosen on seed 0's
validation scores (`--seeds 0 --splits validation --tag ...`, recorded in
benchmarks/results/ml100k_tuning.json); the reported test rows use fresh seeds 1, 2, 3, as the
baselines do. A finished run is evaluated, not retrained, and only if it was made with the
config asked for (else: an error naming the fields). Prints the mean ± sd rows.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

from onerec_jax import config
from onerec_jax.train.run_config import check_workdir_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONEREC = [sys.executable, "-m", "onerec_jax.cli"]
KEYS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def _onerec(args: list[str], log: pathlib.Path) -> str:
    with log.open("a") as f:
        out = subprocess.run([*ONEREC, *args], stdout=subprocess.PIPE, stderr=f, text=True)
    if out.returncode:
        raise RuntimeError(f"onerec {' '.join(args)} failed (exit {out.returncode}); see {log}")
    return out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="runs/ml100k")
    p.add_argument("--tag", default="", help="names the runs of a variant: OUT/v1_TAG_s0")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--splits", nargs="+", default=["validation", "test"])
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/ml100k_models.json"))
    a = p.parse_args()
    out = pathlib.Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = pathlib.Path(a.json)
    for family in a.families:
        key = family + (f"_{a.tag}" if a.tag else "")
        entry = {"config": f"experiments/{family}_ml100k.py", "overrides": a.set, "per_seed": {}}
        for seed in a.seeds:
            work = out / f"{key}_s{seed}"
            log = out / f"{key}_s{seed}.log"
            done = work / "summary.json"
            finished = done.exists() and json.loads(done.read_text())["status"] == "finished"
            if finished:  # read back only a run made with this config
                want = config.resolve(
                    config.load(str(ROOT / entry["config"])), [f"seed={seed}", *a.set]
                )
                check_workdir_config(want, work, write=False)
            else:
                _onerec(
                    [
                        *("train", "--config", str(ROOT / entry["config"])),
                        *("--workdir", str(work), f"--config.seed={seed}"),
                        *(f"--config.{s}" for s in a.set),
                    ],
                    log,
                )
            summary = json.loads(done.read_text())
            row = {
                "train_wall_s": summary.get("wall_s_total"),
                "params": summary.get("params_total"),
            }
            for split in a.splits:
                ev = json.loads(
                    _onerec(["eval", "--workdir", str(work), "--split", split, "--json"], log)
                    .strip()
                    .splitlines()[-1]
                )
                row[split] = {k: ev[k] for k in KEYS}
                row["protocol"] = ev.get("protocol")
                row["beam"] = ev.get("beam")
            entry["per_seed"][str(seed)] = row
            print(key, seed, json.dumps({s: row[s] for s in a.splits}), flush=True)
        for split in a.splits:
            vals = {k: [r[split][k] for r in entry["per_seed"].values()] for k in KEYS}
            entry[f"{split}_mean"] = {k: float(np.mean(v)) for k, v in vals.items()}
            entry[f"{split}_sd"] = {
                k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in vals.items()
            }
        # Re-read before writing: another family's run may have written meanwhile.
        results = json.loads(path.read_text()) if path.exists() else {}
        results[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        for split in a.splits:
            m, sd = entry[f"{split}_mean"], entry[f"{split}_sd"]
            cells = " | ".join(f"{m[k]:.4f} ± {sd[k]:.4f}" for k in KEYS)
            print(f"| {key} ({split}) | {cells} |")


if __name__ == "__main__":
    main()
