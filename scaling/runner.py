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

import contextlib
import functools
import json
import pathlib
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from onerec_jax.atomic import write_atomic
from scaling import results
from scaling import sweep as sweep_lib
from scaling.claims import Claims

_TOKENIZER = "_tokenizer"


def _row_path(sweep_dir: pathlib.Path, name: str) -> pathlib.Path:
    """A finished point's row: the point is done once this file exists."""
    return sweep_dir / "rows" / f"{name}.json"


class Stopped(BaseException):
    """SIGTERM outside a training step (scoring, waiting): stop cleanly, releasing claims."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    # The training loop installs its own handler while it trains (it checkpoints first).
    def stop(signum: int, frame: Any) -> None:
        raise Stopped()

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def base_config(sweep: sweep_lib.Sweep) -> Any:
    """The config the table is built from: every point must share its source and world."""
    from onerec_jax.train.run_config import source_seed

    cfgs = [sweep_lib.point_config(sweep, p, 1) for p in sweep.points]
    worlds = {(c.source, source_seed(c), c.tokenizer_codes) for c in cfgs}
    if len(worlds) > 1:
        raise ValueError(
            f"sweep {sweep.name}: its points read different data or tables {sorted(worlds)}; "
            "one sweep shares one table: fix world_seed (not -1) and the source in the base config"
        )
    return cfgs[0]


def built_table(sweep_dir: pathlib.Path) -> Any:
    """The sweep's semantic-id table (SemanticIds) if it is built, else None."""
    from onerec_jax.tokenizer.semantic_ids import SemanticIds

    path = sweep_dir / "tokenizer" / "semantic_ids.npz"
    return SemanticIds.load(path) if path.is_file() else None


def table(sweep: sweep_lib.Sweep, sweep_dir: pathlib.Path, claims: Claims) -> Any:
    """The sweep's semantic-id table (SemanticIds), built by the first runner to claim it
    while the others wait for it."""
    from onerec_jax.train import state as state_lib

    done = sweep_dir / "tokenizer" / "semantic_ids.npz"
    cfg = base_config(sweep)
    while not done.is_file() or claims.holder(_TOKENIZER) is not None:
        if claims.try_claim(_TOKENIZER):
            try:
                state_lib.load_table(cfg, sweep_dir, build=True)  # into SWEEP/tokenizer
            finally:
                claims.release(_TOKENIZER)
            break
        who = (claims.holder(_TOKENIZER) or {}).get("runner", "another runner")
        print(f"sweep: waiting for {who} to build the table", flush=True)
        time.sleep(5)
    return built_table(sweep_dir)


def _fields(r: sweep_lib.Resolved) -> dict[str, Any]:
    from onerec_jax import config

    # As plan.json will hold it (a tuple comes back from JSON as a list).
    return json.loads(json.dumps({"steps": r.steps, **config.flatten(r.cfg.to_dict())}))


