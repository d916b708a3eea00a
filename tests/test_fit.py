"""Scaling-law fits (scaling/fit.py, `onerec fit`): known laws recovered from noisy synthetic
tables on a grid where N and D vary independently; bad tables give one clear error each.

Tolerances: 0.3 % multiplicative noise on 49 points; the fits land within ~1 % of E and 0.01
of the exponents (measured 1.9973 for E = 2, 0.3514 / 0.2989 for 0.35 / 0.30)."""

import json
import math

import numpy as np
import pytest
from scipy import optimize

from onerec_jax import cli
from scaling import fit

TRUE = {"E": 2.0, "A": 60.0, "alpha": 0.35, "B": 90.0, "beta": 0.3}


def _grid(seed: int = 1, noise: float = 0.003) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.geomspace(1e5, 1e9, 7):
        for d in np.geomspace(1e6, 1e11, 7):
            law = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
            loss = law * math.exp(rng.normal(0, noise))
            rows.append({"n_active": n, "tokens": d, "flops": 6 * n * d, "loss": loss})
    return rows


def test_chinchilla_recovers_the_law_of_a_noisy_grid():
    r = fit.fit(_grid(), "chinchilla", bootstrap=30)
    p = r["params"]
    assert abs(p["E"] - TRUE["E"]) < 0.01 * TRUE["E"], p
    assert abs(p["alpha"] - TRUE["alpha"]) < 0.01 and abs(p["beta"] - TRUE["beta"]) < 0.01, p
    assert abs(math.log(p["A"] / TRUE["A"])) < 0.1 and abs(math.log(p["B"] / TRUE["B"])) < 0.1
    assert r["r2"] > 0.999 and r["n_points"] == 49 and len(r["log_residuals"]) == 49
    for k, (lo, hi) in r["ci95"].items():
        assert lo <= p[k] <= hi, (k, lo, p[k], hi)


def test_power_laws_in_n_and_in_c_recover_their_exponents():
    rng = np.random.default_rng(2)
    rows = []
    for n in np.geomspace(1e5, 1e9, 10):
        loss = (1.5 + 40.0 / n**0.4) * math.exp(rng.normal(0, 0.002))
        rows.append({"n_active": n, "flops": n, "loss": loss})
    for law in ("power-n", "power-c"):
        p = fit.fit(rows, law, bootstrap=0)["params"]
        assert abs(p["E"] - 1.5) < 0.02 and abs(p["alpha"] - 0.4) < 0.02, (law, p)


def test_isoflop_parabolas_give_the_compute_optimal_exponent():
    # On the chinchilla law without noise, N*(C) for C = 6 N D scales as C^(beta/(alpha+beta)).
    rows = []
    for c in np.geomspace(1e15, 1e19, 5):
        n_mid = (c / 6) ** (TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]))
        for n in n_mid * np.geomspace(0.05, 20, 9):
            d = c / (6 * n)
            loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
            rows.append({"n_active": n, "loss": loss, "budget": c})
    r = fit.isoflop(rows)
    assert all(b["ok"] and b["curvature"] > 0 for b in r["budgets"]), r
    for b in r["budgets"]:  # the parabola's own minimum is the reported N*
        a2, a1, _ = b["coefficients"]
        assert a2 == b["curvature"] and math.exp(-a1 / (2 * a2)) == pytest.approx(b["n_opt"])
    want = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert abs(r["n_opt_exponent"] - want) < 0.03, r
    assert r["n_opt_exponent"] + r["d_opt_exponent"] == pytest.approx(1.0)
    # Budgets whose minimum lies beyond their sizes, or that have none: reported, left out.
    for losses in ((3.0, 2.9, 2.85), (3.0, 3.2, 3.0)):
        odd = [
            {"n_active": n, "loss": x, "budget": 1.0}
            for n, x in zip((1, 2, 4), losses, strict=True)
        ]
        bad = fit.isoflop(rows + odd)
        assert bad["budgets"][0]["budget"] == 1.0 and not bad["budgets"][0]["ok"]
        assert bad["n_opt_exponent"] == r["n_opt_exponent"]
        json.dumps(bad, allow_nan=False)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"n_active": 1e6, "loss": 3.0}] * 4, "too few to fit power-n"),
        ([{"n_active": 1e6 * (i + 1), "loss": 3.0} for i in range(6)] + [{"loss": 2.0}],
         "column 'n_active' is missing in rows \\[7\\]"),
        ([{"n_active": 1e6 * (i + 1), "loss": 3.0 - i * 0.1} for i in range(5)]
         + [{"n_active": -5, "loss": 2.0}], "must be finite and > 0; rows \\[6\\]"),
        ([{"n_active": 1e6 * (i + 1), "loss": float("nan") if i == 2 else 3.0} for i in range(6)],
         "column 'loss' must be finite and > 0; rows \\[3\\]"),
    ],
)  # fmt: skip
def test_bad_tables_give_one_clear_error(rows, message):
    with pytest.raises(ValueError, match=message):
        fit.fit(rows, "power-n", bootstrap=0, source="t.jsonl")


