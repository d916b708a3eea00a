"""V1 (encoder-decoder) vs V2 (lazy decoder) at matched training-FLOPs budgets on the world.

    .venv/bin/python experiments/v1_vs_v2.py --out runs/v1_vs_v2

For each family's CPU rung (scaling/ladder.py: v1-cpu-s and v2-cpu-s share the pathways and the
decoder shape; V2 has no encoder stack) and each budget, one run trains for
budget / (FLOPs per request x batch) steps (analytic FLOPs, onerec_jax/flops.py) with its own
warmup + cosine schedule, then is scored on the first `--eval-requests` test requests: the
validation NLL per item (summed over the semantic-id levels for both families, whatever the
training loss), Recall@10, NDCG@10 and the world's true engagement@K. Every run is an ordinary
`onerec train` workdir under --out, so an interrupted sweep resumes where it stopped. Both
families read one semantic-id table built once into OUT/tokenizer.

Writes OUT/results.json (rows + loss-vs-FLOPs curves), OUT/results.md (the table) and
OUT/v1_vs_v2.png; `notebooks/v1_vs_v2.ipynb` draws the same from the JSON.

As a config file (`onerec train --config experiments/v1_vs_v2.py`), `get_config()` is the
shared base of every run in the sweep.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import ml_collections

from onerec_jax.config import load_file

RUNGS = ("v1-cpu-s", "v2-cpu-s")
BUDGETS = (1e12, 3e12, 1e13)  # training FLOPs per run


def get_config() -> ml_collections.ConfigDict:
    c = load_file(pathlib.Path(__file__).with_name("v1_world_tiny.py"))
    c.source = "world:small"  # 20,000 items
    c.rung = "v1-cpu-s"  # overridden per run
    c.batch_size = 64  # requests per step
    c.log_every = 10
    c.eval_requests = 2048  # validation requests per eval (standard error ~0.3 % of the loss)
    c.optim.learning_rate = 2e-3  # peak
    return c


def _run_config(rung: str, steps: int, tokenizer: pathlib.Path) -> ml_collections.ConfigDict:
    c = get_config()
    c.rung = rung
    c.steps = steps
    c.tokenizer_dir = str(tokenizer)
    c.checkpoint_every = steps
    c.eval_every = max(10, steps // 10 // 10 * 10)
    c.optim.warmup_steps = min(100, max(steps // 10, 1))
    return c


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
    ap.add_argument("--eval-requests", type=int, default=1024)
    ap.add_argument("--beam", type=int, default=64)
    a = ap.parse_args()

    from onerec_jax import flops
    from onerec_jax.data.sources import open_source
    from onerec_jax.tokenizer import build
    from onerec_jax.tokenizer.semantic_ids import SemanticIds
    from onerec_jax.train import evaluation, loop
    from scaling import ladder

    out = pathlib.Path(a.out).resolve()
    tok = out / "tokenizer"
    base = get_config()
    if not (tok / "semantic_ids.npz").exists():
        tcfg = build.get_config()
        tcfg.seed = base.seed
        build.tokenize(base.source, tok, tcfg, progress=True)
    table = SemanticIds.load(tok)
    src = open_source(base.source, seed=base.seed, split="train")
    rows, curves = [], {}
    for rung in a.rungs:
        probe = ladder.apply_rung(_run_config(rung, 10, tok), rung)
        model = loop.build_model(probe, src, table.vocab)
        per_request = flops.counts(model).flops_train
        scale = table.n_levels if probe.model.loss == "mean" else 1.0  # NLL per item
        for budget in a.budgets:
            steps = max(20, round(budget / (per_request * base.batch_size) / 10) * 10)
            workdir = out / f"{rung}_{budget:.0e}"
            cfg = _run_config(rung, steps, tok)
            print(f"== {rung}, budget {budget:.1e} FLOPs: {steps} steps -> {workdir}", flush=True)
            summary = loop.train(cfg, workdir)
            m = evaluation.evaluate_run(workdir, "test", beam=a.beam, max_requests=a.eval_requests)
            rows.append(
                {
                    "rung": rung,
                    "family": probe.model.family,
                    "budget_flops": budget,
                    "steps": steps,
                    "flops_seen": summary["flops_seen"],
                    "flops_per_request": per_request,
                    "params_total": summary["params_total"],
                    "eval_nll_per_item": summary["final_eval_loss"] * scale,
                    "wall_s": summary["wall_s_this_run"],
                    **{k: m[k] for k in ("recall@10", "ndcg@10", "engagement@1", "engagement@10")},
                    "engagement_logged": m["engagement_logged"],
                }
            )
            curves[f"{rung}_{budget:.0e}"] = _curve(workdir, per_request, base.batch_size, scale)
    result = {"source": base.source, "eval_requests": a.eval_requests, "beam": a.beam}
    result |= {"rows": rows, "curves": curves}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(table_markdown(rows))
    plot(result, out / "v1_vs_v2.png")
    print(table_markdown(rows))


def table_markdown(rows: list[dict]) -> str:
    head = "| rung | budget (FLOPs) | steps | NLL/item | Recall@10 | NDCG@10 | eng@1 | eng@10 |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['rung']} | {r['budget_flops']:.0e} | {r['steps']} | "
            f"{r['eval_nll_per_item']:.3f} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | "
            f"{r['engagement@1']:.3f} | {r['engagement@10']:.3f} |"
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
            axes[0].plot(x, y, color=colors[fam], alpha=0.7, label=name)
    axes[0].set(xscale="log", xlabel="training FLOPs", ylabel="validation NLL per item")
    axes[0].legend(fontsize=7)
    for fam in ("v1", "v2"):
        rs = [r for r in result["rows"] if r["family"] == fam]
        if not rs:
            continue
        b = [r["budget_flops"] for r in rs]
        axes[1].plot(b, [r["recall@10"] for r in rs], "o-", color=colors[fam], label=fam)
        axes[2].plot(b, [r["engagement@10"] for r in rs], "o-", color=colors[fam], label=fam)
    logged = [r["engagement_logged"] for r in result["rows"]]
    if logged:
        axes[2].axhline(logged[0], color="gray", ls="--", label="logged items")
    axes[1].set(xscale="log", xlabel="training FLOPs budget", ylabel="Recall@10")
    axes[2].set(xscale="log", xlabel="training FLOPs budget", ylabel="true engagement@10")
    for ax in axes[1:]:
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


if __name__ == "__main__":
    main()
