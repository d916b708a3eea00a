"""OneMall on the e-commerce world, end to end: one model per scenario against one unified
model, the behaviour-fusion ablation, and the unified model after RL - judged per scenario on
the same held-out test requests by Recall/NDCG and the world's true expected orders and GMV.

    .venv/bin/python experiments/onemall_world.py [--seeds 1 2 3] [--arms ...] [--out runs/onemall]
        [--json benchmarks/results/onemall_world.json] [--requests 1024] [--beam 128]

Per seed (a seed is a whole world, its tokenizer and every model's init), each arm trains with
onerec_jax/configs/onemall_tiny.py and the same step count:
  unified      one model for the three scenarios (scenario token, behaviour pathways fused by
               cross-attention, QFormer, sparse-MoE decoder)
  card, video, live   one model per scenario, trained on that scenario's requests only
               (world:mall-tiny:SCENARIO); three models, three times the unified compute
  merged       the unified model without behaviour pathways: one merged exposure sequence
               (the click/cart/order flags as features of each event)
  concat       behaviour pathways appended without cross-attention (not in the default arms)
  unified_rl   the unified model aligned (onerec align, ECPO, 60 updates of 16 requests x 16
               beam rollouts, lr 3e-4) with the ranking model as reward (onerec reward-model:
               chained click -> cart -> order heads fit on the unified run's training
               requests; its score weighs P(click), P(cart), P(order) 1 : 3 : 10 as the world's
               true reward does)
  unified_rl_gmv       the same alignment against the ranking model's expected GMV,
               price x P(order) (not in the default arms)
  unified_rl_true_gmv  the same alignment against the world's exact expected GMV: what RL
               reaches when the reward is right (an oracle; not in the default arms)
Every arm shares the unified run's semantic-id table, so differences are not tokenizer noise.
Each model is evaluated on each scenario's first `--requests` test requests (`onerec eval
--scenario`, the same requests for every arm), and the table reports mean ± 95 % t-interval
over seeds and the paired differences against the unified model. Finished runs and
evaluations are read back (a training run only when made with the config asked for, an
evaluation only of the run's newest step; the results JSON refuses another protocol, ranking
model or alignment setting), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
from scipy import stats

# The unified model's config: `onerec train --config experiments/onemall_world.py` trains it.
from onerec_jax.configs.onemall_tiny import get_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONEREC = [sys.executable, "-m", "onerec_jax.cli"]
SCENARIOS = ("card", "video", "live")
KEYS = ("recall@10", "ndcg@10", "orders@10", "gmv@10")
ARMS = {
    "unified": [],
    "card": ["source=world:mall-tiny:card"],
    "video": ["source=world:mall-tiny:video"],
    "live": ["source=world:mall-tiny:live"],
    "merged": ["data.click_len=0", "data.cart_len=0", "data.order_len=0"],
    "concat": ["model.v1.encoder.behaviour_fusion=concat"],
    "unified_rl": [],  # aligned from the unified run (`align`)
    "unified_rl_gmv": ["objective=gmv"],  # ... against the ranking model's price x P(order)
    "unified_rl_true_gmv": ["objective=gmv", "reward=true"],  # ... against the exact GMV
}
__all__ = ["get_config", "main"]
DEFAULT_ARMS = ("unified", "card", "video", "live", "merged", "unified_rl")
RM_ARGS = ["--steps", "300", "--batch-size", "64", "--eval-requests", "1024"]
ALIGN = ["steps=60", "batch_size=16", "group=16", "learning_rate=3e-4", "eval_requests=256"]


def _onerec(args: list[str], log: pathlib.Path) -> str:
    with log.open("a") as f:
        out = subprocess.run([*ONEREC, *args], stdout=subprocess.PIPE, stderr=f, text=True)
    if out.returncode:
        raise RuntimeError(f"onerec {' '.join(args)} failed (exit {out.returncode}); see {log}")
    return out.stdout


def train(work: pathlib.Path, overrides: list[str], log: pathlib.Path) -> None:
    """Train (or resume, or read back) one arm; a finished run made with another config is
    refused by the workdir guard rather than read back."""
    done = work / "summary.json"
    if done.exists() and json.loads(done.read_text()).get("status") == "finished":
        from onerec_jax import config
        from onerec_jax.train.run_config import check_workdir_config

        want = config.resolve(config.load("onemall_tiny"), overrides)
        check_workdir_config(want, work, write=False)
        return
    sets = [f"--config.{o}" for o in overrides]
    _onerec(["train", "--config", "onemall_tiny", "--workdir", str(work), *sets], log)


def align(base: pathlib.Path, work: pathlib.Path, log: pathlib.Path, extra: list[str]) -> None:
    """Fit the ranking model on the unified run and align that run against it, or against
    what `extra` sets (both read back when finished)."""
    rm = base.parent / f"{base.name}_ranking"
    if not (rm / "reward_model.json").exists():
        _onerec(["reward-model", "--init", str(base), "--out", str(rm), *RM_ARGS], log)
    done = work / "summary.json"
    if done.exists() and json.loads(done.read_text()).get("status") == "finished":
        return
    sets = [f"--config.{o}" for o in [*ALIGN, "reward=model", f"reward_model={rm}", *extra]]
    _onerec(["align", "--method", "ecpo", "--init", str(base), "--workdir", str(work), *sets], log)


def evaluate(work: pathlib.Path, scenario: str, a: argparse.Namespace, log: pathlib.Path) -> dict:
    from onerec_jax.evaluate import eval_path

    saved = eval_path(work, "test", a.requests, a.beam, scenario)
    summary = json.loads((work / "summary.json").read_text())
    step = summary.get("step", summary.get("steps"))  # a training run's, an alignment's
    if not saved.exists() or json.loads(saved.read_text()).get("step") != step:
        _onerec(
            [
                *("eval", "--workdir", str(work), "--split", "test", "--scenario", scenario),
                *("--max-requests", str(a.requests), "--beam", str(a.beam), "--json"),
            ],
            log,
        )
    return json.loads(saved.read_text())


def interval(x: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (nan with one value)."""
    v = np.asarray(x, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def ranking_table(results: dict) -> str:
    """Markdown: the ranking model's AUC per task, overall and per scenario, beside the AUC of
    the world's own probabilities (mean ± 95 % interval over seeds)."""
    rows = [r["ranking_model"] for r in results["per_seed"].values() if "ranking_model" in r]
    if not rows:
        return ""
    lines = [
        "| AUC | all | card | video | live | world's own probabilities |",
        "|---|---|---|---|---|---|",
    ]
    for task in ("click", "cart", "order"):
        cells = []
        for key in (
            f"auc/{task}",
            *(f"auc/{task}/{s}" for s in SCENARIOS),
            f"auc_true_probability/{task}",
        ):
            vals = [r[key] for r in rows if key in r]
            m, h = interval(vals) if vals else (float("nan"), float("nan"))
            cells.append(f"{m:.3f} ± {h:.3f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: dict, arms: list[str]) -> str:
    """Markdown: per scenario and arm, mean ± 95 % interval over seeds, then paired
    differences against the unified model."""
    seeds = sorted(results["per_seed"])
    lines = [
        f"seeds {', '.join(seeds)}; {results['requests']} test requests per scenario, "
        f"beam {results['beam']}",
        "",
        "| scenario | model | " + " | ".join(KEYS) + " |",
        "|---|---|" + "---|" * len(KEYS),
    ]
    for scen in SCENARIOS:
        for arm in arms:
            if arm in SCENARIOS and arm != scen:
                continue
            rows = [results["per_seed"][s].get(arm, {}).get(scen) for s in seeds]
            if any(r is None for r in rows):
                continue
            cells = []
            for k in KEYS:
                m, h = interval([r[k] for r in rows])
                cells.append(f"{m:.4g} ± {h:.2g}")
            name = "per-scenario" if arm in SCENARIOS else arm
            lines.append(f"| {scen} | {name} | " + " | ".join(cells) + " |")
        for arm in arms:
            if arm == "unified" or (arm in SCENARIOS and arm != scen):
                continue
            per = [results["per_seed"][s] for s in seeds]
            pairs = [(r.get(arm, {}).get(scen), r.get("unified", {}).get(scen)) for r in per]
            if any(x is None or u is None for x, u in pairs):
                continue
            cells = []
            for k in KEYS:
                m, h = interval([x[k] - u[k] for x, u in pairs])
                cells.append(f"{m:+.4g} ± {h:.2g}")
            name = "per-scenario" if arm in SCENARIOS else arm
            lines.append(f"| {scen} | {name} − unified | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    p.add_argument("--out", default="runs/onemall")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/onemall_world.json"))
    p.add_argument("--requests", type=int, default=1024, help="test requests per scenario")
    p.add_argument("--beam", type=int, default=128)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="every arm")
    a = p.parse_args()
    out = pathlib.Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = pathlib.Path(a.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    protocol = {
        "requests": a.requests,
        "beam": a.beam,
        "overrides": a.set,
        "ranking_model": RM_ARGS,
        "align": ALIGN,
    }
    if results and any(results.get(k) != v for k, v in protocol.items()):
        raise SystemExit(f"{path} holds another protocol; give another --json")
    results.update(protocol, config="onerec_jax/configs/onemall_tiny.py")
    results.setdefault("per_seed", {})
    for seed in a.seeds:
        log = out / f"s{seed}.log"
        base = out / f"s{seed}_unified"
        row = results["per_seed"].setdefault(str(seed), {})
        for arm in ["unified", *[x for x in a.arms if x != "unified"]]:
            work = out / f"s{seed}_{arm}"
            shared = [] if arm == "unified" else [f"tokenizer_dir={base / 'tokenizer'}"]
            if arm.startswith("unified_rl"):
                align(base, work, log, ARMS[arm])
                meta = json.loads((out / f"s{seed}_unified_ranking/reward_model.json").read_text())
                row["ranking_model"] = {
                    k: v for k, v in meta["eval"].items() if k.startswith(("auc", "calibration"))
                }
            else:
                train(work, [f"seed={seed}", *shared, *ARMS[arm], *a.set], log)
            scens = [arm] if arm in SCENARIOS else list(SCENARIOS)
            row[arm] = {}
            for scen in scens:
                ev = evaluate(work, scen, a, log)
                row[arm][scen] = {k: ev[k] for k in (*KEYS, "engagement@10", "n_requests")}
            print(seed, arm, json.dumps(row[arm]), flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(table(results, a.arms))
    print(ranking_table(results))


if __name__ == "__main__":
    main()
