"""`make demo` (= `onerec demo`): a micro scaling study end to end on 2 CPU cores.

The sweep experiments/sweeps/demo.py (six micro rungs per family on the tiny world, one token
budget) through the ordinary runner (resumable: a second run trains nothing), then the power
law L(N) = E + A / N^alpha per family with bootstrap intervals, the plots, and a summary that
sets the fitted E beside the world's entropy floor. Files: OUT/results.jsonl (and .parquet),
OUT/fit.json, OUT/scaling_laws.png (and .svg), OUT/runs/*/tb (TensorBoard).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

from scaling import fit, results, runner
from scaling import sweep as sweep_lib


def fits_by_family(rows: list[dict[str, Any]], bootstrap: int) -> dict[str, Any]:
    """power-n per family over the rows the figure's fit reads (`plot.power_n_rows`: one token
    budget; the demo has one); a family whose fit fails gets its reason instead."""
    from scaling.plot import by_family, power_n_rows

    out: dict[str, Any] = {}
    for fam, fam_rows in by_family(rows).items():
        mine, _ = power_n_rows(fam_rows)
        try:
            out[fam] = fit.fit(mine, "power-n", bootstrap=bootstrap, source=f"{fam} runs")
        except ValueError as e:
            out[fam] = {"error": str(e)}
    return out


def summary_lines(rows: list[dict[str, Any]], fits: dict[str, Any]) -> list[str]:
    floors = {r["entropy_floor"] for r in rows if r.get("entropy_floor") is not None}
    floor = min(floors) if floors else None
    lines = []
    for fam, f in fits.items():
        if "error" in f:
            lines.append(f"{fam.upper()}: no fit ({f['error']})")
            continue
        best = min((r for r in rows if r["family"] == fam), key=lambda r: r["loss"])
        p = f["params"]
        lines.append(
            f"{fam.upper()}: L(N) = E + A / N^alpha, {fit.describe(f)}; best held-out loss "
            f"{best['loss']:.3f} nats/item ({best['rung']})"
        )
        if floor is not None:
            lines.append(
                f"    E {p['E']:.3f} vs the world's entropy floor {floor:.3f} nats/item: "
                f"gap {p['E'] - floor:+.3f}"
            )
    return lines


def _helpers(sweep_file: pathlib.Path, out: pathlib.Path, n: int) -> list[subprocess.Popen]:
    """`n` more runners of the sweep, in the background (their output in OUT/runner-K.log)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onerec_jax.cli", "sweep", "--sweep", str(sweep_file)]
    cmd += ["--dir", str(out), "--wait"]
    procs = []
    for k in range(1, n + 1):
        log = (out / f"runner-{k}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    return procs


def run(
    sweep_file: str | pathlib.Path = "experiments/sweeps/demo.py",
    out: str | pathlib.Path = "runs/demo",
    bootstrap: int = 200,
    runners: int = 2,
) -> int:
    """Run the sweep with `runners` runners (this process and runners - 1 in the background:
    on 2 cores one trains while the other compiles or scores), then fit, plot, summarise."""
    out, sweep_file = pathlib.Path(out), pathlib.Path(sweep_file)
    sweep = sweep_lib.load(sweep_file)  # a bad file fails here, before any runner starts
    helpers = _helpers(sweep_file, out, runners - 1)
    try:
        status = runner.run(sweep, out, wait=True)
    finally:
        for p in helpers:
            p.terminate()  # done by now unless this runner failed; SIGTERM saves a checkpoint
            p.wait()
    if status == 3 or not (out / "results.jsonl").is_file():
        return status  # stopped (SIGTERM), or nothing finished: nothing to fit yet
    # The finished points, fitted even when one failed (its traceback is in OUT/failed/).
    points = {p.name for p in sweep.points}  # not rows an older demo sweep left in OUT
    rows = [
        r
        for r in results.read_rows(out / "results.jsonl")
        if r.get("loss") is not None and r.get("point") in points
    ]
    if not rows:
        print(f"no finished point with a finite loss in {out / 'results.jsonl'}")
        return status or 1
    results.to_parquet(rows, out / "results.parquet")
    fits = fits_by_family(rows, bootstrap)
    (out / "fit.json").write_text(
        json.dumps({"law": "power-n", "by": "family", "fits": fits}, indent=1, sort_keys=True)
    )
    try:
        from scaling import plot

        figure = plot.save(plot.scaling_figure(rows, bootstrap=bootstrap), out / "scaling_laws")
    except ImportError as e:  # matplotlib comes with the notebooks extra (make install)
        print(f"no plots: {e} (pip install '.[notebooks]')")
        figure = []
    except ValueError as e:  # a table a figure cannot be drawn from: say so, keep the fits
        print(f"no plots: {e}")
        figure = []
    print("\n".join(["", "Fitted laws (held-out NLL per item, N = active non-embedding):"]))
    print("\n".join(summary_lines(rows, fits)))
    print(f"\nfiles: {out / 'results.jsonl'}, {out / 'fit.json'}, {', '.join(map(str, figure))}")
    print(f"TensorBoard: tensorboard --logdir {out / 'runs'}")
    return status
