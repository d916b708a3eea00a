"""Sweeps: the points of a scaling study, defined in a Python file, resolved to run configs.

A sweep file (experiments/sweeps/*.py) defines `get_sweep() -> Sweep`: a base config (a packaged
name or a config file) and points built by

- `grid(rungs, tokens)`: every rung x every token budget (semantic-id tokens trained on), for
  loss-vs-N at fixed data and the (N, D) plane of the `chinchilla` law;
- `iso_flop(rungs, budgets)`: for each training-FLOPs budget C, every rung trained for C FLOPs
  (Chinchilla's approach 2): small rungs see more data, large ones less.

A point becomes a run by setting the rung, the seed and the steps on the base config: steps =
tokens / (tokens per request x batch) for a grid point, budget / (FLOPs per request x batch)
for an iso-FLOP point, where tokens per request is measured on the training split (valid target
items x semantic-id levels) and FLOPs per request is the analytic count of the rung's model at
the data's shapes (onerec_jax/flops.py). Run names say what varies: `v1-0.6m_t400k`,
`v2-1.7m_c3e12`, `_s1` for a seed other than 0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
import numpy as np

from onerec_jax import config
from onerec_jax.model.rungs import RUNGS


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: a rung trained on `tokens` tokens or for `budget` FLOPs."""

    rung: str
    seed: int = 0
    tokens: float | None = None  # grid: semantic-id tokens to train on
    budget: float | None = None  # iso-FLOP: training FLOPs
    overrides: tuple[str, ...] = ()  # "field=value" config overrides of this point only

    def __post_init__(self) -> None:
        if self.rung not in RUNGS:
            raise ValueError(f"unknown rung {self.rung!r}; known rungs: {', '.join(sorted(RUNGS))}")
        if (self.tokens is None) == (self.budget is None):
            raise ValueError(f"point {self.rung}: give exactly one of tokens and budget")
        size = self.tokens if self.tokens is not None else self.budget
        if not (isinstance(size, int | float) and math.isfinite(size) and size > 0):
            raise ValueError(f"point {self.rung}: tokens/budget must be > 0, got {size!r}")

    @property
    def family(self) -> str:
        return RUNGS[self.rung]["model.family"]

    @property
    def name(self) -> str:
        size = f"t{_short(self.tokens)}" if self.tokens is not None else f"c{self.budget:.3g}"
        return f"{self.rung}_{size.replace('+', '')}" + (f"_s{self.seed}" if self.seed else "")


