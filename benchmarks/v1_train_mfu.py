"""V1 train-step throughput and MFU against a matmul peak measured in the same process.

For each rung (scaling/ladder.py) and compute dtype: the jitted, donated train step (forward,
backward, AdamW) on real world:small requests with the rung's context lengths, timed over
`--steps` steps after two warm-up steps. MFU = analytic train FLOPs per step
(onerec_jax/flops.py, matmul accounting) / median step time / peak, where the peak is the best
of a jitted 2048^3 matmul in the same dtype setting (f32; bf16 operands with f32 accumulation),
measured in this process before every row; the highest peak of the run is used.
Writes benchmarks/results/v1_train_mfu.json.

    .venv/bin/python benchmarks/v1_train_mfu.py [--rungs v1-0.015b v1-cpu-m] [--steps 10]
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

from onerec_jax import config, flops
from onerec_jax.configs import default
from onerec_jax.data import schema
from onerec_jax.data.sources import open_source
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.model_factory import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOAL_MFU = 0.30  # the project's goal for the train step: 30 % of the measured matmul peak


def matmul_peak(dtype: jnp.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of a jitted n^3 matmul; bf16 operands accumulate in f32."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def bench_rung(name: str, batch: int, bf16: bool, steps: int) -> dict:
    overrides = [f"rung={name}", "source=world:small", f"batch_size={batch}", f"bf16={bf16}"]
    cfg = config.resolve(default.get_config(), overrides)
    src = open_source(cfg.source, split="train")
    codes = cfg.tokenizer_codes or 128
    vocab = (codes,) * 3
    model = build_model(cfg, src, vocab)
    spec = schema_spec(cfg)
    raw = src.raw_batch(np.arange(batch), spec.history_window, spec)
    b = schema.build_batch(raw, spec)
    rng = np.random.default_rng(0)
    b["target_codes"] = rng.integers(0, codes, (batch, spec.max_targets, 3)).astype(np.int32)
    b = jax.tree.map(jnp.asarray, b)
    ocfg = step_lib.OptimConfig(total_steps=1000)
    tx, schedule = step_lib.make_optimizer(ocfg)
    state = step_lib.init_state(model, tx, b, jax.random.key(0))
    fn = step_lib.jit_train_step(model, tx, schedule, ocfg)
    t = time.perf_counter()
    for i in range(2):  # compile + one warm step
        state, m = fn(state, b, jax.random.key(i))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = fn(state, b, jax.random.key(i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    counts = flops.counts(model)
    achieved = counts.flops_train * batch / step_s
    return {
        "rung": name,
        "dtype": "bf16" if bf16 else "f32",
        "batch": batch,
        "step_s_median": step_s,
        "step_s_min": float(np.min(times)),
        "compile_and_warmup_s": compile_s,
        "requests_per_s": batch / step_s,
        "target_tokens_per_s": batch * spec.max_targets * 3 / step_s,
        "context_tokens_per_s": batch
        * (1 + spec.short_len + spec.pos_len + spec.life_len)
        / step_s,
        "flops_train_per_sample": counts.flops_train,
        "achieved_gflops_per_s": achieved / 1e9,
        "params_total": counts.params_total,
        "params_non_embedding": counts.params_non_embedding,
        "loss_finite": bool(np.isfinite(float(m["train/loss"]))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rungs", nargs="+", default=["v1-0.015b", "v1-cpu-m"])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="one per rung")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtypes", nargs="+", default=["f32", "bf16"])
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "v1_train_mfu.json"))
    args = ap.parse_args()
    if len(args.batch) != len(args.rungs):
        ap.error("give one --batch per rung")
    # The peak is re-measured before every row (shared machines drift by tens of percent
    # within minutes); each row's MFU is against the highest peak of its dtype in the run.
    samples: dict[str, list[float]] = {dt: [] for dt in args.dtypes}
    rows = []
    for name, batch in zip(args.rungs, args.batch, strict=True):
        for dt in args.dtypes:
            samples[dt].append(matmul_peak(jnp.bfloat16 if dt == "bf16" else jnp.float32))
            r = bench_rung(name, batch, dt == "bf16", args.steps)
            rows.append(r)
            print(
                f"{name:10s} {dt:4s} batch {batch:3d}: {r['step_s_median'] * 1e3:8.1f} ms/step "
                f"{r['requests_per_s']:8.1f} req/s {r['target_tokens_per_s']:9.0f} tok/s "
                f"{r['achieved_gflops_per_s']:7.1f} GFLOP/s",
                flush=True,
            )
    peaks = {dt: max(v) for dt, v in samples.items()}
    for r in rows:
        r["peak_gflops_per_s"] = peaks[r["dtype"]] / 1e9
        r["mfu"] = r["achieved_gflops_per_s"] / r["peak_gflops_per_s"]
        # Against the f32 peak as well: bf16 only pays where it beats f32 wall time.
        r["mfu_vs_f32_peak"] = (
            r["achieved_gflops_per_s"] * 1e9 / peaks.get("f32", peaks[r["dtype"]])
        )
        print(
            f"{r['rung']:10s} {r['dtype']:4s} MFU {r['mfu']:.1%} "
            f"(peak {r['peak_gflops_per_s']:.0f} GFLOP/s)"
        )
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "goal_mfu": GOAL_MFU,
        "peak_gflops_per_s": {k: v / 1e9 for k, v in peaks.items()},
        "peak_samples_gflops_per_s": {k: [x / 1e9 for x in v] for k, v in samples.items()},
        "rows": rows,
    }
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
