"""`onerec data batches`: the world and MovieLens pipelines, their batches and input throughput."""

from __future__ import annotations

import contextlib
import time

import numpy as np
from tqdm import tqdm

from onerec_jax.data import pipeline, schema, sources
from onerec_jax.monitor import MetricWriter


def _show(name: str, batch: dict[str, np.ndarray]) -> None:
    print(f"\n[{name}] one batch:")
    for k in ("static", "short_item", "pos_item", "life_item", "target_item", "target_flags"):
        v = batch[k]
        print(f"  {k:14s} {v.dtype!s:7s} {v.shape!s:12s} row 0: {np.array2string(v[0][:8])}")
    lens = {p: batch[f"{p}_mask"].sum(1) for p in schema.PATHWAYS}
    print(
        "  pathway lengths (mean over batch): "
        + ", ".join(f"{p} {v.mean():.1f}" for p, v in lens.items())
    )


def time_pipeline(
    name: str,
    source: sources.Source,
    spec: schema.SchemaSpec,
    batches: int,
    batch_size: int,
    workers: int,
    writer: MetricWriter | None = None,
    step0: int = 0,
) -> float:
    """Examples/s over `batches` batches after one warm-up batch (worker start-up excluded)."""
    cfg = pipeline.PipelineConfig(batch_size=batch_size, workers=workers)
    ds = pipeline.make_dataset(source, spec, cfg, shard_index=0, shard_count=1)
    with contextlib.closing(iter(ds)) as it:
        first = next(it)
        _show(name, first)
        t = time.perf_counter()
        for i in tqdm(range(batches), desc=f"{name} ({workers} workers)", unit="batch"):
            next(it)
            if writer is not None:
                writer.scalars(
                    step0 + i,
                    {
                        f"data/{name}/examples_per_s": (i + 1)
                        * batch_size
                        / (time.perf_counter() - t)
                    },
                )
        rate = batches * batch_size / (time.perf_counter() - t)
    print(f"  throughput: {rate:,.0f} examples/s ({workers} workers, batch {batch_size})")
    return rate


def run(logdir: str = "runs/batches", batches: int = 40, workers: int = 2) -> dict[str, float]:
    spec = schema.SchemaSpec()  # the report's pathways: 20 / 256 / 2000
    print(
        f"schema: short {spec.short_len}, positive {spec.pos_len}, lifelong {spec.life_len}, "
        f"targets {spec.max_targets}"
    )
    world = sources.open_source("world:small")
    h, se = world.entropy_floor(4096)
    print(
        f"world:small: {world.n_users:,} users, {world.n_items:,} items, "
        f"{world.n_distinct:,} distinct training requests; next-item entropy floor of the "
        f"training split {h:.3f} ± {se:.3f} nats"
    )
    ml = sources.open_source("movielens-100k")
    print(f"movielens-100k: {ml.n_users} users, {ml.n_items} items, {len(ml)} train examples")
    rates = {}
    with MetricWriter(logdir) as writer:
        writer.hparams({"batches": batches, "workers": workers, **spec.__dict__})
        rates["world:small"] = time_pipeline(
            "world-small", world, spec, batches, 64, workers, writer
        )
        rates["movielens-100k"] = time_pipeline("movielens", ml, spec, batches, 64, workers, writer)
    pipeline.settle()
    print(f"\nTensorBoard logs in {logdir}")
    return rates
