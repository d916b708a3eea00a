"""Scaling-law fits in NumPy/SciPy float64: loss against parameters, compute and data.

Laws (N: a parameter count, by default `n_active`; D: tokens; C: training FLOPs):
  power-n     L(N)    = E + A / N^alpha             (the OneRec-V2 paper's form)
  power-c     L(C)    = E + A / C^alpha
  chinchilla  L(N, D) = E + A / N^alpha + B / D^beta
and the iso-FLOP analysis (Chinchilla's approach 2): per compute budget, a parabola of loss in
log N whose minimum is the compute-optimal N*(C) (its curvature must be positive, or the budget
has no minimum inside its points), then N* = k C^a and D* = C / (6 N*) fitted as power laws.

How (after Hoffmann et al.'s recipe): the law is written in log space, log L = logsumexp(e,
a - alpha log N [, b - beta log D]) with E = exp(e), A = exp(a), B = exp(b), and fitted by
minimising the Huber loss (delta 1e-3) of the log residuals with L-BFGS-B from a grid of
starts; the best start wins. Confidence intervals are percentiles of bootstrap refits (rows
resampled with replacement, each refit started from the full fit). R^2 is of the loss itself.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, special

LAWS = {
    "power-n": ("n", ("E", "A", "alpha")),
    "power-c": ("c", ("E", "A", "alpha")),
    "chinchilla": ("nd", ("E", "A", "alpha", "B", "beta")),
}
HUBER_DELTA = 1e-3
EXPONENT_STARTS = (0.1, 0.3, 0.6, 1.0)
E_STARTS = (0.1, 0.5, 0.9)  # shares of the smallest loss


def load_table(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a JSONL results table; one clear error naming the file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results table")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: not a JSON object")
        rows.append(row)
    return rows


def columns(
    rows: Sequence[dict[str, Any]], names: Sequence[str], source: str = "table"
) -> dict[str, np.ndarray]:
    """float64 columns, each checked: present in every row, finite and > 0."""
    out = {}
    for name in names:
        missing = [i for i, r in enumerate(rows, 1) if name not in r or r[name] is None]
        if missing:
            raise ValueError(f"{source}: column {name!r} is missing in rows {missing[:5]}")
        try:
            x = np.asarray([r[name] for r in rows], np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: column {name!r} holds non-numbers") from None
        bad = np.flatnonzero(~np.isfinite(x) | (x <= 0)) + 1
        if len(bad):
            raise ValueError(
                f"{source}: column {name!r} must be finite and > 0; rows {bad[:5].tolist()} "
                f"are not ({x[bad[0] - 1]})"
            )
        out[name] = x
    return out


def _log_pred(theta: np.ndarray, kind: str, logx: np.ndarray, logd: np.ndarray | None):
    if kind == "nd":
        e, a, alpha, b, beta = theta
        terms = [np.full_like(logx, e), a - alpha * logx, b - beta * logd]
    else:
        e, a, alpha = theta
        terms = [np.full_like(logx, e), a - alpha * logx]
    return special.logsumexp(np.stack(terms), axis=0)


def _huber(r: np.ndarray) -> float:
    a = np.abs(r)
    return float(
        np.sum(np.where(a <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (a - 0.5 * HUBER_DELTA)))
    )


def _starts(kind: str, logx, logd, loss) -> list[np.ndarray]:
    """A grid of starts: E a share of the smallest loss, exponents from EXPONENT_STARTS, and
    the scales set so the power terms carry the median excess loss at the median size."""
    out = []
    med_x, med_loss = np.median(logx), np.median(loss)
    for share, alpha in itertools.product(E_STARTS, EXPONENT_STARTS):
        e0 = share * loss.min()
        excess = max(med_loss - e0, 1e-6)
        if kind == "nd":
            for beta in EXPONENT_STARTS:
                a0 = math.log(excess / 2) + alpha * med_x
                b0 = math.log(excess / 2) + beta * np.median(logd)
                out.append(np.array([math.log(e0), a0, alpha, b0, beta]))
        else:
            out.append(np.array([math.log(e0), math.log(excess) + alpha * med_x, alpha]))
    return out


def _objective(theta, kind, logx, logd, logl) -> tuple[float, np.ndarray]:
    """The Huber loss of the log residuals in units of delta^2, and its exact gradient.

    The units matter: the raw sum (~1e-6 for a good fit) sits under L-BFGS-B's absolute
    tolerances (gtol 1e-5; ftol is relative to max(|f|, 1)), which then stop it a step away
    from its start, so a bootstrap refit would barely leave the full fit. The gradient: the
    prediction is logsumexp(terms), so d pred = sum_k softmax_k d term_k, and Huber'(r) =
    clip(r, -delta, delta)."""
    if kind == "nd":
        e, a, alpha, b, beta = theta
        terms = np.stack([np.full_like(logx, e), a - alpha * logx, b - beta * logd])
    else:
        e, a, alpha = theta
        terms = np.stack([np.full_like(logx, e), a - alpha * logx])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    w /= total
    r = top + np.log(total) - logl
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    grad = [w[0] @ dr, w[1] @ dr, -(w[1] * logx) @ dr]
    if kind == "nd":
        grad += [w[2] @ dr, -(w[2] * logd) @ dr]
    return _huber(r) / HUBER_DELTA**2, np.array(grad) / HUBER_DELTA**2


def _minimise(kind, logx, logd, logl, starts) -> np.ndarray:
    # Exponents stay in (0, 5]: a law whose loss grows with size is no scaling law.
    bounds = [(None, None), (None, None), (1e-4, 5.0)] + (
        [(None, None), (1e-4, 5.0)] if kind == "nd" else []
    )
    best = None
    for x0 in starts:
        res = optimize.minimize(
            _objective, x0, (kind, logx, logd, logl), "L-BFGS-B", jac=True, bounds=bounds
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def _params(theta: np.ndarray, kind: str) -> dict[str, float]:
    p = {"E": math.exp(theta[0]), "A": math.exp(theta[1]), "alpha": float(theta[2])}
    if kind == "nd":
        p.update(B=math.exp(theta[3]), beta=float(theta[4]))
    return p


def fit(
    rows: Sequence[dict[str, Any]],
    law: str,
    *,
    n_column: str = "n_active",
    loss_column: str = "loss",
    bootstrap: int = 200,
    seed: int = 0,
    source: str = "table",
    keep_draws: bool = False,
) -> dict[str, Any]:
    """Fit `law` to the rows; returns the parameters (`E`, `A`, `alpha` [, `B`, `beta`]),
    their 95 % bootstrap intervals, the log residuals and R^2 of the loss. With `keep_draws`,
    also `draws`: the parameters of every bootstrap refit (for a confidence band of the curve)."""
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; use one of {sorted(LAWS)}")
    kind, names = LAWS[law]
    x_name = {"n": n_column, "c": "flops", "nd": n_column}[kind]
    need = [x_name, loss_column] + (["tokens"] if kind == "nd" else [])
    cols = columns(rows, need, source)
    if len(rows) < len(names) + 2:
        raise ValueError(
            f"{source}: {len(rows)} rows are too few to fit {law} ({len(names)} parameters): "
            f"need at least {len(names) + 2}"
        )
    logx, logl = np.log(cols[x_name]), np.log(cols[loss_column])
    logd = np.log(cols["tokens"]) if kind == "nd" else None
    theta = _minimise(kind, logx, logd, logl, _starts(kind, logx, logd, cols[loss_column]))
    pred = _log_pred(theta, kind, logx, logd)
    loss = cols[loss_column]
    r2 = 1.0 - np.sum((loss - np.exp(pred)) ** 2) / np.sum((loss - loss.mean()) ** 2)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        i = rng.integers(0, len(loss), len(loss))
        if len(np.unique(logx[i])) < 3:
            continue  # a resample with too few distinct sizes pins nothing down
        sub_d = logd[i] if logd is not None else None
        boots.append(_params(_minimise(kind, logx[i], sub_d, logl[i], [theta]), kind))
    ci = {
        k: [float(np.percentile([b[k] for b in boots], 2.5)),
            float(np.percentile([b[k] for b in boots], 97.5))]
        for k in names
    } if boots else {}  # fmt: skip
    out = {
        "law": law,
        "x": x_name,
        "n_points": len(loss),
        "params": _params(theta, kind),
        "ci95": ci,
        "bootstrap": len(boots),
        "r2": float(r2),
        "log_residuals": (logl - pred).tolist(),
    }
    if keep_draws:
        out["draws"] = boots
    return out


def describe(result: dict[str, Any]) -> str:
    """A `fit` result in one line: each parameter with its 95 % interval, and R^2."""
    ci = result["ci95"]
    fitted = ", ".join(
        f"{k} = {v:.4g}" + (f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else "")
        for k, v in result["params"].items()
    )
    return f"{result['law']} over {result['n_points']} runs: {fitted}; R^2 {result['r2']:.4f}"


def isoflop(
    rows: Sequence[dict[str, Any]],
    *,
    n_column: str = "n_active",
    loss_column: str = "loss",
    budget_column: str = "budget",
    source: str = "table",
) -> dict[str, Any]:
    """Chinchilla's approach 2: per budget (rows sharing `budget_column`), loss = a (log N)^2
    + b log N + c; N* = exp(-b / 2a) where a > 0. Then N* = k C^a_n and D* = C / (6 N*) = k'
    C^a_d by least squares in log space (a_n + a_d = 1). Budgets whose parabola opens
    downwards, or whose minimum lies outside their sizes, are reported and left out. Each
    budget's row holds its parabola's `coefficients` [a, b, c] (np.polyval order, in ln N), so
    a plot draws the very curve that was fitted."""
    cols = columns(rows, [n_column, loss_column, budget_column], source)
    budgets = np.unique(cols[budget_column])
    per_budget, used_c, used_n = [], [], []
    for c in budgets:
        sel = cols[budget_column] == c
        if sel.sum() < 3:
            raise ValueError(f"{source}: budget {c:g} has {int(sel.sum())} points; need >= 3")
        logn = np.log(cols[n_column][sel])
        a, b, c0 = np.polyfit(logn, cols[loss_column][sel], 2)
        log_opt = -b / (2 * a) if a > 0 else None  # a <= 0: no minimum
        inside = bool(log_opt is not None and logn.min() <= log_opt <= logn.max())
        n_star = math.exp(log_opt) if inside else None  # null in the JSON when left out
        row = {"budget": float(c), "curvature": float(a), "n_opt": n_star, "ok": inside,
               "coefficients": [float(a), float(b), float(c0)]}  # fmt: skip
        per_budget.append(row)
        if inside:
            used_c.append(c)
            used_n.append(n_star)
    out: dict[str, Any] = {"law": "isoflop", "budgets": per_budget}
    if len(used_c) >= 2:
        lc, ln = np.log(used_c), np.log(used_n)
        a_n, log_k = np.polyfit(lc, ln, 1)
        out.update(n_opt_exponent=float(a_n), d_opt_exponent=float(1 - a_n),
                   n_opt_coefficient=float(math.exp(log_k)))  # fmt: skip
    return out
