"""V2 lazy decoder vs V1 encoder-decoder: train time per sample and beam-search throughput.

Same CPU, one process, side by side. Context 512 tokens for V1's encoder (1 static + 20
short-term + 235 positive-feedback + 256 QFormer queries over 512 lifelong events); V2 reads the
same requests through the same pathways. Matched decoders: both have `--layers` decoder blocks of
width `--d-model` (V1 also has `--layers` encoder blocks, the 1:1 split of the V2 paper's
comparison). V2 is run twice: with its context pathways as wide as V1's (`context_dim = d`) and
with a narrow context processor (`context_dim = d / 4`).

Train: the jitted, donated train step on real world:small requests, median of `--steps` steps
after compile + one warm step, reported per request (5 target items x 3 codes each).
Beam search: `--users` users, beam `--beam`, a random trie of 10,000 items over 3 x 256 codes
(the setup of the peers' beam-search measurements), users/s over `--reps` calls after compile.

    .venv/bin/python benchmarks/v2_vs_v1.py [--d-model 256 --layers 4 --batch 32]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from onerec_jax import config, flops
from onerec_jax.configs import default
from onerec_jax.data import schema
from onerec_jax.data.sources import open_source
from onerec_jax.generate import beam_search
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.model_factory import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOAL = 0.1  # V2's train time per sample at context 512 should be <= 0.1 x V1's


def _cfg(family: str, d: int, layers: int, context_dim: int = 0):
    c = default.get_config()
    c.source = "world:small"
    c.data.pos_len = 235
    c.data.life_len = 512
    c.model.family = family
    # 1 + 20 + 235 + 256 = 512 context tokens
    pathways = {"n_queries": 256, "author_dim": 64, "feature_dim": 32}
    if family == "v1":
        m = c.model.v1
        m.n_heads, m.d_ff, m.dec_layers = 4, 4 * d, layers
        m.encoder.update(d_model=d, n_heads=4, d_ff=4 * d, n_layers=layers, **pathways)
    else:
        m = c.model.v2
        m.d_model, m.n_heads, m.d_ff, m.n_layers, m.loss = d, 4, 4 * d, layers, "mean"
        cd = context_dim or d
        m.context.update(d_model=cd, n_heads=4, d_ff=2 * cd, **pathways)
    return config.resolve(c)


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def bench(name: str, cfg, src, batch: int, steps: int, trie_table, users: int, beam: int, reps):
    vocab = (256, 256, 256)
    model = build_model(cfg, src, vocab)
    spec = schema_spec(cfg)
    raw = src.raw_batch(np.arange(batch), spec.history_window, spec)
    b = schema.build_batch(raw, spec)
    rng = np.random.default_rng(0)
    b["target_codes"] = rng.integers(0, 256, (batch, spec.max_targets, 3)).astype(np.int32)
    b = jax.tree.map(jnp.asarray, b)
    ocfg = step_lib.OptimConfig(total_steps=1000)
    tx, schedule = step_lib.make_optimizer(ocfg)
    state = step_lib.init_state(model, tx, b, jax.random.key(0))
    fn = step_lib.jit_train_step(model, tx, schedule, ocfg)
    holder = {"state": state}

    def one_step():
        holder["state"], m = fn(holder["state"], b, jax.random.key(0))
        return m

    _time(one_step, 2)  # compile + warm
    train_s = float(np.median(_time(one_step, steps)))

    inputs = {
        k: v[:users] for k, v in b.items() if k not in ("user_id", "request_ts", "target_codes")
    }
    variables = {"params": holder["state"].params, "moe_bias": holder["state"].moe_bias}
    trie = trie_table.trie()

    def search():
        return beam_search(model, variables, inputs, trie, beam)["items"]

    _time(search, 1)
    search_s = float(np.median(_time(search, reps)))
    c = flops.counts(model)
    row = {
        "model": name,
        "params_total": c.params_total,
        "params_context": c.params_context,
        "params_decoder": c.params_decoder,
        "flops_train_per_sample": c.flops_train,
        "train_step_s": train_s,
        "train_ms_per_sample": 1e3 * train_s / batch,
        "beam_search_s": search_s,
        "beam_users_per_s": users / search_s,
    }
    print(
        f"{name:24s} train {row['train_ms_per_sample']:7.2f} ms/request "
        f"({c.flops_train / 1e9:6.2f} GFLOP)  beam {row['beam_users_per_s']:7.1f} users/s",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--beam", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "v2_vs_v1.json"))
    a = ap.parse_args()
    src = open_source("world:small", split="train")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (10_000, 3))
    table = SemanticIds.from_codes(codes, (256, 256, 256))
    d, n = a.d_model, a.layers
    if table.n_levels != 3:  # collisions add a level: keep the trie at 3 x 256
        codes = np.unique(codes, axis=0)
        table = SemanticIds.from_codes(codes, (256, 256, 256))
    runs = [
        ("v1 (enc+dec)", _cfg("v1", d, n)),
        ("v2 (context_dim = d)", _cfg("v2", d, n)),
        ("v2 (context_dim = d/4)", _cfg("v2", d, n, context_dim=d // 4)),
    ]
    common = (src, a.batch, a.steps, table, a.users, a.beam, a.reps)
    rows = [bench(name, cfg, *common) for name, cfg in runs]
    v1 = rows[0]
    for r in rows[1:]:
        r["train_time_vs_v1"] = r["train_ms_per_sample"] / v1["train_ms_per_sample"]
        r["flops_vs_v1"] = r["flops_train_per_sample"] / v1["flops_train_per_sample"]
        r["beam_throughput_vs_v1"] = r["beam_users_per_s"] / v1["beam_users_per_s"]
        print(
            f"{r['model']:24s} train time {r['train_time_vs_v1']:.3f}x V1 "
            f"(FLOPs {r['flops_vs_v1']:.3f}x), beam throughput {r['beam_throughput_vs_v1']:.2f}x"
        )
    out = {
        "setup": vars(a) | {"context_tokens": 512, "trie_items": int(table.n_items)},
        "goal_train_time_vs_v1": GOAL,
        "rows": rows,
    }
    pathlib.Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
