"""The notebooks run top to bottom on a small results file."""

import json
import math
import os
import pathlib
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fake_results(path: pathlib.Path) -> None:
    rows, curves = [], {}
    for fam, nll in (("v1", 7.0), ("v2", 6.8)):
        for i, budget in enumerate((1e12, 3e12)):
            for seed in (0, 1, 2):
                rung = f"{fam}-cpu-s"
                rows.append(
                    {
                        "rung": rung,
                        "family": fam,
                        "budget_flops": budget,
                        "seed": seed,
                        "steps": 100 * (i + 1),
                        "flops_seen": budget,
                        "flops_per_request": 6e7,
                        "params_total": 2_000_000,
                        # seed spread +-0.01 around nll - i: V2 - V1 is -0.200 +- 0.008
                        "eval_nll_per_item": nll - i + 0.01 * (seed - 1),
                        "eval_nll_se": 0.01,
                        "wall_s": 10.0,
                        # recall differs by 0.001 with a seed spread of 0.01: not beyond it
                        "recall@10": 0.05 + 0.01 * i + 0.001 * (fam == "v2") + 0.01 * seed,
                        "ndcg@10": 0.03,
                        "engagement@1": 1.0,
                        "engagement@10": 0.9,
                        "engagement_logged": 1.1,
                    }
                )
                curves[f"{rung}_{budget:.0e}_seed{seed}"] = [
                    [budget / 2, nll + 0.5],
                    [budget, nll - i],
                ]
    payload = {"source": "world:small", "eval_requests": 8, "beam": 8, "seeds": [0, 1, 2]}
    path.write_text(json.dumps(payload | {"rows": rows, "curves": curves}))


def test_v1_vs_v2_notebook_executes(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    _fake_results(results)
    monkeypatch.setenv("ONEREC_V1V2_RESULTS", str(results))
    nb = nbformat.read(ROOT / "notebooks" / "v1_vs_v2.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "12 runs (3 seeds) on world:small" in text
    # The equal-budget differences are computed from the per-seed rows: V2 - V1 NLL is -0.2 at
    # both budgets with a standard error of 0.0082 (Welch: 4 degrees of freedom, t = 2.78),
    # beyond the spread; Recall's +0.001 is not.
    assert text.count("eval_nll_per_item V2 - V1 = -0.2000 ± 0.0082 (beyond the 95 % t") == 2
    assert text.count("recall@10 V2 - V1 = +0.0010 ± 0.0082 (within seed spread)") == 2
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the plot cell drew nothing"
    assert os.environ["ONEREC_V1V2_RESULTS"] == str(results)


def test_scaling_laws_notebook_executes(tmp_path, monkeypatch):
    # Two families, 6 rungs each on L = E + A / N^alpha (noise 0.2 %), on a world whose entropy
    # floor is 3.3 nats/item; the fits land within ~0.5 % of E (measured 3.999, 3.603).
    true_e = {"v1": 4.0, "v2": 3.6}
    rng = np.random.default_rng(0)
    rows = []
    for fam, (A, alpha) in (("v1", (30.0, 0.30)), ("v2", (25.0, 0.35))):
        for i, n in enumerate(np.geomspace(1e5, 1e8, 6)):
            loss = (true_e[fam] + A / n**alpha) * math.exp(rng.normal(0, 0.002))
            rows.append(
                {
                    "point": f"{fam}-{i}",
                    "family": fam,
                    "rung": f"{fam}-{i}",
                    "seed": 0,
                    "n_active": n,
                    "tokens": 1e9,
                    "flops": 6e9 * n,
                    "loss": loss,
                    "loss_se": 0.01,
                    "repeated_data": False,
                    "entropy_floor": 3.3,
                }
            )
    table = tmp_path / "results.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("ONEREC_RESULTS", str(table))
    monkeypatch.setenv("ONEREC_BOOTSTRAP", "10")
    nb = nbformat.read(ROOT / "notebooks" / "scaling_laws.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "v1: 6 runs (0 repeated data)" in text and "v2: 6 runs" in text, text
    for fam, e in true_e.items():
        fitted = re.search(rf"^{fam} power-n: L\(N\) = E \+ A / N\^alpha over 6 runs: "
                           rf"E = ([\d.]+) \[([\d.]+), ([\d.]+)\]", text, re.M)  # fmt: skip
        assert fitted, text
        assert abs(float(fitted[1]) - e) < 0.04 and float(fitted[2]) <= float(fitted[3])
        floor = re.search(rf"^{fam}: E = ([\d.]+) nats/item vs world entropy floor 3\.300: "
                          rf"gap ([\d.-]+)$", text, re.M)  # fmt: skip
        assert floor and float(floor[2]) == pytest.approx(float(floor[1]) - 3.3, abs=2e-3), text
    assert "chinchilla: not fitted: one token count" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the figure cell drew nothing"
