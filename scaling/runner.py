"""Running a sweep (scaling/sweep.py): every point an ordinary training run, claimed atomically.

The sweep directory:

    tokenizer/          one semantic-id table for every point (built once, by one runner)
    runs/POINT/         each point's ordinary workdir (checkpoints, metrics.jsonl, tb/, summary)
    claims/POINT.<g>    who trains POINT now (scaling/claims.py)
    rows/POINT.json     a finished point's results row: the point is done once this exists
    failed/POINT.txt    the traceback of a point that failed (it is retried on the next run)
    results.jsonl       the results table, one row per finished point (scaling/results.py)
    plan.json           the resolved points (steps per point); a changed sweep is refused

A runner goes through the points in order: a done point is skipped, one claimed by a live
runner is left to it, any other is claimed, trained (resumed from its checkpoints when an
earlier runner was stopped), scored (Recall@10 and, on the world, true engagement), and its
row written (rows/POINT.json atomically, then appended to results.jsonl once). Several runners,
on one machine or on several sharing the directory, each train different points.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from scaling import results
from scaling import sweep as sweep_lib
from scaling.claims import Claims

_TOKENIZER = "_tokenizer"


def _write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _base_config(sweep: sweep_lib.Sweep) -> Any:
    """The config the table is built from: every point must share its source and world."""
    from onerec_jax.train.run_config import source_seed

    cfgs = [sweep_lib.point_config(sweep, p, 1, None) for p in sweep.points]
    worlds = {(c.source, source_seed(c), c.tokenizer_codes) for c in cfgs}
    if len(worlds) > 1:
        raise ValueError(
            f"sweep {sweep.name}: its points read different data or tables {sorted(worlds)}; "
            "one sweep shares one table: fix world_seed (not -1) and the source in the base config"
        )
    return cfgs[0]


def table(sweep: sweep_lib.Sweep, sweep_dir: pathlib.Path, claims: Claims, build: bool = True):
    """The sweep's semantic-id table (SemanticIds), built by the first runner to claim it
    while the others wait for it; None when it is not built and `build` is false."""
    from onerec_jax.tokenizer.semantic_ids import SemanticIds
    from onerec_jax.train import state as state_lib

    done = sweep_dir / "tokenizer" / "semantic_ids.npz"
    cfg = _base_config(sweep)
    if not build:
        return SemanticIds.load(done.parent) if done.is_file() else None
    while not done.is_file() or claims.holder(_TOKENIZER) is not None:
        if claims.try_claim(_TOKENIZER):
            try:
                state_lib.load_table(cfg, sweep_dir, build=True)  # into SWEEP/tokenizer
            finally:
                claims.release(_TOKENIZER)
            break
        print(f"sweep: waiting for {claims.holder(_TOKENIZER)} to build the table", flush=True)
        time.sleep(5)
    return SemanticIds.load(done.parent)


def _check_plan(sweep_dir: pathlib.Path, planned: list[dict[str, Any]]) -> None:
    """plan.json holds each point's resolved steps; a point that would now train differently
    (the sweep file changed under its runs) is refused, new points are added."""
    path = sweep_dir / "plan.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for p in planned:
        o = old.get(p["point"])
        if o is not None and (o["steps"], o["batch_size"]) != (p["steps"], p["batch_size"]):
            raise ValueError(
                f"{path}: point {p['point']} was planned at {o['steps']} steps x {o['batch_size']}"
                f" requests, the sweep now asks {p['steps']} x {p['batch_size']}: a changed sweep "
                "needs a new --dir (or delete the point's runs/ and rows/ entries)"
            )
    merged = old | {p["point"]: p for p in planned}
    if merged != old:
        _write_atomic(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")


def sync_results(sweep_dir: pathlib.Path) -> int:
    """Append to results.jsonl the finished rows it lacks (a runner stopped between writing a
    point's row file and appending it); returns how many."""
    rows = [json.loads(p.read_text()) for p in sorted((sweep_dir / "rows").glob("*.json"))]
    if not rows:
        return 0
    return results.append_missing(sweep_dir / "results.jsonl", rows, key="point")


def entropy_floor(cfg: Any) -> float | None:
    """The world's entropy floor (nats/item) over the validation requests behind the eval
    loss; None for a logged source."""
    from onerec_jax.data.sources import open_source
    from onerec_jax.train.run_config import source_seed

    src = open_source(cfg.source, seed=source_seed(cfg), split="validation")
    if not hasattr(src, "entropy_floor") or cfg.eval_requests < 2:
        return None
    return round(src.entropy_floor(cfg.eval_requests)[0], 6)


def _train_point(r: sweep_lib.Resolved, sweep: sweep_lib.Sweep, sweep_dir: pathlib.Path) -> bool:
    """Train and score one claimed point; False when training stopped early (SIGTERM)."""
    from onerec_jax.evaluate import evaluate_run
    from onerec_jax.train import loop

    name = r.point.name
    workdir = sweep_dir / "runs" / name
    summary = loop.train(r.cfg, workdir)
    if summary["status"] != "finished":
        return False
    extra: dict[str, Any] = {"eval_split": sweep.eval_split}
    if sweep.eval_requests:
        m = evaluate_run(
            workdir,
            sweep.eval_split,
            beam=sweep.beam,
            batch=min(64, sweep.eval_requests),
            max_requests=sweep.eval_requests,
        )
        keys = ("recall@10", "ndcg@10", "engagement@10", "engagement_logged")
        extra |= {k: m[k] for k in keys if k in m} | {"ranked_requests": m["n_requests"]}
    labels = {k: v for k, v in r.planned.items() if k in ("point", "family", "seed", "budget")}
    row = results.run_row(
        workdir,
        extra,
        **labels,
        sweep=sweep.name,
        tokens_target=r.point.tokens,
        entropy_floor=entropy_floor(r.cfg),
    )
    _write_atomic(sweep_dir / "rows" / f"{name}.json", json.dumps(row, sort_keys=True) + "\n")
    results.append_missing(sweep_dir / "results.jsonl", [row], key="point")
    (sweep_dir / "failed" / f"{name}.txt").unlink(missing_ok=True)
    return True


def run(
    sweep: sweep_lib.Sweep,
    sweep_dir: str | pathlib.Path,
    *,
    only: Sequence[str] | None = None,
    wait: bool = False,
    stale_after_s: float = 600.0,
) -> int:
    """Run the sweep's points (or `only` these names) that no one has finished or holds; with
    `wait`, then wait for the points other runners hold and take over any they abandon.
    Returns the exit status: 0 when every point asked for is done (or left to a live runner
    without `wait`), 1 when one failed, 3 when training was preempted (SIGTERM)."""
    sweep_dir = pathlib.Path(sweep_dir).resolve()
    with Claims(sweep_dir / "claims", stale_after_s=stale_after_s) as claims:
        tbl = table(sweep, sweep_dir, claims)
        resolved, notes = sweep_lib.resolve(sweep, tbl.vocab, sweep_dir / "tokenizer")
        for note in notes:
            print(f"sweep: {note}", file=sys.stderr)
        _check_plan(sweep_dir, [r.planned for r in resolved])
        sync_results(sweep_dir)
        if only:
            known = {r.point.name for r in resolved}
            unknown = [n for n in only if n not in known]
            if unknown:
                raise ValueError(f"sweep {sweep.name} has no point {', '.join(unknown)}")
            resolved = [r for r in resolved if r.point.name in only]

        def done(r: sweep_lib.Resolved) -> bool:
            return (sweep_dir / "rows" / f"{r.point.name}.json").is_file()

        todo = list(resolved)
        # A bar on a terminal; in a log file, one line per point instead.
        tty = sys.stderr.isatty()
        bar = tqdm(total=len(todo), initial=sum(map(done, todo)), desc="sweep", unit="run",
                   disable=not tty)  # fmt: skip
        failed: list[str] = []
        t0 = time.perf_counter()
        while True:
            held = []
            for r in todo:
                name = r.point.name
                if done(r) or name in failed:
                    continue
                if not claims.try_claim(name):
                    held.append(name)
                    continue
                bar.write(f"sweep: {name}: {r.steps} steps x {r.cfg.batch_size} requests")
                sys.stdout.flush()
                try:
                    finished = _train_point(r, sweep, sweep_dir)
                except Exception:
                    failed.append(name)
                    text = traceback.format_exc()
                    _write_atomic(sweep_dir / "failed" / f"{name}.txt", text)
                    bar.write(f"sweep: {name} FAILED: {text.strip().splitlines()[-1]}")
                    continue
                finally:
                    claims.release(name)
                if not finished:
                    bar.close()
                    print(f"sweep: stopped during {name}; run the same command to resume")
                    return 3
                bar.n = sum(map(done, todo))  # points other runners finished count too
                bar.refresh()
                if not tty:
                    print(f"sweep: {name} done ({sum(map(done, todo))}/{len(todo)} points)")
            if not (wait and held):
                break
            time.sleep(10)  # points other runners hold: wait, or take over what they drop
        bar.close()
        n_done = sum(map(done, todo))
        msg = f"sweep: {n_done}/{len(todo)} points done ({time.perf_counter() - t0:.0f} s this run)"
        msg += f"; results: {sweep_dir / 'results.jsonl'}"
        if held:
            msg += f"; held by other runners: {', '.join(held)}"
        if failed:
            msg += f"; FAILED: {', '.join(failed)} (tracebacks in {sweep_dir / 'failed'})"
        print(msg, flush=True)
        return 1 if failed else 0
