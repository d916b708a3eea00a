"""True engagement of V1's recommendations on the world, next to baselines and a ceiling.

The world knows the expected reward of any (request, item) (onerec_jax/data/world.py), so a
recommender can be judged on what it would earn, not only on whether it recalls the logged
items. On the first `--requests` test requests, side by side:

  V1          `onerec eval`'s beam search on the run's newest checkpoint
  popularity  items ranked by how often they appear in the histories of training requests
  item-kNN    cosine item-item similarity over those histories (the MovieLens baseline)
  random      uniformly random items (the floor)
  oracle      the K items of highest true reward for each request (the ceiling)

All five rank on the source's protocol (`onerec_jax.ranking.protocol_of`; on the world: every
item, seen or not, since the feed re-exposes items), recorded in the JSON.

Reported: engagement@K (mean true reward of the top K, K = 1, 5, 10), the logged items'
reward, and Recall@10 / NDCG@10 against the logged targets.

    .venv/bin/python benchmarks/world_engagement.py --workdir runs/v1_world_small
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from onerec_jax import evaluate
from onerec_jax import ranking as ev
from onerec_jax.data import schema
from onerec_jax.data.sources import open_source
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.run_config import load_run_config, source_seed

KS = evaluate.ENGAGEMENT_KS


def _train_matrix(src, n: int, spec) -> sp.csr_matrix:
    """Requests x items counts of the histories of the first n training requests."""
    rows, cols = [], []
    for start in range(0, n, 512):
        idx = np.arange(start, min(start + 512, n))
        raw = src.raw_batch(idx, spec.history_window, spec)
        off = raw["hist_offsets"]
        rows.append(start + np.repeat(np.arange(len(idx)), np.diff(off)))
        cols.append(raw["hist_item"])
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, src.n_items + 1))


def _score(test, spec, n: int, rank_fn) -> dict:
    """Engagement and recall of `rank_fn(raw, batch, seen) -> top-50 items` on test requests,
    `seen` being the items the protocol forbids (`ev.seen_items`)."""
    protocol = ev.protocol_of(test)
    rewards, ranked, targets, masks = [], [], [], []
    for start in range(0, n, 256):
        idx = np.arange(start, min(start + 256, n))
        raw = test.raw_batch(idx, spec.history_window, spec)
        b = schema.build_batch(raw, spec)
        top = rank_fn(raw, b, ev.seen_items(test, idx, protocol))
        rewards.append(evaluate.true_reward(test, b, top))
        ranked.append(top)
        targets.append(b["target_item"])
        masks.append(b["target_mask"])
    r = np.concatenate(rewards)
    out = {f"engagement@{k}": float(np.nanmean(r[:, :k])) for k in KS}
    m = ev.rank_metrics(np.concatenate(ranked), np.concatenate(targets), np.concatenate(masks))
    out.update({k: m[k] for k in ("recall@10", "ndcg@10")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a V1 run on a world source")
    ap.add_argument("--requests", type=int, default=2048, help="test requests scored")
    ap.add_argument("--train-requests", type=int, default=20000, help="for the baselines")
    ap.add_argument("--beam", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    workdir = pathlib.Path(a.workdir)
    cfg = load_run_config(workdir)
    if not cfg.source.startswith("world"):
        raise SystemExit(f"{workdir} trained on {cfg.source}; true engagement needs a world")
    spec = schema_spec(cfg)
    train = open_source(cfg.source, seed=source_seed(cfg), split="train")
    test = open_source(cfg.source, seed=source_seed(cfg), split="test")
    n = a.requests

    res = {"source": cfg.source, "requests": n, "beam": a.beam, "protocol": ev.protocol_of(test)}
    v1 = evaluate.evaluate_run(workdir, "test", beam=a.beam, max_requests=n)
    res["v1"] = {k: v1[k] for k in ("recall@10", "ndcg@10", *(f"engagement@{k}" for k in KS))}
    res["logged"] = v1["engagement_logged"]

    mat = _train_matrix(train, a.train_requests, spec)
    pop, knn = ev.Popularity(mat), ev.ItemKNN(mat)
    rng = np.random.default_rng(0)
    bar = tqdm(total=4, desc="baselines")

    def ranked(scorer):
        return lambda raw, b, seen: ev.rank_unseen(scorer.scores(raw), seen, 50)

    res["popularity"] = _score(test, spec, n, ranked(pop))
    bar.update()
    res["item_knn"] = _score(test, spec, n, ranked(knn))
    bar.update()

    def random_items(raw, b, seen):
        s = rng.random((len(raw["hist_offsets"]) - 1, train.n_items + 1))
        return ev.rank_unseen(s, seen, 50)

    res["random"] = _score(test, spec, n, random_items)
    bar.update()

    def oracle(raw, b, seen):
        items = np.arange(1, train.n_items + 1)[None, :].repeat(len(b["user_id"]), 0)
        r = test.true_engagement(b["user_id"], b["request_ts"], items)["reward"]
        s = np.concatenate([np.full((len(r), 1), -np.inf), r], axis=1)
        return ev.rank_unseen(s, seen, 50)

    res["oracle"] = _score(test, spec, n, oracle)
    bar.update()
    bar.close()
    for name in ("random", "popularity", "item_knn", "v1", "oracle"):
        row = res[name]
        print(
            f"{name:10s} " + " ".join(f"{k} {row[k]:.4f}" for k in row),
            flush=True,
        )
    print(f"logged items' reward {res['logged']:.4f}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
