"""The notebooks run top to bottom on a small results file."""

import json
import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fake_results(path: pathlib.Path) -> None:
    rows, curves = [], {}
    for fam, nll in (("v1", 7.0), ("v2", 6.8)):
        for i, budget in enumerate((1e12, 3e12)):
            rung = f"{fam}-cpu-s"
            rows.append(
                {
                    "rung": rung,
                    "family": fam,
                    "budget_flops": budget,
                    "steps": 100 * (i + 1),
                    "flops_seen": budget,
                    "flops_per_request": 6e7,
                    "params_total": 2_000_000,
                    "eval_nll_per_item": nll - i,
                    "wall_s": 10.0,
                    "recall@10": 0.05 + 0.01 * i,
                    "ndcg@10": 0.03,
                    "engagement@1": 1.0,
                    "engagement@10": 0.9,
                    "engagement_logged": 1.1,
                }
            )
            curves[f"{rung}_{budget:.0e}"] = [[budget / 2, nll + 0.5], [budget, nll - i]]
    payload = {"source": "world:small", "eval_requests": 8, "beam": 8, "rows": rows}
    path.write_text(json.dumps(payload | {"curves": curves}))


def test_v1_vs_v2_notebook_executes(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    _fake_results(results)
    monkeypatch.setenv("ONEREC_V1V2_RESULTS", str(results))
    nb = nbformat.read(ROOT / "notebooks" / "v1_vs_v2.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "4 runs on world:small" in text
    # The equal-budget differences are computed from the rows: V2 - V1 NLL is -0.2 at both.
    assert text.count("NLL/item -0.200") == 2
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the plot cell drew nothing"
    assert os.environ["ONEREC_V1V2_RESULTS"] == str(results)
