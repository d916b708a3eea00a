"""Popularity and item-kNN on MovieLens-100k with the evaluation code V1 is scored with.

    .venv/bin/python benchmarks/ml100k_baselines.py [--split test] [--json out.json]

Leave-last-out, full ranking on the source's protocol (`onerec_jax.ranking.protocol_of`, the
one `onerec eval` scores V1 with: every item of the user's whole history before the target is
dropped, since MovieLens users rate a movie once); both baselines are fitted on training events
only (a user's last two events are held out). Each result records its protocol.
"""

from __future__ import annotations

import argparse
import json

from onerec_jax import ranking as ev
from onerec_jax.data.sources import open_source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--neighbours", type=int, default=100, help="item-kNN neighbours per item")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    train = ev.training_matrix(open_source("movielens-100k").log)
    split = open_source("movielens-100k", split=a.split)
    res = {
        "split": a.split,
        "popularity": ev.evaluate_scorer(split, ev.Popularity(train)),
        "item_knn": ev.evaluate_scorer(split, ev.ItemKNN(train, k=a.neighbours)),
    }
    print(json.dumps(res, indent=1, sort_keys=True))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
