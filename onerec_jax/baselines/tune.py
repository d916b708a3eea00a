"""Tune a baseline on the validation split, report it on the test split: `onerec baseline`.

Every combination of the baseline's grid is fitted (seed 0) and scored on the validation
split; the one of the highest validation NDCG@10 is kept (an iterative fit also picks its
epoch count there). The kept settings are then fitted again and scored on the test split:
once for a deterministic baseline, else with `seeds` fresh seeds 1..seeds (mean and sample
sd) - not the seed-0 fit that won the grid, whose validation luck would follow it to test.
The test split plays no part in any choice. The result records the whole grid, the choice
and the protocol.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

import numpy as np

from onerec_jax import ranking
from onerec_jax.atomic import write_atomic
from onerec_jax.baselines import ABOUT
from onerec_jax.baselines.data import training_data
from onerec_jax.baselines.registry import BASELINES
from onerec_jax.data.sources import open_source
from onerec_jax.monitor import MetricWriter

SELECT = "ndcg@10"
REPORT = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = sorted(grid)
    return [
        dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(grid[k] for k in keys))
    ]


def parse_sets(sets: list[str], name: str) -> dict[str, Any]:
    """`--set FIELD=VALUE` pairs: fields the baseline knows, values as JSON (else strings)."""
    known = {**BASELINES[name].default, **BASELINES[name].grid}
    out: dict[str, Any] = {}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or key not in known:
            raise ValueError(
                f"--set {s!r}: expected FIELD=VALUE with FIELD one of {sorted(known) or 'none'} "
                f"(baseline {name})"
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(
    name: str,
    source: str,
    *,
    tune: bool = True,
    seeds: int = 3,
    sets: dict[str, Any] | None = None,
    logdir: str | None = None,
    say=lambda msg: print(msg, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """The result of one baseline on one logged source (module docstring)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    spec = BASELINES[name]
    val = open_source(source, split="validation")
    test = open_source(source, split="test")
    data = training_data(val)
    writer = MetricWriter(logdir) if logdir else None
    t0 = time.perf_counter()

    def validate_with(tag: str):
        def validate(scorer: Any) -> float:
            scorer.validation = ranking.evaluate_scorer(val, scorer)  # kept: not scored twice
            v = scorer.validation[SELECT]
            epoch = scorer.chosen.get("epochs", 0)
            say(f"{name} {tag}: epoch {epoch} validation {SELECT} {v:.4f}")
            if writer is not None:
                writer.scalars(epoch, {f"{tag}/validation_{SELECT}": v})
            return v

        return validate

    fixed = {**spec.default, **(sets or {})}
    points = combinations({k: v for k, v in spec.grid.items() if k not in (sets or {})})
    points = [c for c in points if spec.distinct({**fixed, **c})] if tune else [{}]
    if int(fixed.get("eval_every", 1)) < 1 or int(fixed.get("epochs", 1)) < 1:
        raise ValueError(f"{name}: epochs and eval_every must be >= 1")
    grid_rows, best = [], None
    for i, combo in enumerate(points):
        params = {**fixed, **combo}
        scorer = spec.fit(data, params, 0, validate_with(f"grid{i}"))
        m = getattr(scorer, "validation", None) or ranking.evaluate_scorer(val, scorer)
        row = {"params": params, "chosen": dict(getattr(scorer, "chosen", {}))}
        row["validation"] = {k: m[k] for k in REPORT}
        grid_rows.append(row)
        say(f"{name} grid {i + 1}/{len(points)} {combo}: validation {SELECT} {m[SELECT]:.4f}")
        if best is None or m[SELECT] > best[0]:
            best = (m[SELECT], params, scorer)
    assert best is not None
    _, params, scorer0 = best
    per_seed = []
    for seed in range(1, seeds + 1) if spec.stochastic else [0]:
        scorer = (
            scorer0
            if not spec.stochastic
            else spec.fit(data, params, seed, validate_with(f"s{seed}"))
        )
        m = ranking.evaluate_scorer(test, scorer)
        row = {"seed": seed, "chosen": dict(getattr(scorer, "chosen", {}))}
        row.update({k: m[k] for k in REPORT})
        per_seed.append(row)
        say(f"{name} seed {seed}: test {SELECT} {m[SELECT]:.4f}")
    if writer is not None:
        writer.close()
    arr = {k: np.array([r[k] for r in per_seed], np.float64) for k in REPORT}
    return {
        "baseline": name,
        "about": ABOUT[name],
        "source": source,
        "protocol": ranking.protocol_of(test),
        "selected_by": f"validation {SELECT}" if tune else "not tuned (defaults and --set)",
        "params": params,
        "grid": grid_rows,
        "test": per_seed,
        "test_mean": {k: float(v.mean()) for k, v in arr.items()},
        "test_sd": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in arr.items()},
        "seeds": len(per_seed),
        "n_test_requests": len(test),
        "wall_s": time.perf_counter() - t0,
    }


def write(path: str, result: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(result, indent=1, sort_keys=True) + "\n")
