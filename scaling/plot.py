"""The scaling study's figure: held-out loss against compute, against parameters, per budget.

`scaling_figure(rows)` reads a results table (scaling/results.py) and draws, per family (V1, V2):
  (a) loss against training FLOPs C: the runs, the compute frontier (the best loss reached at or
      below each compute) and the power-c law fitted to the runs on that frontier;
  (b) loss against active non-embedding parameters N: the grid runs (rows without `budget`), the
      power-n law fitted to the runs of one token budget (the largest that has enough runs) with
      its 95 % bootstrap band, the fitted E, and the world's entropy floor when the table has one;
  (c) only with iso-FLOP rows (`budget`): loss against N per budget, the parabola in log N that
      `fit.isoflop` fitted and its minimum N*.
A fit that cannot be made (too few runs) is named in its panel instead of drawn. The figure is
built on the Agg canvas without pyplot, so nothing here changes matplotlib's global backend (a
notebook keeps its own). `onerec plot` (`register`) saves it as PNG and SVG.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from scaling import fit, results

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Rows = Sequence[dict[str, Any]]
COLORS = {"v1": "tab:blue", "v2": "tab:orange"}
SHADES = {"v1": "Blues", "v2": "Oranges"}  # per-family colour maps for token or budget shades
OTHER = (("tab:green", "Greens"), ("tab:purple", "Purples"), ("tab:red", "Reds"))
TOKEN_TOLERANCE = 1.1  # runs within 10 % of a budget's fewest tokens share that token budget
POWER_N_MIN_ROWS = len(fit.LAWS["power-n"][1]) + 2  # what fit.fit needs for a 3-parameter law


def read_table(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a JSONL results table, with one clear error naming the file when it is
    missing, empty or holds something other than JSON objects."""
    rows = results.read_rows(path)
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{path}:{bad[0]}: not a JSON object")
    if not rows:
        raise ValueError(f"{path}: the results table has no rows")
    return rows