def _short(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def grid(rungs: Iterable[str], tokens: Iterable[float], seeds: Iterable[int] = (0,)) -> list[Point]:
    """Every rung x token budget x seed."""
    return [Point(r, s, tokens=float(t)) for r in rungs for t in tokens for s in seeds]


def iso_flop(
    rungs: Iterable[str], budgets: Iterable[float], seeds: Iterable[int] = (0,)
) -> list[Point]:
    """Every rung x training-FLOPs budget x seed (points too short to train are left out when
    the sweep is resolved: `Sweep.min_steps`)."""
    return [Point(r, s, budget=float(c)) for r in rungs for c in budgets for s in seeds]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A scaling study: a base config and its points; the runner's settings for scoring."""

    config: str  # a packaged config name or a config file (relative: to the sweep file)
    points: Sequence[Point]
    overrides: Sequence[str] = ()  # "field=value" for every point
    eval_split: str = "validation"  # split of Recall@10 / engagement (the loss: validation)
    eval_requests: int = 256  # requests beam-searched for Recall@10 / engagement; 0: none
    beam: int = 32
    checkpoints: int = 4  # checkpoints per run (resume granularity)
    min_steps: int = 20  # iso-FLOP points with fewer steps are left out
    name: str = "sweep"

    def __post_init__(self) -> None:
        names = [p.name for p in self.points]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sweep {self.name}: points repeat: {', '.join(dup)}")
        if not self.points:
            raise ValueError(f"sweep {self.name}: no points")
        if self.eval_split not in ("validation", "test"):
            raise ValueError(f"sweep {self.name}: eval_split must be validation or test")


def load(path: str | pathlib.Path) -> Sweep:
    """The `get_sweep()` of a sweep file (one clear error for a missing or wrong file)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_onerec_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"sweep file {path} defines no get_sweep()")
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path}: get_sweep() must return a scaling.sweep.Sweep")
    base = pathlib.Path(sweep.config)
    if not base.is_absolute() and (path.parent / base).is_file():
        sweep = dataclasses.replace(sweep, config=str(path.parent / base))
    return sweep


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A point made concrete: its run config and what it will cost."""

    point: Point
    cfg: ml_collections.ConfigDict
    steps: int
    counts: Any  # onerec_jax.flops.Counts of the point's model
    tokens_per_request: float

    @property
    def flops_per_request(self) -> float:
        return float(self.counts.flops_train)

    @property
    def planned(self) -> dict[str, Any]:
        batch = self.cfg.batch_size
        return {
            "point": self.point.name,
            "family": self.point.family,
            "rung": self.point.rung,
            "seed": self.point.seed,
            "tokens_target": self.point.tokens,
            "budget": self.point.budget,
            **self.counts.params(),
            "steps": self.steps,
            "batch_size": batch,
            "tokens_planned": self.steps * batch * self.tokens_per_request,
            "flops_planned": self.steps * batch * self.flops_per_request,
        }


def point_config(sweep: Sweep, point: Point, steps: int) -> ml_collections.ConfigDict:
    """The run config of `point` trained for `steps` steps: the base config, the sweep's and the
    point's overrides, then rung, seed, steps, schedule and checkpoints. The table is the
    sweep's, linked into each workdir (scaling/runner.py), so no path is in the config."""
    fields = [f"rung={point.rung}", f"seed={point.seed}", *sweep.overrides, *point.overrides]
    fields += [
        f"steps={steps}",
        f"checkpoint_every={max(1, math.ceil(steps / max(1, sweep.checkpoints)))}",
        "eval_every=0",  # the validation loss once, at the end: the loss the fits read
    ]
    cfg = config.resolve(config.load(sweep.config), fields)
    # Warmup: the configured one (base, sweep or point), at most a tenth of a short run.
    warmup = min(cfg.optim.warmup_steps, max(1, steps // 10))
    config.update(cfg, {"optim.warmup_steps": warmup}, f"sweep {sweep.name}")
    return cfg


def _train_source(cfg: ml_collections.ConfigDict) -> Any:
    """The training split as a point's run reads it (a log's sessions as its config cuts
    them), in the first seed's order."""
    from onerec_jax.train.state import training_source

    return training_source(cfg, order_seed=0)


def tokens_per_request(
    src: Any, cfg: ml_collections.ConfigDict, n_levels: int, n: int = 1024
) -> float:
    """Mean semantic-id tokens with a loss per training request: valid target items of the
    first `n` requests of the training split `src` x the table's levels."""
    from onerec_jax.data import schema
    from onerec_jax.train.batches import schema_spec

    spec = schema_spec(cfg)
    idx = np.arange(min(n, int(getattr(src, "n_distinct", len(src)))))
    batch = schema.build_batch(src.raw_batch(idx, spec.history_window, spec), spec)
    return float(batch["target_mask"].sum()) / len(idx) * n_levels


def model_counts(cfg: ml_collections.ConfigDict, src: Any, vocab: Sequence[int]) -> Any:
    """Parameter counts and analytic FLOPs (onerec_jax/flops.py Counts) of the config's model
    for the catalogue of `src`, from `jax.eval_shape` (nothing is allocated)."""
    from onerec_jax import flops
    from onerec_jax.train.model_factory import build_model

    return flops.counts(build_model(cfg, src, tuple(vocab)))


def resolve(sweep: Sweep, vocab: Sequence[int]) -> tuple[list[Resolved], list[str]]:
    """Every point's config and steps (with the table's `vocab`), and a note per point left out."""
    from onerec_jax.train.run_config import source_seed

    out, notes = [], []
    sources: dict[tuple[str, int, int], Any] = {}  # by source, world seed, log sessions
    tpr: dict[tuple[str, int, int], float] = {}  # tokens per request
    counted: dict[tuple[str, tuple[str, ...]], Any] = {}  # model counts by rung and overrides
    for p in sweep.points:
        probe = point_config(sweep, p, 1)
        key = (probe.source, source_seed(probe), probe.data.log_session_len)
        if key not in sources:
            sources[key] = _train_source(probe)
            tpr[key] = tokens_per_request(sources[key], probe, len(vocab))
        if (p.rung, p.overrides) not in counted:
            counted[p.rung, p.overrides] = model_counts(probe, sources[key], vocab)
        counts = counted[p.rung, p.overrides]
        fpr = float(counts.flops_train)
        per_step = probe.batch_size
        if p.tokens is not None:
            steps = math.ceil(p.tokens / (tpr[key] * per_step))
        else:
            steps = round(p.budget / (fpr * per_step))
            if steps < sweep.min_steps:
                notes.append(
                    f"{p.name}: left out: budget {p.budget:.3g} is {steps} steps of this rung "
                    f"(fewer than min_steps {sweep.min_steps})"
                )
                continue
        steps = max(1, steps)
        cfg = point_config(sweep, p, steps)
        out.append(Resolved(p, cfg, steps, counts, tpr[key]))
    return out, notes
