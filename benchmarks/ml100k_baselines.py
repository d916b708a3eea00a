"""Every baseline on a logged source, tuned on validation and scored on test: the baseline rows
of the README's MovieLens table (`onerec baseline NAME` for each, in one process).

    .venv/bin/python benchmarks/ml100k_baselines.py [--source movielens-100k]
        [--only sasrec bpr] [--seeds 3] [--json benchmarks/results/ml100k_baselines.json]

Leave-last-out, full ranking on the source's protocol (`onerec_jax.ranking.protocol_of`, the one
`onerec eval` scores V1 and V2 with). Each baseline is fitted on training events only (a user's
last two events are held out), its grid searched on the validation split; the test split is
read once per kept setting and seed. A result already in --json for the same source is kept
unless --only names it again.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from onerec_jax.baselines import ABOUT, tune

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="movielens-100k")
    p.add_argument("--only", nargs="+", choices=sorted(ABOUT), default=list(ABOUT))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/ml100k_baselines.json"))
    a = p.parse_args()
    path = pathlib.Path(a.json)
    old = json.loads(path.read_text()) if path.exists() else {}
    results = old.get("results", {}) if old.get("source") == a.source else {}
    for name in a.only:
        results[name] = tune.run(name, a.source, seeds=a.seeds)
        tune.write(str(path), {"source": a.source, "results": results})
    print("| baseline | Recall@10 | NDCG@10 | Recall@50 | settings (chosen on validation) |")
    print("|---|---|---|---|---|")
    for name in ABOUT:
        if name not in results:
            continue
        r = results[name]
        m, sd = r["test_mean"], r["test_sd"]
        cell = {
            k: f"{m[k]:.4f}" + (f" ± {sd[k]:.4f}" if r["seeds"] > 1 else "")
            for k in ("recall@10", "ndcg@10", "recall@50")
        }
        chosen = dict(r["params"])
        if "epochs" in r["test"][0]["chosen"]:  # each seed's, chosen on validation
            chosen["epochs"] = [t["chosen"]["epochs"] for t in r["test"]]
        print(
            f"| {name} | {cell['recall@10']} | {cell['ndcg@10']} | {cell['recall@50']} | "
            f"{json.dumps(chosen, sort_keys=True)} |"
        )


if __name__ == "__main__":
    main()
