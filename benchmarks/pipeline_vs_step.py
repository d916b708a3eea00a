"""Input pipeline vs the train step at every CPU rung: can the data keep up?

For each rung, side by side in one process: the requests/s the jitted train step consumes (the
rung's model at `--batch`, f32, median of `--steps` steps after compile) and the requests/s the
training input pipeline produces with 0 workers, i.e. built in the calling process on one core,
as `onerec train` does by default (the same grain dataset and the same semantic-code transform
as the loop, the rung's context lengths). The project's goal: the pipeline >= 5x the step's
consumption, so that building batches costs the step at most a fifth of a core.
Writes benchmarks/results/pipeline_vs_step.json.

    .venv/bin/python benchmarks/pipeline_vs_step.py [--rungs v1-cpu-s v2-0.09m] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from onerec_jax import config
from onerec_jax.configs import default
from onerec_jax.data import pipeline
from onerec_jax.data.sources import open_source
from onerec_jax.model import rungs
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import AddCodes, schema_spec
from onerec_jax.train.model_factory import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOAL = 5.0
CPU_RUNGS = ["v1-cpu-s", "v1-cpu-m", "v2-cpu-s", *rungs.MICRO_RUNGS]
CODES = 64  # codes per level of the stand-in table (3 levels)


def _median_rate(next_batch, batch: int, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        next_batch()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def bench(rung: str, source: str, batch: int, steps: int, unroll: bool) -> dict:
    overrides = [f"rung={rung}", f"source={source}", f"batch_size={batch}"]
    cfg = config.resolve(default.get_config(), [*overrides, f"unroll_layers={unroll}"])
    src = open_source(cfg.source, split="train")
    spec = schema_spec(cfg)
    rng = np.random.default_rng(0)
    table = rng.integers(0, CODES, (src.n_items + 1, 3)).astype(np.int32)
    table[0] = -1  # padding targets
    ds = pipeline.make_dataset(
        src,
        spec,
        pipeline.PipelineConfig(batch_size=batch, workers=0),
        shard_index=0,
        shard_count=1,
        transform=AddCodes(table),
    )
    data = iter(ds)
    for _ in range(3):  # warm-up
        example = next(data)
    produce = _median_rate(lambda: next(data), batch, 4 * steps)

    model = build_model(cfg, src, (CODES,) * 3)
    tx, schedule = step_lib.make_optimizer(step_lib.OptimConfig(total_steps=1000))
    b = jax.tree.map(jnp.asarray, example)
    holder = {"state": step_lib.init_state(model, tx, b, jax.random.key(0))}
    fn = step_lib.jit_train_step(model, tx, schedule, step_lib.OptimConfig(total_steps=1000))

    def one_step() -> None:
        holder["state"], m = fn(holder["state"], b, jax.random.key(0))
        jax.block_until_ready(m)

    t = time.perf_counter()
    one_step()
    compile_s = time.perf_counter() - t
    consume = _median_rate(one_step, batch, steps)
    row = {
        "rung": rung,
        "batch": batch,
        "context": {"short": spec.short_len, "pos": spec.pos_len, "life": spec.life_len},
        "step_requests_per_s": consume,
        "pipeline_requests_per_s": produce,
        "ratio": produce / consume,
        "compile_s": compile_s,
    }
    print(
        f"{rung:10s} step {consume:8.0f} req/s  pipeline {produce:8.0f} req/s  "
        f"{row['ratio']:5.1f}x {'ok' if row['ratio'] >= GOAL else 'BELOW GOAL'}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rungs", nargs="+", default=CPU_RUNGS)
    ap.add_argument("--source", default="world:small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rolled", action="store_true", help="unroll_layers=False")
    out_json = ROOT / "benchmarks" / "results" / "pipeline_vs_step.json"
    ap.add_argument("--json", default=str(out_json))
    a = ap.parse_args()
    rows = [bench(r, a.source, a.batch, a.steps, not a.rolled) for r in a.rungs]
    below = [r["rung"] for r in rows if r["ratio"] < GOAL]
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "jax": jax.__version__,
        "setup": vars(a),
        "goal": GOAL,
        "below_goal": below,
        "rows": rows,
    }
    pathlib.Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(rows) - len(below)}/{len(rows)} rungs at >= {GOAL}x; below: {below or 'none'}")


if __name__ == "__main__":
    main()
