"""Alignment against logged feedback on a logged source: ECPO with `reward=logged` on the
MovieLens-100k runs of benchmarks/ml100k_models.py, over their seeds, for V1 and V2.

    .venv/bin/python benchmarks/align_logged_ml100k.py [--runs runs/ml100k] [--seeds 1 2 3]
        [--steps 60] [--learning-rate 1e-4] [--out runs/ml100k_logged]

MovieLens has no world, so nothing knows a recommendation's true reward: a rollout earns the
feedback the request logged for it (rating >= 4: like, +2; rating <= 2: dislike, -5; 3: 0)
when it is one of the request's logged targets, else 0. Each pre-trained run
(RUNS/{family}_s{seed}, made by ml100k_models.py) is aligned with the same settings; the
align run scores its init and its result on the whole validation split (beam 128, the
protocol of the README's table: Recall/NDCG over unseen items and `logged_reward@10`), and
the aligned and the pre-trained runs are then evaluated on test (`onerec eval`). Reports the
paired change (aligned - pre-trained) per family with a 95 % t-interval over seeds. A finished
align run is read back only if made with these settings. Writes
benchmarks/results/align_logged_ml100k.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from align_methods import interval

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONEREC = [sys.executable, "-m", "onerec_jax.cli"]
KEYS = ("ndcg@10", "recall@10", "logged_reward@10")


def _onerec(args: list[str]) -> dict:
    out = subprocess.run([*ONEREC, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"onerec {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/ml100k", help="ml100k_models.py's --out")
    ap.add_argument("--families", nargs="+", default=["v1", "v2"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--out", default="runs/ml100k_logged")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/align_logged_ml100k.json"))
    a = ap.parse_args()
    runs, out = pathlib.Path(a.runs).resolve(), pathlib.Path(a.out).resolve()
    settings = {"steps": a.steps, "learning_rate": a.learning_rate, "reward": "logged"}
    settings.update(eval_requests=943, eval_beam=128)  # every validation user, the table's beam
    rows, table = [], []
    for family in a.families:
        for seed in a.seeds:
            init, work = runs / f"{family}_s{seed}", out / f"{family}_s{seed}"
            if not (init / "summary.json").exists():
                raise FileNotFoundError(f"{init}: run benchmarks/ml100k_models.py first")
            done = work / "summary.json"
            if done.exists():
                have = json.loads((work / "align.json").read_text())["align"]
                bad = {k: (have.get(k), v) for k, v in settings.items() if have.get(k) != v}
                if bad:
                    raise RuntimeError(f"{work}: made with other settings {bad}; new --out")
                s = json.loads(done.read_text())
            else:
                s = _onerec(
                    [
                        *("align", "--method", "ecpo", "--init", str(init)),
                        *("--workdir", str(work), f"--config.seed={seed}"),
                        *(f"--config.{k}={v}" for k, v in settings.items()),
                    ]
                )
            test_after = _onerec(["eval", "--workdir", str(work), "--split", "test", "--json"])
            test_before = _onerec(["eval", "--workdir", str(init), "--split", "test", "--json"])
            row = {"family": family, "seed": seed}
            for k in KEYS:
                row[f"validation {k}"] = (s["before"][k], s["after"][k])
                row[f"test {k}"] = (test_before[k], test_after[k])
            rows.append(row)
            print(json.dumps(row), flush=True)
        fam = [r for r in rows if r["family"] == family]
        entry: dict = {"family": family, "seeds": len(fam)}
        for split in ("validation", "test"):
            for k in KEYS:
                pairs = [r[f"{split} {k}"] for r in fam]
                entry[f"{split} {k} before"] = interval([b for b, _ in pairs])
                entry[f"{split} {k} change"] = interval([x - b for b, x in pairs])
        table.append(entry)
    result = {"command": " ".join(sys.argv), "settings": vars(a), "rows": rows, "table": table}
    pathlib.Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print("| family | split | " + " | ".join(f"{k} before | change" for k in KEYS) + " |")
    for e in table:
        for split in ("validation", "test"):
            cells = []
            for k in KEYS:
                b, c = e[f"{split} {k} before"], e[f"{split} {k} change"]
                cells.append(f"{b[0]:.4f} | {c[0]:+.4f} ± {c[1]:.4f}")
            print(f"| {e['family']} | {split} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