def test_cli_fits_each_family_and_names_a_broken_file(tmp_path, capsys):
    table = tmp_path / "results.jsonl"
    rows = _grid(seed=3)[::2]
    for i, r in enumerate(rows):
        r["family"] = "v1" if i % 2 else "v2"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["fit", "--table", str(table), "--law", "power-c", "--by", "family", "--json"]
    assert cli.main([*args, "--bootstrap", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out) == ["v1", "v2"]
    assert set(out["v1"]["params"]) == {"E", "A", "alpha"} and out["v1"]["bootstrap"] == 5
    table.write_text(table.read_text() + '{"n_active": 3\n')
    assert cli.main(args) == 2
    assert f"{table}:{len(rows) + 1}: not a JSON object" in capsys.readouterr().err
    assert cli.main(["fit", "--table", str(tmp_path / "none.jsonl"), "--law", "power-n"]) == 2
    # A sweep's table holds grid rows (no budget) beside its iso-FLOP rows: isoflop reads the
    # latter only, and a table without any says so.
    iso = [{"n_active": n, "loss": 3 + (np.log(n) - np.log(1e6)) ** 2 / 50 + c / 1e20,
            "budget": c} for c in (1e18, 1e19) for n in (1e5, 3e5, 1e6, 3e6, 1e7)]  # fmt: skip
    grid_rows = [{"n_active": 1e6, "loss": 9.0, "budget": None}]
    table.write_text("".join(json.dumps(r) + "\n" for r in grid_rows + iso))
    assert cli.main(["fit", "--table", str(table), "--law", "isoflop", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [b["n_opt"] for b in out["budgets"]] == pytest.approx([1e6, 1e6])
    table.write_text("".join(json.dumps(r) + "\n" for r in grid_rows))
    assert cli.main(["fit", "--table", str(table), "--law", "isoflop"]) == 2
    assert "no row has a `budget`" in capsys.readouterr().err


def test_keep_draws_returns_every_bootstrap_refit():
    rng = np.random.default_rng(4)
    rows = [
        {"n_active": n, "loss": (1.5 + 40.0 / n**0.4) * math.exp(rng.normal(0, 0.002))}
        for n in np.geomspace(1e5, 1e9, 8)
    ]
    plain = fit.fit(rows, "power-n", bootstrap=10)
    kept = fit.fit(rows, "power-n", bootstrap=10, keep_draws=True)
    assert "draws" not in plain and {k: v for k, v in kept.items() if k != "draws"} == plain
    assert len(kept["draws"]) == kept["bootstrap"] == 10
    for k, (lo, hi) in kept["ci95"].items():
        values = [d[k] for d in kept["draws"]]
        assert set(kept["draws"][0]) == {"E", "A", "alpha"}
        assert lo == pytest.approx(np.percentile(values, 2.5)) and hi <= max(values), k
    json.dumps(kept, allow_nan=False)


def test_refits_reach_their_optimum_and_the_gradient_is_exact():
    """A bootstrap refit starts at the full fit and must still reach its resample's optimum, as
    a fit from the whole grid of starts does (on the raw Huber sum, ~1e-6, L-BFGS-B stopped a
    step from its start: intervals came out narrower than the noise, and missed the truth)."""
    rows = _grid(seed=5)
    logx, logd, logl = (np.log([r[k] for r in rows]) for k in ("n_active", "tokens", "loss"))
    full = fit._minimise("nd", logx, logd, logl, fit._starts("nd", logx, logd, np.exp(logl)))
    for seed in range(2):
        i = np.random.default_rng(seed).integers(0, len(rows), len(rows))
        sub = (logx[i], logd[i], logl[i])
        refit = fit._minimise("nd", *sub, [full])
        best = fit._minimise("nd", *sub, fit._starts("nd", logx[i], logd[i], np.exp(logl[i])))
        f = lambda t, sub=sub: fit._objective(t, "nd", *sub)[0]
        assert f(refit) == pytest.approx(f(best), rel=1e-4), (seed, f(refit), f(best))
        assert not np.allclose(refit, full, rtol=1e-3, atol=0), seed  # it moved
        theta = full + np.random.default_rng(seed).normal(0, 0.05, 5)
        numeric = optimize.approx_fprime(theta, f, 1e-7)
        np.testing.assert_allclose(fit._objective(theta, "nd", *sub)[1], numeric, rtol=1e-3)
