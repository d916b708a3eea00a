"""The rungs: named model sizes as overrides of a training config.

A rung sets `model.*` and `data.*` fields of a training config (experiments/v1_world_tiny.py
documents every field); `cfg.rung = NAME` applies it when the run starts, and the resolved
fields are what the run's config.json records.

V1 rungs (OneRec technical report; widths from ../shared/DESIGN.md). The report names a rung
by its parameter count and gives (layers, d_model, FFN, heads); we read "layers" as the total,
split evenly between encoder and decoder, dense FFNs as the plain two-matrix GELU MLP, and MoE
experts as SwiGLU of width 2/3 * 4 * d rounded to 128 (2,688 at d = 1,024), routed in the
decoder. That reading lands the two MoE rungs within 2 % of their names (table in the README,
`python -m scaling.ladder` prints them). Two deviations, stated rather than hidden:
  - 0.121B counts ~0.17B here: the pathway projections (20 + 256 + 2,000 events of
    d + 512 + 5 * 128 features), the QFormer and an untied 24,577-way output head add ~50M
    the report's count evidently does not include or does not have;
  - DESIGN.md says 2.633B has MoE "in both" stacks; with 24 experts of width 2,688 that would
    be ~5.0B, so the rung routes experts in the decoder only (2.67B), which matches the name.
Paper rungs use the report's context (20 short-term, 256 positive, 2,000 lifelong events,
128 QFormer queries) and 3 x 8,192 codes; CPU rungs shrink all of it.

V2 rungs (OneRec-V2; (d_model, layers, heads) from DESIGN.md): SwiGLU FFN of width 4 * d, which
puts every dense rung's non-embedding count within 10 % of its name (0.1B is +8 %, 1B +9 %); the
context processor's pathways run at width 256. The MoE rung is the 0.5B shape with 53 routed +
1 shared experts of width 1,408, top-3, the first 2 blocks dense: 4.09B total, 0.52B active.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Paper context and embedding widths, shared by the paper-size V1 rungs.
_PAPER = {
    "data.short_len": 20,
    "data.pos_len": 256,
    "data.life_len": 2000,
    "model.n_queries": 128,
    "model.qformer_blocks": 1,
    "model.author_dim": 512,
    "model.feature_dim": 128,
    "model.ffn": "mlp",
    "tokenizer_codes": 8192,
}


def _expert_width(d: int) -> int:
    """2/3 * 4 * d rounded to the nearest multiple of 128 (DESIGN.md)."""
    return round(8 * d / 3 / 128) * 128


def _v1(layers: int, d: int, ffn: int, heads: int, experts: int = 0, top_k: int = 2) -> dict:
    return {
        **_PAPER,
        "model.d_model": d,
        "model.enc_layers": layers // 2,
        "model.dec_layers": layers // 2,
        "model.d_ff": ffn,
        "model.n_heads": heads,
        "model.moe_experts": experts,
        "model.moe_top_k": top_k,
        "model.moe_d_ff": _expert_width(d) if experts else 0,
    }


V1_RUNGS: dict[str, dict[str, Any]] = {
    "v1-0.015b": _v1(4, 128, 256, 4),
    "v1-0.121b": _v1(8, 1024, 2048, 8),
    "v1-0.935b": _v1(8, 1024, 2048, 8, experts=24, top_k=2),
    "v1-2.633b": _v1(24, 1024, 2048, 8, experts=24, top_k=4),
    # CPU rungs: short context, small widths; minutes per thousand steps on 2 cores.
    "v1-cpu-s": {
        "data.pos_len": 32,
        "data.life_len": 64,
        "model.d_model": 64,
        "model.n_heads": 4,
        "model.d_ff": 128,
        "model.enc_layers": 1,
        "model.dec_layers": 2,
        "model.n_queries": 16,
    },
    "v1-cpu-m": {
        "data.pos_len": 64,
        "data.life_len": 256,
        "model.d_model": 128,
        "model.n_heads": 4,
        "model.d_ff": 512,
        "model.enc_layers": 2,
        "model.dec_layers": 2,
        "model.n_queries": 32,
    },
}


def _v2(d: int, layers: int, heads: int) -> dict:
    return {
        **_PAPER,
        "model.family": "v2",
        "model.loss": "mean",
        "model.ffn": "swiglu",
        "model.context_dim": 256,
        "model.context_heads": 4,
        "model.context_ff": 512,
        "model.d_model": d,
        "model.dec_layers": layers,
        "model.n_heads": heads,
        "model.d_ff": 4 * d,
        "model.moe_experts": 0,
    }


V2_RUNGS: dict[str, dict[str, Any]] = {
    "v2-0.1b": _v2(640, 12, 10),
    "v2-0.2b": _v2(896, 12, 14),
    "v2-0.5b": _v2(1408, 14, 11),
    "v2-1b": _v2(1792, 18, 14),
    "v2-2b": _v2(2304, 22, 18),
    "v2-4b": _v2(2944, 26, 23),
    "v2-8b": _v2(3584, 34, 28),
    # 53 routed + 1 shared SwiGLU experts of width 1,408, top-3, first 2 blocks dense.
    "v2-4b-a0.5b": {
        **_v2(1408, 14, 11),
        "model.moe_experts": 53,
        "model.moe_top_k": 3,
        "model.moe_d_ff": 1408,
        "model.moe_shared": 1,
        "model.first_dense": 2,
    },
}

# V2 CPU rung: the decoder of v1-cpu-s (2 blocks of width 64) with no encoder stack, reading
# the same pathways (context width 64) — the pair experiments/v1_vs_v2.py compares.
V2_RUNGS["v2-cpu-s"] = {
    **{k: v for k, v in V1_RUNGS["v1-cpu-s"].items() if k != "model.enc_layers"},
    "model.family": "v2",
    "model.loss": "mean",
    "model.context_dim": 64,
    "model.context_heads": 4,
    "model.context_ff": 128,
}

RUNGS = {**V1_RUNGS, **V2_RUNGS}


def apply_rung(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set the rung's fields on `cfg` (in place) and return it; unknown rung -> one error."""
    if name not in RUNGS:
        raise ValueError(f"unknown rung {name!r}; known rungs: {', '.join(sorted(RUNGS))}")
    for dotted, value in RUNGS[name].items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"rung {name} sets {dotted}, which the config does not have")
        node[leaf] = value
    return cfg
