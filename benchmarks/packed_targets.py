"""No compute on padding: the train step with `pack_targets` against the same step over every
target position, side by side in one process.

For each rung: world:small requests (m = 5 target items; the world's sessions are often
shorter, so a share of the target slots is padding) with a stand-in semantic-id table, f32,
`unroll_layers=True`; the jitted step with `capacity = token_capacity(batch, buckets)` and
without, alternating, median of `--steps` each after compile.
Writes benchmarks/results/packed_targets.json.

    .venv/bin/python benchmarks/packed_targets.py [--rungs v2-1.7m v1-1.1m] [--buckets 4 16]
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
from onerec_jax.data import schema
from onerec_jax.data.sources import open_source
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.model_factory import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODES = 64


def bench(rung: str, batch: int, buckets: list[int], steps: int) -> dict:
    overrides = [f"rung={rung}", "source=world:small", f"batch_size={batch}", "unroll_layers=True"]
    cfg = config.resolve(default.get_config(), overrides)
    src = open_source(cfg.source, split="train")
    spec = schema_spec(cfg)
    model = build_model(cfg, src, (CODES,) * 3)
    b = schema.build_batch(src.raw_batch(np.arange(batch), spec.history_window, spec), spec)
    table = np.random.default_rng(0).integers(0, CODES, (src.n_items + 1, 3)).astype(np.int32)
    table[0] = -1  # padding targets
    b["target_codes"] = table[b["target_item"]]
    caps = [None, *(step_lib.token_capacity(b["target_codes"], 1, k) for k in buckets)]
    b = jax.tree.map(jnp.asarray, b)
    ocfg = step_lib.OptimConfig(total_steps=1000)
    tx, schedule = step_lib.make_optimizer(ocfg)
    fn = step_lib.jit_train_step(model, tx, schedule, ocfg)
    states = {c: step_lib.init_state(model, tx, b, jax.random.key(0)) for c in caps}

    def run(c: int | None) -> float:
        t = time.perf_counter()
        states[c], m = fn(states[c], b, jax.random.key(0), c)
        jax.block_until_ready(m)
        return time.perf_counter() - t

    for c in caps:
        run(c)  # compile
    times: dict = {c: [] for c in caps}
    for r in range(steps):
        for c in caps if r % 2 == 0 else caps[::-1]:
            times[c].append(run(c))
    positions = batch * spec.max_targets * 3
    valid = int(np.all(np.asarray(b["target_codes"]) >= 0, -1).sum()) * 3
    row = {
        "rung": rung,
        "batch": batch,
        "target_positions": positions,
        "real_target_tokens": valid,
        "full_ms": 1e3 * float(np.median(times[None])),
        "packed": [
            {
                "buckets": k,
                "capacity": c,
                "ms": 1e3 * float(np.median(times[c])),
                "speedup": float(np.median(times[None]) / np.median(times[c])),
            }
            for k, c in zip(buckets, caps[1:], strict=True)
        ],
    }
    line = "  ".join(
        f"{p['buckets']} buckets ({p['capacity']}) {p['speedup']:.2f}x" for p in row["packed"]
    )
    print(f"{rung:10s} {valid}/{positions} real  full {row['full_ms']:7.1f} ms  {line}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rungs", nargs="+", default=["v2-cpu-s", "v2-1.7m", "v2-8.9m", "v1-cpu-s", "v1-1.1m"]
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--buckets", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--steps", type=int, default=6)
    out_json = ROOT / "benchmarks" / "results" / "packed_targets.json"
    ap.add_argument("--json", default=str(out_json))
    a = ap.parse_args()
    rows = [bench(r, a.batch, a.buckets, a.steps) for r in a.rungs]
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "jax": jax.__version__,
        "setup": vars(a),
        "rows": rows,
    }
    pathlib.Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
