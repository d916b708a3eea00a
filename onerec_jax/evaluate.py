"""`onerec eval`: restore a run's newest checkpoint and rank a split with constrained beam search.

Each request's beam (default 128 items; a session-wise model's sessions are read item by item,
best session first) is filtered of repeats and, where the source's protocol drops seen items
(`onerec_jax.ranking.protocol_of`: MovieLens yes, the world no), of every item of the user's
whole history before the target - not of the run's context window, so runs with different
contexts are scored alike. It is then cut to K_max = 50 and scored with
`onerec_jax.ranking.rank_metrics` (the same code and protocol that score the popularity and
item-kNN baselines); the protocol is recorded in the eval JSON. On the world, `engagement@K`
is the true expected reward (the generator's engagement model) of the top K recommended items,
next to `engagement_logged`, that of the items the logging policy actually served. On every
source `logged_reward@K` is the logged feedback of the top K per slot: a recommended item that
is a held-out target earns its logged labels fused with the reward weights (like +2, dislike
-5, play share +1, ...; `onerec_jax.feedback.logged_reward`), any other item 0.

On the e-commerce world (world:mall-*) a request's list keeps only products its scenario can
show (the beam is filtered like seen items), `orders@K` / `gmv@K` are the true expected orders
and GMV of the top-K list (sums over its slots), and `scenarios` holds every metric again for
the requests of each scenario (product card, short video, live stream).

The search runs on a device mesh (onerec_jax/sharding.py): the run's own by default, or one
given for the machine at hand (`onerec eval --mesh data=-1`). The checkpoint is restored
straight into the mesh's layout and each batch of requests is split over its batch axes
(`onerec_jax.generate.beam_search_on_mesh`); the metrics do not depend on the mesh. With
several JAX processes each one reads the same requests and gets the same metrics; only
process 0 writes the eval JSON.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from onerec_jax import feedback, sharding
from onerec_jax import ranking as ev
from onerec_jax.atomic import write_atomic
from onerec_jax.data import schema
from onerec_jax.data.sources import open_source
from onerec_jax.generate import beam_search_on_mesh, on_mesh
from onerec_jax.train.run_config import load_run_config, source_seed
from onerec_jax.train.state import restore_latest, run_mesh

ENGAGEMENT_KS = (1, 5, 10)
DEFAULT_BEAM = 128


def true_reward(
    src, batch: dict[str, np.ndarray], items_BxN: np.ndarray, objective: str = "reward"
) -> np.ndarray:
    """The world's expected reward (or another of its exact expectations, e.g. "gmv" on the
    e-commerce world) of recommending `items` [B, N] to the batch's requests; NaN where an
    item id is 0 (an empty slot or a padded target)."""
    r = src.true_engagement(batch["user_id"], batch["request_ts"], np.maximum(items_BxN, 1))
    return np.where(items_BxN > 0, r[objective], np.nan)


def _drop_seen(
    items_BxW: np.ndarray, seen_items: dict[str, Any], k: int, allowed: np.ndarray | None = None
) -> np.ndarray:
    """The first k distinct items of each row that are not among the row's `seen_items` (and
    are `allowed` [B, W], where given)."""
    off = seen_items["hist_offsets"]
    out = np.zeros((len(items_BxW), k), np.int64)
    ok = np.ones(items_BxW.shape, bool) if allowed is None else allowed
    for i, row in enumerate(items_BxW):  # host-side list filtering, B rows per batch
        seen = set(seen_items["hist_item"][off[i] : off[i + 1]].tolist())
        keep = []
        for x, good in zip(row.tolist(), ok[i].tolist(), strict=True):
            if x > 0 and good and x not in seen:
                keep.append(x)
                seen.add(x)  # a session-wise beam can repeat an item: rank it once
            if len(keep) == k:
                break
        out[i, : len(keep)] = keep
    return out


def evaluate_run(
    workdir: str | pathlib.Path,
    split: str = "test",
    beam: int = DEFAULT_BEAM,
    batch: int = 64,
    max_requests: int | None = None,
    mesh: Mapping[str, int] | None = None,
    write: bool = True,
    scorer: Any = None,
    scenario: str = "",
) -> dict[str, Any]:
    """Metrics of the newest checkpoint on `split` (all requests of a logged source; the first
    `max_requests`, default 2048, of the world's unbounded splits), `batch` requests per beam
    search (the metrics may not depend on it), on the mesh `mesh` ({"data": -1}, say; default
    the run's own `mesh` section, an error if it does not fit the devices here). A batch is
    padded up to a multiple of the mesh's batch shards (pad rows dropped). The metrics go
    to `eval_path` (per request count and beam); `write=False` writes no eval JSON (the
    CLI prints first, then writes; an alignment run compares its init with itself).
    `scorer(batch, items [B, K]) -> [B, K]` (a reward model; NaN for item 0) adds
    `reward_model@K`, its mean score of the top K. `scenario` (e-commerce world: card, video,
    live) evaluates on that scenario's requests only, whatever the run trained on."""
    if batch < 1:
        raise ValueError(f"eval batch size must be >= 1, got {batch}")
    if beam < 1:
        raise ValueError(f"eval beam must be >= 1, got {beam}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"eval max_requests must be >= 1 (or none: all), got {max_requests}")
    workdir = pathlib.Path(workdir).resolve()  # orbax needs absolute paths
    devices = run_mesh(load_run_config(workdir), mesh)
    run, state, step = restore_latest(workdir, devices)
    cfg, model, table, spec = run.cfg, run.model, run.table, run.spec
    variables = {"params": state.params, "moe_bias": state.moe_bias}
    trie = on_mesh(table.trie(), sharding.replicated(devices))  # placed once, read by all
    name = cfg.source
    if scenario:
        if not name.startswith("world:mall-"):
            raise ValueError(f"--scenario needs an e-commerce run (world:mall-*); source {name!r}")
        name = ":".join([*name.split(":")[:2], scenario])
    src = open_source(name, seed=source_seed(cfg), split=split)
    n = len(src) if src.kind != "world" else 2048  # the world's splits are unbounded
    n = min(n, max_requests or n)
    batch = min(batch, n)
    protocol = ev.protocol_of(src)
    ranked, targets, masks, reward, target_reward, scored, logged = [], [], [], [], [], [], []
    scen_rows, funnel = [], []  # e-commerce: each request's scenario, the top-K's orders and GMV
    for start in tqdm(range(0, n, batch), desc=f"eval {split}"):
        idx = np.arange(start, min(start + batch, n))
        # The model reads the run's context window; what counts as seen is the protocol's.
        raw = src.raw_batch(idx, spec.history_window, spec)
        b = schema.build_batch(raw, spec)
        pad = batch - len(idx)  # one compiled shape: pad the last batch with copies
        inputs = {
            k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v
            for k, v in b.items()
            if k not in ("user_id", "request_ts")
        }
        out = beam_search_on_mesh(model, variables, inputs, trie, beam, devices)
        # Session-wise models: the items of the sessions, best session first.
        items = np.asarray(out["sessions" if "sessions" in out else "items"])[: len(idx)]
        items = items.reshape(len(idx), -1)
        mall = "scenario" in raw and src.kind == "world"  # the e-commerce world
        shown = src.shown_in(raw["scenario"], items) if mall else None
        top = _drop_seen(items, ev.seen_items(src, idx, protocol), max(ev.KS), shown)
        ranked.append(top)
        targets.append(b["target_item"])
        masks.append(b["target_mask"])
        logged.append(feedback.logged_reward(b, top, 0.0))
        if scorer is not None:
            scored.append(scorer(b, top))
        if "scenario" in raw:
            scen_rows.append(np.asarray(raw["scenario"]))
        if mall:
            e = src.true_engagement(b["user_id"], b["request_ts"], np.maximum(top, 1))
            funnel.append({f: np.where(top > 0, e[f], 0.0) for f in ("order", "gmv")})
        if src.kind == "world":  # the generator knows the expected reward of any item
            reward.append(true_reward(src, b, top))
            target_reward.append(
                true_reward(src, b, np.where(b["target_mask"], b["target_item"], 0))
            )
    cols = {
        "ranked": ranked,
        "targets": targets,
        "masks": masks,
        "logged": logged,
        "reward": reward,
        "target_reward": target_reward,
        "scored": scored,
        "order": [f["order"] for f in funnel],
        "gmv": [f["gmv"] for f in funnel],
    }
    cols = {name: np.concatenate(v) for name, v in cols.items() if v}
    metrics = _metrics(cols)
    if scen_rows:
        scen = np.concatenate(scen_rows)
        metrics["scenarios"] = {
            name: {
                **_metrics({c: v[scen == j] for c, v in cols.items()}),
                "n_requests": int((scen == j).sum()),
            }
            for j, name in enumerate(schema.SCENARIOS, start=1)
            if (scen == j).any()
        }
    metrics.update(split=split, step=int(step), n_requests=int(n), beam=beam, protocol=protocol)
    if scenario:
        metrics["scenario"] = scenario
    if write:
        write_eval(workdir, metrics, max_requests)
    return metrics


def _metrics(cols: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every metric of a set of requests from its columns (rows are requests)."""
    metrics: dict[str, Any] = ev.rank_metrics(cols["ranked"], cols["targets"], cols["masks"])
    for k in ENGAGEMENT_KS:  # per slot of the list, whatever the source
        metrics[f"logged_reward@{k}"] = float(np.nanmean(cols["logged"][:, :k]))
    if "reward" in cols:
        for k in ENGAGEMENT_KS:
            metrics[f"engagement@{k}"] = float(np.nanmean(cols["reward"][:, :k]))
        metrics["engagement_logged"] = float(np.nanmean(cols["target_reward"]))
    if "order" in cols:  # the whole top-K list's expected orders and GMV
        for k in ENGAGEMENT_KS:
            metrics[f"orders@{k}"] = float(cols["order"][:, :k].sum(1).mean())
            metrics[f"gmv@{k}"] = float(cols["gmv"][:, :k].sum(1).mean())
    if "scored" in cols:
        for k in ENGAGEMENT_KS:
            metrics[f"reward_model@{k}"] = float(np.nanmean(cols["scored"][:, :k]))
    return metrics


def eval_path(
    workdir: pathlib.Path, split: str, max_requests: int | None, beam: int, scenario: str = ""
) -> pathlib.Path:
    """Where an evaluation is kept: WORKDIR/eval_{split}.json for the whole split at the
    default beam, eval_{split}_n{N}_beam{B}.json otherwise (a quick look at 8 requests never
    replaces the full result); one scenario's requests add _{scenario} to the split."""
    split = f"{split}_{scenario}" if scenario else split
    if max_requests is None and beam == DEFAULT_BEAM:
        return pathlib.Path(workdir) / f"eval_{split}.json"
    n = "all" if max_requests is None else max_requests
    return pathlib.Path(workdir) / f"eval_{split}_n{n}_beam{beam}.json"


def write_eval(workdir: pathlib.Path, metrics: dict[str, Any], max_requests: int | None) -> None:
    """The metrics as JSON at `eval_path` (atomically; by process 0 only: every process has
    the same metrics); a failed write is one error naming the file."""
    if jax.process_index() != 0:
        return
    path = eval_path(
        workdir, metrics["split"], max_requests, metrics["beam"], metrics.get("scenario", "")
    )
    try:
        write_atomic(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise OSError(f"{path}: could not write the evaluation ({e.strerror or e})") from None
