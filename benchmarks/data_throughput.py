"""Input pipeline throughput: examples/s of the `small` world with full pathways (20/256/2000).

Side by side in one run: grain with 0, 1 and 2 workers, and, as the reference point, the same
examples built one at a time (a batch of one per call) in the calling process. Warm-up batches (and
worker start-up) are excluded. Writes benchmarks/results/data_throughput.json.

    .venv/bin/python benchmarks/data_throughput.py [--seconds 10] [--batch 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import time

import numpy as np

from onerec_jax.data import pipeline, schema, sources

GOAL_PER_CORE = 2000.0  # the input pipeline's goal: examples/s per core


def _rate(it, batch: int, seconds: float, warmup: int = 3) -> tuple[float, int]:
    for _ in range(warmup):
        next(it)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        next(it)
        n += batch
    return n / (time.perf_counter() - t), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "data_throughput.json")
    )
    args = ap.parse_args()
    spec = schema.SchemaSpec()
    world = sources.open_source("world:small")
    results = {
        "spec": vars(spec),
        "batch": args.batch,
        "seconds": args.seconds,
        "cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "runs": {},
    }

    # Reference: one example per build call (what a per-example grain map would do).
    spec_one = spec
    n, t, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t < args.seconds:
        schema.build_batch(world.raw_batch(np.asarray([i]), spec_one.history_window), spec_one)
        i += 1
        n += 1
    one = n / (time.perf_counter() - t)
    results["runs"]["per_example_build"] = {"examples_per_s": one, "cores": 1}
    print(f"per-example build, 1 core: {one:,.0f} examples/s")

    for workers in (0, 1, 2):
        cfg = pipeline.PipelineConfig(batch_size=args.batch, workers=workers)
        ds = pipeline.make_dataset(world, spec, cfg, shard_index=0, shard_count=1)
        with contextlib.closing(iter(ds)) as it:
            rate, count = _rate(it, args.batch, args.seconds)
        cores = max(workers, 1)
        results["runs"][f"workers={workers}"] = {
            "examples_per_s": rate,
            "examples": count,
            "cores": cores,
            "per_core": rate / cores,
            "vs_per_example": rate / one,
        }
        print(
            f"grain, {workers} workers: {rate:,.0f} examples/s = {rate / cores:,.0f} per core "
            f"({rate / one:.1f}x per-example build; goal {GOAL_PER_CORE:,.0f}/core)"
        )
    pipeline.settle()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
