"""The onerec_jax side of `benchmarks/peers.py`: a worker (the project's venv) that times, on
request, a V1 or V2 train step at the TIGER-like shape and trie-constrained beam search
(`family` in the setup message), over the driver's line protocol (peer_protocol.py).

Requests are real world:small requests (the world's catalogue, so the id tables have their
real sizes) with random target codes; the model is built from the project's default config
with the overrides of `model_overrides`, exactly as `onerec train` builds it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from peer_protocol import serve

from onerec_jax import config, flops
from onerec_jax.configs import default
from onerec_jax.data import schema
from onerec_jax.data.sources import open_source
from onerec_jax.generate import beam_search
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.model_factory import build_model


def model_overrides(shape: dict, family: str) -> list[str]:
    """Config overrides of our model at the peer's shape: width, depth, FFN (GELU MLP, T5's
    two matrices), heads of the same total width, the context's 64 tokens as
    1 static + short + positive + QFormer queries, one target item of `levels` codes."""
    d, ff, heads = shape["d_model"], shape["d_ff"], shape["heads"]
    out = [
        f"source={shape['source']}",
        f"batch_size={shape['batch']}",
        f"bf16={shape.get('bf16', False)}",
        f"unroll_layers={shape.get('unroll_layers', False)}",
        f"data.short_len={shape['short_len']}",
        f"data.pos_len={shape['pos_len']}",
        f"data.life_len={shape['life_len']}",
        "data.max_targets=1",
        f"model.family={family}",
    ]
    if family == "v1":
        enc = "model.v1.encoder"
        out += [
            f"model.v1.dec_layers={shape['dec_layers']}",
            f"model.v1.n_heads={heads}",
            f"model.v1.d_ff={ff}",
            "model.v1.ffn=mlp",
            f"{enc}.n_layers={shape['enc_layers']}",
        ]
    else:
        enc = "model.v2.context"
        out += [
            f"model.v2.n_layers={shape['v2_layers']}",
            f"model.v2.d_model={d}",
            f"model.v2.n_heads={heads}",
            f"model.v2.d_ff={ff}",
            "model.v2.ffn=mlp",
        ]
    return [
        *out,
        f"{enc}.d_model={d}",
        f"{enc}.n_heads={heads}",
        f"{enc}.d_ff={ff}",
        f"{enc}.ffn=mlp",
        f"{enc}.n_queries={shape['n_queries']}",
        f"{enc}.author_dim={shape['author_dim']}",
        f"{enc}.feature_dim={shape['feature_dim']}",
    ]


class Job:
    def __init__(self, msg: dict) -> None:
        cfg = config.resolve(default.get_config(), model_overrides(msg, msg["family"]))
        src = open_source(cfg.source, split="train")
        codes, levels = msg["codes"], msg["levels"]
        self.model = build_model(cfg, src, (codes,) * levels)
        spec = schema_spec(cfg)
        users = msg["batch"] if msg["task"] == "train" else msg["users"]
        b = schema.build_batch(src.raw_batch(np.arange(users), spec.history_window, spec), spec)
        rng = np.random.default_rng(0)
        b["target_codes"] = rng.integers(0, codes, (users, 1, levels)).astype(np.int32)
        b = jax.tree.map(jnp.asarray, b)
        ocfg = step_lib.OptimConfig(total_steps=1000)
        tx, schedule = step_lib.make_optimizer(ocfg)
        self.state = step_lib.init_state(self.model, tx, b, jax.random.key(0))
        counts = flops.counts(self.model)
        self.facts = {
            "params": counts.params_total,
            "params_non_embedding": counts.params_non_embedding,
            "flops_train_per_sample": counts.flops_train,
            "config_overrides": model_overrides(msg, msg["family"]),
        }
        if msg["task"] == "train":
            fn = step_lib.jit_train_step(self.model, tx, schedule, ocfg)

            def run() -> None:
                self.state, m = fn(self.state, b, jax.random.key(0))
                jax.block_until_ready(m)

        else:
            rng = np.random.default_rng(msg["trie_seed"])
            items = np.unique(rng.integers(0, codes, (msg["trie_items"], levels)), axis=0)
            trie = SemanticIds.from_codes(items, (codes,) * levels).trie()
            inputs = {k: v for k, v in b.items() if k not in step_lib.NOT_MODEL_INPUTS}
            variables = {"params": self.state.params, "moe_bias": self.state.moe_bias}
            beam = msg["beam"]

            def run() -> None:
                out = beam_search(self.model, variables, inputs, trie, beam)
                jax.block_until_ready(out["items"])

        t = time.perf_counter()
        run()  # compile (and one step)
        self.compile_s = time.perf_counter() - t
        self.run = run


def setup(msg: dict) -> tuple:
    job = Job(msg)
    facts = {"compile_s": job.compile_s, "versions": {"jax": jax.__version__}, **job.facts}
    return job.run, facts | {"devices": [str(d) for d in jax.devices()]}


if __name__ == "__main__":
    serve(setup)