def _check_plan(sweep_dir: pathlib.Path, resolved: list[sweep_lib.Resolved]) -> None:
    """plan.json holds each point's resolved config; a point that would now train differently
    (the sweep file changed under its runs) is refused, naming the fields; new points are
    added, and the entry of a point with neither a workdir nor a row is replaced."""
    from onerec_jax.train import run_config

    path = sweep_dir / "plan.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = dict(old)
    for r in resolved:
        name, new = r.point.name, _fields(r)
        o = old.get(name)
        run_dir, row = sweep_dir / "runs" / name, _row_path(sweep_dir, name)
        # A field added to the config since the plan was written, at its default, changes
        # nothing the old point trained with; nor do the fields a run may change when it
        # resumes (memory, compilation, the mesh), though `steps` here is the point's budget.
        diff = sorted(
            k
            for k in set(o or {}) | set(new)
            if (o or {}).get(k, run_config.ADDED_FIELDS.get(k)) != new.get(k)
            and not (k in run_config.RESUMABLE_CHANGES and k != "steps")
            and not k.startswith(run_config.RESUMABLE_SECTIONS)
        )
        if o is not None and diff and (run_dir.exists() or row.exists()):
            raise ValueError(
                f"{path}: point {name} was planned with other settings ({', '.join(diff[:6])}): "
                "the sweep file changed under it. Use a new --dir, or drop the point's old "
                f"results: rm -r {run_dir} {row}"
            )
        merged[name] = new
    if merged != old:
        write_atomic(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")


def sync_results(sweep_dir: pathlib.Path) -> int:
    """Bring results.jsonl in line with the per-point rows/ (a runner stopped between writing a
    point's row file and appending it; a point re-run after its old results were dropped);
    returns how many rows were added or replaced."""
    rows = []
    if not (sweep_dir / "rows").is_dir():
        return 0  # nothing finished yet (or not a sweep directory): the table is left alone
    for p in sorted((sweep_dir / "rows").glob("*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"sweep: skipping {p}: not a JSON row", file=sys.stderr)
    return results.sync_table(sweep_dir / "results.jsonl", rows, key="point")


def entropy_floor(cfg: Any) -> float | None:
    """The world's entropy floor (nats/item) over the validation requests behind the eval
    loss; None for a logged source."""
    from onerec_jax.train.run_config import source_seed

    return _entropy_floor(cfg.source, source_seed(cfg), cfg.eval_requests)


@functools.cache
def _entropy_floor(source: str, seed: int, n_requests: int) -> float | None:
    # Once per source and request count: every point of a sweep shares them.
    from onerec_jax.data.sources import open_source

    src = open_source(source, seed=seed, split="validation")
    if not hasattr(src, "entropy_floor") or n_requests < 2:
        return None
    return round(src.entropy_floor(n_requests)[0], 6)


def _train_point(r: sweep_lib.Resolved, sweep: sweep_lib.Sweep, sweep_dir: pathlib.Path) -> bool:
    """Train and score one claimed point; False when training stopped early (SIGTERM)."""
    from onerec_jax.evaluate import evaluate_run
    from onerec_jax.train import loop

    name = r.point.name
    workdir = sweep_dir / "runs" / name
    # The shared table, reached by a relative link: the run's config names no path, so hosts
    # mounting the sweep directory at different places resume each other's points.
    # Only the table file is linked: TensorBoard, which follows linked folders, would show the
    # tokenizer's own logs once per point.
    link = workdir / "tokenizer" / "semantic_ids.npz"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(pathlib.Path("..", "..", "..", "tokenizer", "semantic_ids.npz"))
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
    write_atomic(_row_path(sweep_dir, name), results.line(row))
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
    without `wait`), 1 when one failed, 3 when stopped by SIGTERM (the same command resumes)."""
    sweep_dir = pathlib.Path(sweep_dir).resolve()
    try:
        with _stop_on_sigterm(), Claims(sweep_dir / "claims", stale_after_s=stale_after_s) as c:
            return _run(sweep, sweep_dir, c, only, wait)
    except Stopped:
        print("sweep: stopped (SIGTERM); run the same command to resume", flush=True)
        return 3


def _run(
    sweep: sweep_lib.Sweep,
    sweep_dir: pathlib.Path,
    claims: Claims,
    only: Sequence[str] | None,
    wait: bool,
) -> int:
    tbl = table(sweep, sweep_dir, claims)
    resolved, notes = sweep_lib.resolve(sweep, tbl.vocab)
    left_out = {n.split(":")[0] for n in notes}
    for note in notes:
        print(f"sweep: {note}", file=sys.stderr)
    _check_plan(sweep_dir, resolved)
    sync_results(sweep_dir)
    if only:
        known = {p.name for p in sweep.points}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"sweep {sweep.name} has no point {', '.join(unknown)}")
        if set(only) <= left_out:
            return 0  # a scheduler's task for a point too short to train: nothing to do
        resolved = [r for r in resolved if r.point.name in only]

    def done(r: sweep_lib.Resolved) -> bool:
        return _row_path(sweep_dir, r.point.name).is_file()

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
            if done(r):  # finished by the runner that released it just now
                claims.release(name)
                continue
            bar.write(f"sweep: {name}: {r.steps} steps x {r.cfg.batch_size} requests")
            sys.stdout.flush()
            try:
                finished = _train_point(r, sweep, sweep_dir)
            except Exception:
                failed.append(name)
                text = traceback.format_exc()
                write_atomic(sweep_dir / "failed" / f"{name}.txt", text)
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
                print(f"sweep: {name} done ({bar.n}/{len(todo)} points)", flush=True)
        if not (wait and held):
            break
        time.sleep(10)  # points other runners hold: wait, or take over what they drop
    bar.close()
    sync_results(sweep_dir)
    n_done = sum(map(done, todo))
    failed = [name for name in failed if not _row_path(sweep_dir, name).is_file()]
    msg = f"sweep: {n_done}/{len(todo)} points done ({time.perf_counter() - t0:.0f} s this run)"
    msg += f"; results: {sweep_dir / 'results.jsonl'}"
    if held:
        msg += f"; held by other runners: {', '.join(held)}"
    if failed:
        msg += f"; FAILED: {', '.join(failed)} (tracebacks in {sweep_dir / 'failed'})"
    print(msg, flush=True)
    return 1 if failed else 0
