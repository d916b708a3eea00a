"""V1 (encoder-decoder) vs V2 (lazy decoder) at matched training-FLOPs budgets on the world.

    .venv/bin/python experiments/v1_vs_v2.py --out runs/v1_vs_v2 --seeds 0 1 2

For each family's CPU rung (onerec_jax/model/rungs.py: v1-cpu-s and v2-cpu-s share the pathways and
the decoder shape; V2 has no encoder stack), each budget and each seed, one run trains for
budget / (FLOPs per request x batch) steps (analytic FLOPs, onerec_jax/flops.py) with its own
warmup + cosine schedule, then is scored: the NLL per item (summed over the semantic-id
levels) on the first `eval_requests` (2,048) validation requests, and Recall@10, NDCG@10 and the
world's true engagement@K on the first `--eval-requests` test requests.

Fair optimisation: both families train the same loss (the mean over the semantic-id levels; V1's
report sums them, which makes its gradients Q times larger and clips them more often at the same
`clip_norm`), at the same learning rate, warmup and clipping. All runs read one world
(`world_seed` 0) and one semantic-id table; the seed changes the initialisation and the order of
the training requests. Each cell is reported as the mean over seeds with its standard error,
and a V2 - V1 difference is called out only when it lies outside the 95 % Welch t interval of
no difference (with 3 seeds a side, about 2.8 standard errors; 15 comparisons are made, so one
call at that level can still be chance).

Every run is an ordinary `onerec train` workdir under --out, so an interrupted sweep resumes
where it stopped. Writes OUT/results.json (per-seed rows, per-cell means, differences and the
loss-vs-FLOPs curves), OUT/results.md (the table) and OUT/v1_vs_v2.png; `notebooks/v1_vs_v2.ipynb`
draws the same from the JSON.

As a config file (`onerec train --config experiments/v1_vs_v2.py`), `get_config()` is the
shared base of every run in the sweep (onerec_jax/configs/v1_vs_v2.py).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import ml_collections
import numpy as np

from onerec_jax import config
from onerec_jax.configs.v1_vs_v2 import get_config

RUNGS = ("v1-cpu-s", "v2-cpu-s")
BUDGETS = (1e12, 3e12, 1e13)  # training FLOPs per run
SEEDS = (0, 1, 2)
METRICS = ("eval_nll_per_item", "recall@10", "ndcg@10", "engagement@1", "engagement@10")


def _run_config(
    rung: str, steps: int, tokenizer: pathlib.Path, seed: int = 0
) -> ml_collections.ConfigDict:
    c = get_config()
    c.rung = rung
    c.seed = seed
    c.steps = steps
    c.tokenizer_dir = str(tokenizer)
    c.checkpoint_every = steps
    c.eval_every = max(10, steps // 5 // 10 * 10)
    c.optim.warmup_steps = min(100, max(steps // 10, 1))
    return config.resolve(c)


def _test_metrics(workdir: pathlib.Path, step: int, beam: int, requests: int) -> dict:
    """`onerec eval` on the test split, or its saved result when it scored this very checkpoint
    with the same beam and requests (a resumed sweep does not evaluate finished runs again)."""
    from onerec_jax import evaluate

    saved = evaluate.eval_path(workdir, "test", requests, beam)
    if saved.exists():
        m = json.loads(saved.read_text())
        if (m.get("step"), m.get("beam"), m.get("n_requests")) == (step, beam, requests):
            return m
    return evaluate.evaluate_run(workdir, "test", beam=beam, max_requests=requests)


def _curve(workdir: pathlib.Path, per_request: float, batch: int, scale: float) -> list:
    """(training FLOPs, validation NLL per item) at every logged eval of a run."""
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval/loss" in r:
            out.append((r["step"] * batch * per_request, r["eval/loss"] * scale))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/v1_vs_v2")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--rungs", nargs="+", default=list(RUNGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--eval-requests", type=int, default=1024)
    ap.add_argument("--beam", type=int, default=64)
    a = ap.parse_args()

    from onerec_jax import flops
    from onerec_jax.data.sources import open_source
    from onerec_jax.tokenizer import build
    from onerec_jax.tokenizer.semantic_ids import SemanticIds
    from onerec_jax.train import loop
    from onerec_jax.train.model_factory import build_model

    out = pathlib.Path(a.out).resolve()
    tok = out / "tokenizer"
    base = get_config()
    if not (tok / "semantic_ids.npz").exists():
        tcfg = build.get_config()
        tcfg.seed = base.world_seed
        build.tokenize(base.source, tok, tcfg, progress=True)
    table = SemanticIds.load(tok)
    src = open_source(base.source, seed=base.world_seed, split="train")
    rows, curves = [], {}
    for rung in a.rungs:
        probe = _run_config(rung, 10, tok)
        model = build_model(probe, src, table.vocab)
        per_request = flops.counts(model).flops_train
        mean_loss = probe.model[probe.model.family].loss == "mean"
        scale = table.n_levels if mean_loss else 1.0  # NLL per item
        for budget in a.budgets:
            steps = max(20, round(budget / (per_request * base.batch_size) / 10) * 10)
            for seed in a.seeds:
                workdir = out / f"{rung}_{budget:.0e}_seed{seed}"
                cfg = _run_config(rung, steps, tok, seed)
                print(f"== {rung}, budget {budget:.1e}, seed {seed}: {steps} steps", flush=True)
                summary = loop.train(cfg, workdir)
                m = _test_metrics(workdir, summary["step"], a.beam, a.eval_requests)
                rows.append(
                    {
                        "rung": rung,
                        "family": probe.model.family,
                        "budget_flops": budget,
                        "seed": seed,
                        "steps": steps,
                        "flops_seen": summary["flops_seen"],
                        "flops_per_request": per_request,
                        "params_total": summary["params_total"],
                        "eval_nll_per_item": summary["final_eval_loss"] * scale,
                        "eval_nll_se": summary["final_eval_loss_se"] * scale,
                        "wall_s": summary["wall_s_total"],
                        **{k: m[k] for k in METRICS[1:]},
                        "engagement_logged": m["engagement_logged"],
                    }
                )
                curves[workdir.name] = _curve(workdir, per_request, base.batch_size, scale)
    result = {"source": base.source, "eval_requests": a.eval_requests, "beam": a.beam}
    result |= {"seeds": a.seeds, "rows": rows, "curves": curves}
    result |= {"cells": cells(rows), "differences": differences(rows)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(table_markdown(rows))
    plot(result, out / "v1_vs_v2.png")
    print(table_markdown(rows))
    print(differences_text(result))


def cells(rows: list[dict]) -> list[dict]:
    """Per (rung, budget): every metric's mean over seeds and its standard error (std / sqrt n,
    n the number of seeds; NaN for one seed)."""
    out = []
    for key in sorted({(r["rung"], r["family"], r["budget_flops"]) for r in rows}):
        rs = [r for r in rows if (r["rung"], r["family"], r["budget_flops"]) == key]
        cell = {"rung": key[0], "family": key[1], "budget_flops": key[2], "n_seeds": len(rs)}
        cell["steps"] = rs[0]["steps"]
        for m in (*METRICS, "wall_s"):
            x = np.asarray([r[m] for r in rs], np.float64)
            cell[m] = float(x.mean())
            cell[f"{m}_se"] = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else np.nan
        out.append(cell)
    return out


def differences(rows: list[dict]) -> list[dict]:
    """V2 - V1 at each budget both reached: the difference of the seed means, its standard
    error sqrt(se1^2 + se2^2), Welch's degrees of freedom, and `beyond_spread` when
    |difference| exceeds the two-sided 95 % t quantile times that error."""
    from scipy import stats

    by = {(c["family"], c["budget_flops"]): c for c in cells(rows)}
    out = []
    for b in sorted({c["budget_flops"] for c in by.values()}):
        if ("v1", b) not in by or ("v2", b) not in by:
            continue
        v1, v2 = by[("v1", b)], by[("v2", b)]
        for m in METRICS:
            d = v2[m] - v1[m]
            a2, b2 = v1[f"{m}_se"] ** 2, v2[f"{m}_se"] ** 2
            se = float(np.sqrt(a2 + b2))
            den = a2**2 / max(v1["n_seeds"] - 1, 1) + b2**2 / max(v2["n_seeds"] - 1, 1)
            dof = float((a2 + b2) ** 2 / den) if den > 0 else float("nan")
            t = float(stats.t.ppf(0.975, dof)) if np.isfinite(dof) else float("nan")
            out.append(
                {
                    "budget_flops": b,
                    "metric": m,
                    "v2_minus_v1": d,
                    "se": se,
                    "dof": dof,
                    "t_95": t,
                    "beyond_spread": bool(np.isfinite(t) and abs(d) > t * se),
                }
            )
    return out


def differences_text(result: dict) -> str:
    lines = []
    for d in result["differences"]:
        flag = "beyond the 95 % t interval" if d["beyond_spread"] else "within seed spread"
        lines.append(
            f"budget {d['budget_flops']:.0e}: {d['metric']} V2 - V1 = "
            f"{d['v2_minus_v1']:+.4f} ± {d['se']:.4f} ({flag})"
        )
    return "\n".join(lines)


def table_markdown(rows: list[dict]) -> str:
    """Means over seeds ± their standard errors, one line per (rung, budget)."""

    def f(c: dict, m: str, digits: int) -> str:
        return f"{c[m]:.{digits}f} ± {c[m + '_se']:.{digits}f}"

    head = (
        "| rung | budget (FLOPs) | steps | seeds | NLL/item | Recall@10 | NDCG@10 | eng@1 "
        "| eng@10 |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for c in cells(rows):
        lines.append(
            f"| {c['rung']} | {c['budget_flops']:.0e} | {c['steps']} | {c['n_seeds']} | "
            f"{f(c, 'eval_nll_per_item', 3)} | {f(c, 'recall@10', 4)} | {f(c, 'ndcg@10', 4)} | "
            f"{f(c, 'engagement@1', 3)} | {f(c, 'engagement@10', 3)} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path | None = None):
    """Validation NLL per item against training FLOPs (every run's curve), and Recall@10 /
    engagement@10 at each budget. Returns the matplotlib figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"v1": "tab:blue", "v2": "tab:orange"}
    for name, pts in result["curves"].items():
        if pts:
            fam = "v2" if name.startswith("v2") else "v1"
            x, y = zip(*pts, strict=True)
            axes[0].plot(x, y, color=colors[fam], alpha=0.5, lw=1)
    axes[0].set(xscale="log", xlabel="training FLOPs", ylabel="validation NLL per item")
    handles = [plt.Line2D([], [], color=c, label=f) for f, c in colors.items()]
    axes[0].legend(handles=handles, title="one line per run")
    for fam in ("v1", "v2"):
        cs = [c for c in cells(result["rows"]) if c["family"] == fam]
        if not cs:
            continue
        b = [c["budget_flops"] for c in cs]
        for ax, m in ((axes[1], "recall@10"), (axes[2], "engagement@10")):
            y, e = [c[m] for c in cs], [np.nan_to_num(c[m + "_se"]) for c in cs]
            ax.errorbar(b, y, yerr=e, fmt="o-", capsize=3, color=colors[fam], label=fam)
    logged = [r["engagement_logged"] for r in result["rows"]]
    if logged:
        axes[2].axhline(logged[0], color="gray", ls="--", label="logged items")
    axes[1].set(xscale="log", xlabel="training FLOPs budget", ylabel="Recall@10 (± SE over seeds)")
    axes[2].set(xscale="log", xlabel="training FLOPs budget", ylabel="true engagement@10")
    for ax in axes[1:]:
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


if __name__ == "__main__":
    main()
