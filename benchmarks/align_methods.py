"""What each alignment method does to the world's TRUE reward, over seeds, for V1 and V2.

For each family and seed: pre-train the default (tiny-world) config with that seed (a seed is
a whole world: items, users, the init), fit a P-Score reward model on its logged feedback
(`onerec reward-model`), then align it with every method against the true reward (RSFT: no
reward, the logged play time), GBPO again with duration-aware shaping, and ECPO against the
reward model and against logged feedback (`onerec align`, the same seed and settings). The
before/after numbers (true reward, Recall, the reward model's score of the same lists) are
measured by the align run itself on the same validation requests. A finished run is read
back only if it was made with the settings asked for.
Reports, per family and method, the mean change of the true expected reward of the top-10 and
top-1 recommendations, Recall@10 before/after, the rollouts' legality rate, each with a 95 %
t-interval over seeds. Writes benchmarks/results/align_methods.json and prints a Markdown table.

    .venv/bin/python benchmarks/align_methods.py [--families v1 v2] [--seeds 3] [--out runs/align]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
from scipy import stats

from onerec_jax.rl import align_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("ecpo", "gbpo", "gppo", "dpo", "rsft")
KEY = ("family", "method", "reward", "advantage", "extra")
ONEREC = [sys.executable, "-m", "onerec_jax.cli"]


def _run(args: list[str]) -> dict:
    out = subprocess.run([*ONEREC, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"onerec {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _reuse(done: pathlib.Path, record: pathlib.Path, want: dict, where: str) -> bool:
    """Whether a finished run (`done` exists) can be read back: its `record` JSON must hold
    the settings asked for now (`where` a dotted path into it); a mismatch is an error, not a
    silent reuse of numbers made with other settings."""
    if not done.exists():
        return False
    have = json.loads(record.read_text())
    for part in where.split(".") if where else []:
        have = have[part]
    if where == "align":  # a field added since the run was made: it ran with the default
        have = {**align_config.get_config().to_dict(), **have}
    bad = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if bad:
        raise RuntimeError(f"{done.parent}: made with other settings {bad}; use a new --out")
    return True


# Rollout settings beyond the defaults (beam rollouts, old policy refreshed every update):
# rollouts sampled freely from the policy and judged by the format reward, and an old
# policy kept for 4 updates, where ECPO's and GPPO's clipping first differ (with refresh 1
# every ratio is exactly 1 at the update, so the two give identical runs).
EXTRA = {
    "free": {"rollout": "sample", "trie": False},
    "r4": {"refresh": 4, "checkpoint_every": 20},
}


def variants(methods: list[str]) -> list[tuple[str, str, str, str]]:
    """(method, reward, advantage, extra) of every run per seed: each method against the true
    reward with group advantages, GBPO with duration-aware shaping, ECPO against the reward
    model (where reward hacking would show) and against logged feedback alone (a rollout
    earns the request's logged feedback when it is a logged target, else 0), then ECPO with
    free sampled rollouts and
    ECPO and GPPO with a stale old policy (`EXTRA`)."""
    out = [(m, "true", "group", "") for m in methods]
    if "gbpo" in methods:
        out.append(("gbpo", "true", "duration", ""))
    out.append(("ecpo", "model", "group", ""))
    out.append(("ecpo", "logged", "group", ""))
    if "ecpo" in methods:
        out += [("ecpo", "true", "group", x) for x in ("free", "r4")]
    if "gppo" in methods:
        out.append(("gppo", "true", "group", "r4"))
    return out


def interval(x: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval."""
    a = np.asarray(x, np.float64)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["v1", "v2"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pre-steps", type=int, default=300)
    ap.add_argument("--align-steps", type=int, default=60)
    ap.add_argument("--rm-steps", type=int, default=300, help="reward-model fitting steps")
    ap.add_argument("--learning-rate", type=float, default=3e-4)
    ap.add_argument("--eval-requests", type=int, default=512)
    ap.add_argument("--out", default="runs/align_methods")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "align_methods.json"))
    a = ap.parse_args()
    out = pathlib.Path(a.out).resolve()  # the runs' subprocesses work in the repository root
    rows = []
    for family in a.families:
        for seed in range(a.seeds):
            pre = out / f"{family}_pre_s{seed}"
            if _reuse(pre / "summary.json", pre / "summary.json", {"status": "finished"}, ""):
                cfg = json.loads((pre / "config.json").read_text())
                if cfg["steps"] != a.pre_steps:
                    raise RuntimeError(f"{pre}: pre-trained for {cfg['steps']} steps; new --out")
            else:
                _run(
                    [
                        *("train", "--config", "default", "--workdir", str(pre)),
                        *(f"--config.model.family={family}", f"--config.seed={seed}"),
                        *(f"--config.steps={a.pre_steps}", "--config.eval_requests=0"),
                    ]
                )
            rm_dir = out / f"{family}_rm_s{seed}"
            rm_json = rm_dir / "reward_model.json"
            if not _reuse(rm_json, rm_json, {"steps": a.rm_steps}, ""):
                _run(
                    [
                        *("reward-model", "--init", str(pre), "--out", str(rm_dir)),
                        *("--steps", str(a.rm_steps), "--seed", str(seed)),
                    ]
                )
            rm_eval = json.loads((rm_dir / "reward_model.json").read_text())["eval"]
            for method, reward, adv, extra in variants(a.methods):
                suffix = {"model": "_rm", "logged": "_logged"}.get(reward, "")
                suffix += "_dur" if adv == "duration" else ""
                suffix += f"_{extra}" if extra else ""
                name = f"{family}_{method}{suffix}_s{seed}"
                want = {"steps": a.align_steps, "learning_rate": a.learning_rate, "seed": seed}
                want.update(eval_requests=a.eval_requests, reward=reward, advantage=adv)
                want.update({"rollout": "beam", "trie": True, "refresh": 1})
                want.update(EXTRA.get(extra, {}))
                done = out / name / "summary.json"  # a finished run is read, not redone
                s = (
                    json.loads(done.read_text())
                    if _reuse(done, out / name / "align.json", want, "align")
                    else _run(
                        [
                            *("align", "--method", method, "--init", str(pre)),
                            *("--workdir", str(out / name)),
                            *(f"--config.seed={seed}", f"--config.steps={a.align_steps}"),
                            f"--config.learning_rate={a.learning_rate}",
                            f"--config.eval_requests={a.eval_requests}",
                            f"--config.reward={reward}",
                            f"--config.advantage={adv}",
                            f"--config.reward_model={rm_dir}",
                            *(f"--config.{k}={v}" for k, v in EXTRA.get(extra, {}).items()),
                        ]
                    )
                )
                lines = (out / name / "metrics.jsonl").read_text().splitlines()
                metrics = [json.loads(x) for x in lines]
                row = {"family": family, "method": method, "reward": reward, "seed": seed}
                row["advantage"] = adv
                row["extra"] = extra
                row["rm_corr_true_reward"] = rm_eval.get("corr_true_reward/random")
                for k in ("engagement@1", "engagement@10", "recall@10", "reward_model@10"):
                    row[f"{k} before"] = s["before"][k]
                    row[f"{k} after"] = s["after"][k]
                legal = [m["align/legal_rate"] for m in metrics if "align/legal_rate" in m]
                row["legal_rate"] = float(np.mean(legal)) if legal else float("nan")  # RSFT
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = []
    for family in a.families:
        for method, reward, adv, extra in variants(a.methods):
            key = (family, method, reward, adv, extra)
            rs = [r for r in rows if tuple(r[k] for k in KEY) == key]
            entry = {"family": family, "method": method, "reward": reward, "advantage": adv}
            entry["extra"] = extra
            entry["seeds"] = len(rs)
            for k in ("engagement@10", "engagement@1", "recall@10", "reward_model@10"):
                entry[f"{k} change"] = interval([r[f"{k} after"] - r[f"{k} before"] for r in rs])
                entry[f"{k} before"] = interval([r[f"{k} before"] for r in rs])
            entry["legal_rate"] = interval([r["legal_rate"] for r in rs])
            table.append(entry)
    result = {"command": " ".join(sys.argv), "settings": vars(a), "rows": rows, "table": table}
    pathlib.Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("engagement@10", "engagement@1", "recall@10", "reward_model@10")
    print(
        "| family | method (reward, advantage) | true reward@10 before | change | "
        "true reward@1 change | Recall@10 change | reward model@10 change | legality |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for e in table:
        ch = {k: "{:+.3f} ± {:.3f}".format(*e[f"{k} change"]) for k in keys}
        print(
            f"| {e['family']} | {e['method']} ({e['reward']}, {e['advantage']}, "
            f"{e['extra'] or 'beam'}) | "
            f"{e['engagement@10 before'][0]:.3f} | {ch['engagement@10']} | "
            f"{ch['engagement@1']} | {ch['recall@10']} | {ch['reward_model@10']} | "
            f"{e['legal_rate'][0]:.2f} |"
        )


if __name__ == "__main__":
    main()
