"""Every baseline's fit, grid and defaults, by name (onerec_jax.baselines.ABOUT lists them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from onerec_jax import ranking
from onerec_jax.baselines import ABOUT, knn, mf, sasrec
from onerec_jax.baselines.data import TrainData


@dataclasses.dataclass(frozen=True)
class Baseline:
    """fit(data, params, seed, validate) -> a scorer with `scores(raw) -> [B, n_items + 1]`;
    `validate(scorer) -> validation NDCG@10` lets an iterative fit pick its epoch count."""

    fit: Callable[..., Any]
    grid: dict[str, list]  # searched on the validation split (every combination)
    default: dict[str, Any]  # fields not in the grid, and the values used without --tune
    stochastic: bool  # results depend on the seed (reported over several)
    distinct: Callable[[dict], bool] = lambda p: True  # False: a grid point equal to another


def _popularity(data: TrainData, params: dict, seed: int = 0, validate: Any = None) -> Any:
    return ranking.Popularity(data.matrix)


def _item_knn(data: TrainData, params: dict, seed: int = 0, validate: Any = None) -> Any:
    return ranking.ItemKNN(data.matrix, k=int(params["k"]))


BASELINES: dict[str, Baseline] = {
    "popularity": Baseline(_popularity, {}, {}, False),
    "item-knn": Baseline(_item_knn, {"k": [50, 100, 200, 400, 800, 1600]}, {"k": 100}, False),
    "seq-knn": Baseline(knn.fit, knn.GRID, knn.DEFAULT, False, knn.distinct),
    "bpr": Baseline(mf.fit_bpr, mf.BPR_GRID, mf.BPR_DEFAULT, True),
    "ease": Baseline(mf.fit_ease, mf.EASE_GRID, mf.EASE_DEFAULT, False),
    "sasrec": Baseline(sasrec.fit, sasrec.GRID, sasrec.DEFAULT, True),
}
if set(BASELINES) != set(ABOUT):
    raise RuntimeError("onerec_jax.baselines.ABOUT and registry.BASELINES name other baselines")
