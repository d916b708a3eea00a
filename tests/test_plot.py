"""The scaling figure (scaling/plot.py, `onerec plot`): drawn and saved from a synthetic table
whose laws are known; panel (b) states each family's fitted law; bad tables give one clear error.

Tolerance: 0.2 % multiplicative noise on 6 sizes per family over three decades of N; E lands
within ~0.5 % of the truth (measured 3.999 for 4.0, 3.603 for 3.6), checked to 0.04 nats."""

import argparse
import json
import math
import re

import numpy as np
import pytest
from matplotlib import image

from scaling import plot

TRUE = {"v1": (4.0, 30.0, 0.30), "v2": (3.6, 25.0, 0.35)}  # E, A, alpha per family
B, BETA = 200.0, 0.3  # the data term of the iso-FLOP rows


def _table(budgets: bool = True) -> list[dict]:
    """Per family 6 grid runs at 1e9 tokens on E + A / N^alpha (noisy), and, with `budgets`,
    iso-FLOP runs at two budgets on E + A / N^alpha + B / D^beta with D = C / (6 N)."""
    rng = np.random.default_rng(0)
    rows = []
    for fam, (E, A, alpha) in TRUE.items():
        for n in np.geomspace(1e5, 1e8, 6):
            loss = (E + A / n**alpha) * math.exp(rng.normal(0, 0.002))
            rows.append({"family": fam, "n_active": n, "tokens": 1e9, "flops": 6e9 * n,
                         "loss": loss, "entropy_floor": 3.3})  # fmt: skip
        for c in (1e15, 1e16) if budgets else ():
            for n in np.geomspace(3e5, 3e7, 5):
                d = c / (6 * n)
                loss = E + A / n**alpha + B / d**BETA
                rows.append({"family": fam, "n_active": n, "tokens": d, "flops": c,
                             "budget": c, "loss": loss})  # fmt: skip
    return rows


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_figure_states_each_familys_law_and_saves_png_and_svg(tmp_path):
    fig = plot.scaling_figure(_table(), bootstrap=10, source="synthetic.jsonl")
    assert len(fig.axes) == 3
    a, b, c = fig.axes
    assert a.get_xscale() == b.get_xscale() == c.get_xscale() == "log"
    assert a.get_xlabel() == "training compute C (FLOPs)"
    assert b.get_xlabel() == "active non-embedding parameters N"
    assert b.get_ylabel() == "held-out loss (nats / item)"
    texts = _legend(b)
    for fam, (E, _, alpha) in TRUE.items():
        (law,) = [t for t in texts if t.startswith(f"{fam.upper()}: L = ")]
        m = re.match(r"V\d: L = ([\d.]+) \+ [\d.e+]+/N\^([\d.]+) \(R² ([\d.]+)\)$", law)
        assert m, law
        assert abs(float(m[1]) - E) < 0.04 and abs(float(m[2]) - alpha) < 0.05, law
        assert float(m[3]) > 0.99, law
        # The dashed E line sits at the fitted E.
        (e_line,) = [x for x in b.get_lines() if x.get_label().startswith(f"{fam.upper()}: E =")]
        assert abs(e_line.get_ydata()[0] - E) < 0.04
    assert "world entropy floor" in texts
    assert len(b.collections) >= 4  # two families' points and two bootstrap bands
    assert any(t.startswith("V1 frontier fit: L = ") for t in _legend(a))
    assert "N* (minimum of the parabola)" in _legend(c)
    paths = plot.save(fig, tmp_path / "figs" / "scaling")
    assert [p.name for p in paths] == ["scaling.png", "scaling.svg"]
    png = image.imread(paths[0])
    assert png.ndim == 3 and png.shape[0] > 600 and png.shape[1] > 2000, png.shape
    assert png.std() > 0.05  # not a blank canvas
    assert "<svg" in paths[1].read_text()[:1000]


def _few() -> list[dict]:
    """3 grid runs per family, too few for any law: the figure draws the points, fits nothing."""
    return [r for r in _table(budgets=False) if r["n_active"] < 2e6]


def test_without_budgets_two_panels_and_failed_fits_are_noted():
    fig = plot.scaling_figure(_few(), bootstrap=0)
    assert len(fig.axes) == 2
    a, b = fig.axes
    assert not any(" L = " in t for t in _legend(a) + _legend(b))
    for ax, law in ((a, "power-c"), (b, "power-n")):
        notes = " ".join(t.get_text() for t in ax.texts)
        assert notes.count(f"rows are too few to fit {law}") == 2, notes
    assert "not fitted: V2: 3 rows are too few to fit power-n" in notes


def test_a_table_without_loss_names_the_column():
    rows = [{k: v for k, v in r.items() if k != "loss"} for r in _table(budgets=False)]
    with pytest.raises(ValueError, match=r"t\.jsonl: column 'loss' is missing in rows"):
        plot.scaling_figure(rows, source="t.jsonl")
    with pytest.raises(ValueError, match=r"t\.jsonl: no rows to plot"):
        plot.scaling_figure([], source="t.jsonl")


def test_plot_command_writes_both_files_and_names_a_bad_table(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    plot.register(parser.add_subparsers(dest="command"))
    table, stem = tmp_path / "results.jsonl", tmp_path / "out" / "fig"
    table.write_text("".join(json.dumps(r) + "\n" for r in _few()))
    args = parser.parse_args(["plot", "--table", str(table), "--out", str(stem),
                              "--bootstrap", "0"])  # fmt: skip
    assert args.fn(args) == 0
    assert capsys.readouterr().out.split() == [f"{stem}.png", f"{stem}.svg"]
    assert image.imread(f"{stem}.png").shape[0] > 600
    table.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{table}: the results table has no rows")):
        args.fn(args)
    table.write_text('{"loss": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=re.escape(f"{table}:2: not a JSON object")):
        args.fn(args)
    with pytest.raises(FileNotFoundError, match=r"none\.jsonl: no results table"):
        args.fn(argparse.Namespace(**{**vars(args), "table": str(tmp_path / "none.jsonl")}))