def by_family(rows: Rows) -> dict[str, list[dict[str, Any]]]:
    """The rows grouped by their `family` ("all" where a row has none), in name order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r.get("family") or "all"), []).append(r)
    return dict(sorted(out.items()))


def token_budgets(rows: Rows) -> list[list[dict[str, Any]]]:
    """The rows grouped by token budget, fewest tokens first: a group takes the runs within
    TOKEN_TOLERANCE of its first run's tokens (runs of one budget differ by the rounding of
    samples to whole batches), e.g. 1.00e9, 1.02e9 | 3.0e9."""
    groups: list[list[dict[str, Any]]] = []
    for r in sorted(rows, key=lambda r: r["tokens"]):
        if groups and r["tokens"] <= TOKEN_TOLERANCE * groups[-1][0]["tokens"]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def power_n_rows(rows: Rows) -> tuple[list[dict[str, Any]], float | None]:
    """The rows of one family that its power-n fit reads, and their token budget.

    L(N) holds at a fixed amount of data, so: the grid runs (rows without `budget`; all rows if
    none are grid runs), and when they span several token budgets, the largest budget with
    enough runs to fit (else the largest). The budget (median tokens) is None when tokens do
    not vary or are not recorded.
    """
    grid = [r for r in rows if r.get("budget") is None] or list(rows)
    if any(r.get("tokens") is None for r in grid):
        return grid, None
    groups = token_budgets(grid)
    if len(groups) == 1:
        return grid, None
    chosen = next((g for g in reversed(groups) if len(g) >= POWER_N_MIN_ROWS), groups[-1])
    return chosen, float(np.median([r["tokens"] for r in chosen]))


def law_text(params: dict[str, float], x: str, r2: float) -> str:
    """A fitted power law in one line, e.g. 'L = 3.90 + 12.1/N^0.31 (R² 0.970)'."""
    return f"L = {params['E']:.2f} + {params['A']:.3g}/{x}^{params['alpha']:.2f} (R² {r2:.3f})"


def _name(family: str) -> str:
    return family.upper() if family in COLORS else family


def _palette(families: Sequence[str]) -> dict[str, tuple[str, str]]:
    others = iter(OTHER * len(families))
    return {f: (COLORS[f], SHADES[f]) if f in COLORS else next(others) for f in families}


def _try_fit(rows: Rows, law: str, notes: list[str], **kw: Any) -> dict[str, Any] | None:
    try:
        return fit.fit(rows, law, **kw)
    except ValueError as e:  # too few runs, or sizes that cannot carry the law
        notes.append(f"not fitted: {e}")
        return None


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, notes: list[str]) -> None:
    ax.set(xscale="log", title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper right", ncol=2 if len(handles) > 9 else 1)
    if notes:  # below the x label, where no data can hide them
        ax.annotate(
            "\n".join(notes),
            xy=(0, 0),
            xycoords="axes fraction",
            xytext=(0, -34),
            textcoords="offset points",
            fontsize=7,
            va="top",
        )


def _compute_panel(ax: Axes, fams: dict, colors: dict, loss_column: str, ylabel: str) -> None:
    notes: list[str] = []
    for fam, rows in fams.items():
        color, name = colors[fam][0], _name(fam)
        c = np.array([r["flops"] for r in rows], np.float64)
        loss = np.array([r[loss_column] for r in rows], np.float64)
        ax.scatter(c, loss, s=16, color=color, alpha=0.5, label=f"{name} runs")
        order = np.lexsort((loss, c))  # by compute, the better run first among equal computes
        best = np.minimum.accumulate(loss[order])
        ax.plot(
            c[order], best, drawstyle="steps-post", color=color, lw=1.5, label=f"{name} frontier"
        )
        # The runs that set the frontier: each beats every run with less or equal compute.
        front = [rows[i] for k, i in enumerate(order) if k == 0 or loss[i] < best[k - 1]]
        res = _try_fit(
            front, "power-c", notes, loss_column=loss_column, bootstrap=0, source=f"{name} frontier"
        )
        if res:
            p, x = res["params"], np.geomspace(c.min(), c.max(), 200)
            ax.plot(
                x,
                p["E"] + p["A"] / x ** p["alpha"],
                ls="--",
                color=color,
                label=f"{name} frontier fit: {law_text(p, 'C', res['r2'])}",
            )
    _finish(
        ax,
        "(a) loss vs compute, with the compute frontier",
        "training compute C (FLOPs)",
        ylabel,
        notes,
    )


def _size_panel(
    ax: Axes,
    fams: dict,
    colors: dict,
    n_column: str,
    loss_column: str,
    bootstrap: int,
    xlabel: str,
    ylabel: str,
) -> None:
    import matplotlib

    notes: list[str] = []
    levels: list[float] = []  # what the y-axis must show: losses, fitted E, the floor
    for fam, rows in fams.items():
        (color, shades), name = colors[fam], _name(fam)
        shown = [r for r in rows if r.get("budget") is None] or rows
        n = np.array([r[n_column] for r in shown], np.float64)
        loss = np.array([r[loss_column] for r in shown], np.float64)
        levels += [loss.min(), loss.max()]
        tokens = [r.get("tokens") for r in shown]
        if None not in tokens and len(token_budgets(shown)) > 1:
            # Several token budgets: darker points saw more tokens (no colour bar, which would
            # add an axis; the fitted budget is named in the legend).
            t = np.log10(np.asarray(tokens, np.float64))
            shade = (t - t.min()) / (t.max() - t.min())
            cmap = matplotlib.colormaps[shades]
            label = f"{name} runs (darker: more tokens)"
            ax.scatter(n, loss, s=18, c=cmap(0.35 + 0.6 * shade), label=label)
        else:
            ax.scatter(n, loss, s=18, color=color, alpha=0.7, label=f"{name} runs")
        fit_rows, budget = power_n_rows(rows)
        res = _try_fit(
            fit_rows,
            "power-n",
            notes,
            n_column=n_column,
            loss_column=loss_column,
            bootstrap=bootstrap,
            keep_draws=True,
            source=name,
        )
        if not res:
            continue
        p = res["params"]
        levels.append(p["E"])
        # The law over the sizes it was fitted on: beyond them a band is an extrapolation.
        fitted_n = np.array([r[n_column] for r in fit_rows], np.float64)
        x = np.geomspace(fitted_n.min(), fitted_n.max(), 200)
        at = f", fit at D = {budget:.2g} tokens" if budget else ""
        ax.plot(
            x,
            p["E"] + p["A"] / x ** p["alpha"],
            color=color,
            lw=1.8,
            label=f"{name}: {law_text(p, 'N', res['r2'])}{at}",
        )
        if res["draws"]:
            curves = np.array([d["E"] + d["A"] / x ** d["alpha"] for d in res["draws"]])
            lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        ax.axhline(p["E"], color=color, ls="--", lw=1, label=f"{name}: E = {p['E']:.3f}")
    floors = sorted(
        {
            round(r["entropy_floor"], 6)
            for fam in fams.values()
            for r in fam
            if r.get("entropy_floor") is not None
        }
    )
    for i, floor in enumerate(floors):
        ax.axhline(
            floor, color="black", ls=":", lw=1.2, label="world entropy floor" if i == 0 else None
        )
    if levels:
        # The data, E and the floor in view; a band that runs off it (a bootstrap draw with a
        # huge A) is cut at the edge rather than squashing the points into a line.
        lo, hi = min(levels + floors), max(levels)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + 1.5 * pad)
    _finish(ax, "(b) loss vs parameters; bands: 95 % bootstrap", xlabel, ylabel, notes)


def _isoflop_panel(
    ax: Axes, fams: dict, colors: dict, n_column: str, loss_column: str, xlabel: str, ylabel: str
) -> None:
    import matplotlib

    notes: list[str] = []
    starred = False
    for k, (fam, rows) in enumerate(fams.items()):
        name, cmap = _name(fam), matplotlib.colormaps[colors[fam][1]]
        iso = [r for r in rows if r.get("budget") is not None]
        budgets = sorted({float(r["budget"]) for r in iso})
        shade = {b: cmap(0.45 + 0.5 * i / max(1, len(budgets) - 1)) for i, b in enumerate(budgets)}
        usable = []
        for b in budgets:
            sel = sorted((r for r in iso if float(r["budget"]) == b), key=lambda r: r[n_column])
            ax.plot(
                [r[n_column] for r in sel],
                [r[loss_column] for r in sel],
                "os"[k % 2],
                ls="-" if k % 2 == 0 else "--",
                color=shade[b],
                ms=4,
                lw=1,
                label=f"{name} C = {b:.1e} FLOPs",
            )
            if len(sel) < 3:
                notes.append(f"{name} C = {b:.1e}: {len(sel)} runs, no parabola (needs 3)")
            else:
                usable += sel
        if not usable:
            continue
        try:
            res = fit.isoflop(usable, n_column=n_column, loss_column=loss_column, source=name)
        except ValueError as e:
            notes.append(f"not fitted: {e}")
            continue
        for per in res["budgets"]:
            b, sel = per["budget"], [r[n_column] for r in usable if r["budget"] == per["budget"]]
            logn = np.linspace(np.log(min(sel)), np.log(max(sel)), 100)
            ax.plot(np.exp(logn), np.polyval(per["coefficients"], logn), ":", color=shade[b])
            if per["ok"]:
                ax.plot(
                    per["n_opt"],
                    np.polyval(per["coefficients"], np.log(per["n_opt"])),
                    "*",
                    color=shade[b],
                    mec="black",
                    ms=11,
                    label=None if starred else "N* (minimum of the parabola)",
                )
                starred = True
            else:
                notes.append(f"{name} C = {b:.1e}: no minimum inside its sizes")
        if "n_opt_exponent" in res:
            notes.append(f"{name}: N* ∝ C^{res['n_opt_exponent']:.2f}")
    _finish(ax, "(c) iso-FLOP: loss vs parameters per budget", xlabel, ylabel, notes)


def scaling_figure(
    rows: Rows,
    *,
    n_column: str = "n_active",
    loss_column: str = "loss",
    bootstrap: int = 200,
    source: str = "table",
) -> Figure:
    """The scaling figure of a results table: panels (a) loss vs compute and (b) loss vs N, and
    (c) the iso-FLOP curves when rows have a `budget`.

    Args:
      rows: the table's rows (`read_table`); each needs `flops`, `n_column` and `loss_column`.
      n_column: the parameter count N (default the active non-embedding count).
      loss_column: the loss drawn and fitted (default the held-out NLL per item).
      bootstrap: refits behind panel (b)'s 95 % bands (0: no bands).
      source: names the table in errors.

    Raises:
      ValueError: no rows, or a row without a positive finite `flops`, N or loss.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError(f"{source}: no rows to plot")
    fit.columns(rows, [n_column, loss_column, "flops"], source)
    fams = by_family(rows)
    colors = _palette(list(fams))
    has_budgets = any(r.get("budget") is not None for r in rows)
    xlabel = (
        "active non-embedding parameters N"
        if n_column == "n_active"
        else f"parameters N ({n_column})"
    )
    ylabel = "held-out loss (nats / item)" if loss_column == "loss" else loss_column
    panels = 3 if has_budgets else 2
    fig = Figure(figsize=(6.5 * panels, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _compute_panel(axes[0], fams, colors, loss_column, ylabel)
    _size_panel(axes[1], fams, colors, n_column, loss_column, bootstrap, xlabel, ylabel)
    if has_budgets:
        _isoflop_panel(axes[2], fams, colors, n_column, loss_column, xlabel, ylabel)
    counts = ", ".join(f"{_name(f)} {len(r)}" for f, r in fams.items())
    fig.suptitle(f"Scaling of {ylabel} — {source} (runs: {counts})", fontsize=11)
    return fig


def save(fig: Figure, stem: str | pathlib.Path) -> list[pathlib.Path]:
    """Write the figure as STEM.png (150 dpi) and STEM.svg, creating the parent folders."""
    stem = pathlib.Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.{ext}") for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def _cli(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "onerec: error: plot needs matplotlib: pip install -e '.[notebooks]'", file=sys.stderr
        )
        return 2
    rows = read_table(args.table)
    fig = scaling_figure(
        rows,
        n_column=args.n_column,
        loss_column=args.loss_column,
        bootstrap=args.bootstrap,
        source=str(args.table),
    )
    for path in save(fig, args.out):
        print(path)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `onerec plot` to an argparse subparsers object (`add_subparsers()`'s result)."""
    p = subparsers.add_parser(
        "plot", help="draw the scaling figure of a JSONL results table (scaling/plot.py)"
    )
    p.add_argument("--table", required=True, help="JSONL, one row per run")
    p.add_argument("--out", required=True, help="output stem: writes STEM.png and STEM.svg")
    p.add_argument("--n-column", default="n_active", help="the parameter count N")
    p.add_argument("--loss-column", default="loss", help="the loss to draw and fit")
    p.add_argument("--bootstrap", type=int, default=200, help="refits for the 95%% bands")
    p.set_defaults(fn=_cli)
    return p
