"""The rungs: named model sizes, each a set of dotted fields of a training config.

A rung sets `model.*`, `data.*` and `tokenizer_codes` fields of a config
(onerec_jax/configs/default.py documents every field). `cfg.rung = NAME` applies it when the
config is resolved (onerec_jax/config.py: rung, then command-line overrides, then validation),
and the resolved fields are what the run's config.json records.

V1 rungs (OneRec technical report). The report names a rung by its parameter count and gives
(layers, d_model, FFN, heads): (4, 128, 256, 4) for 0.015B, (8, 1024, 2048, 8) for 0.121B and,
with 24 experts, 0.935B (top-2) and 2.633B (24 layers, top-4). We read "layers" as the total,
split evenly between encoder and decoder, dense FFNs as the plain two-matrix GELU MLP, and MoE
experts as SwiGLU of width 2/3 * 4 * d rounded to 128 (2,688 at d = 1,024), routed in the
decoder. That reading lands the two MoE rungs within 2 % of their names (`onerec plan --list`,
`python -m scaling.ladder` prints them). Two deviations, stated rather than hidden:
  - 0.121B counts ~0.17B here: the pathway projections (20 + 256 + 2,000 events of
    d + 512 + 5 * 128 features), the QFormer and an untied 24,577-way output head add ~50M
    the report's count evidently does not include or does not have;
  - experts in both stacks of the 2.633B rung, with 24 experts of width 2,688, would make
    ~5.0B, so the rung routes experts in the decoder only (2.67B), which matches the name.
Paper rungs use the report's context (20 short-term, 256 positive, 2,000 lifelong events,
128 QFormer queries) and 3 x 8,192 codes; CPU rungs shrink all of it.

V2 rungs (OneRec-V2 paper's (d_model, layers, heads) per size): SwiGLU FFN of width 4 * d,
which puts every dense rung's non-embedding count within 10 % of its name (0.1B is +8 %, 1B
+9 %); the context processor's pathways run at width 256. The MoE rung is the 0.5B shape with
53 routed + 1 shared experts of width 1,408, top-3, the first 2 blocks dense: 4.09B total,
0.52B active.
"""

from __future__ import annotations

from typing import Any

# Paper context, shared by the paper-size rungs of both families.
_PAPER_DATA = {"data.short_len": 20, "data.pos_len": 256, "data.life_len": 2000}
# Paper pathway widths: 128 QFormer queries, author embeddings of 512, other features of 128.
_PAPER_PATHWAYS = {"n_queries": 128, "qformer_blocks": 1, "author_dim": 512, "feature_dim": 128}


def _expert_width(d: int) -> int:
    """2/3 * 4 * d rounded to the nearest multiple of 128: a SwiGLU expert with the parameters
    of a 4 * d GELU MLP."""
    return round(8 * d / 3 / 128) * 128


def _section(prefix: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in fields.items()}


def _v1(layers: int, d: int, ffn: int, heads: int, experts: int = 0, top_k: int = 2) -> dict:
    """A paper-size V1 rung: both stacks at width d with GELU MLPs of width ffn."""
    return {
        **_PAPER_DATA,
        "tokenizer_codes": 8192,
        "model.family": "v1",
        **_section("model.v1", {"dec_layers": layers // 2, "n_heads": heads, "d_ff": ffn}),
        "model.v1.ffn": "mlp",
        **_section(
            "model.v1.encoder",
            {"d_model": d, "n_layers": layers // 2, "n_heads": heads, "d_ff": ffn, "ffn": "mlp"},
        ),
        **_section("model.v1.encoder", _PAPER_PATHWAYS),
        **_section(
            "model.v1.moe",
            {"n_experts": experts, "top_k": top_k, "d_ff": _expert_width(d) if experts else 0},
        ),
    }


def _cpu_v1(pos: int, life: int, d: int, ffn: int, enc: int, queries: int) -> dict:
    """A CPU V1 rung: short context, small widths, 4 heads, 2 decoder blocks."""
    return {
        "data.pos_len": pos,
        "data.life_len": life,
        "model.family": "v1",
        **_section("model.v1", {"dec_layers": 2, "n_heads": 4, "d_ff": ffn}),
        **_section(
            "model.v1.encoder",
            {"d_model": d, "n_layers": enc, "n_heads": 4, "d_ff": ffn, "n_queries": queries},
        ),
    }


V1_RUNGS: dict[str, dict[str, Any]] = {
    "v1-0.015b": _v1(4, 128, 256, 4),
    "v1-0.121b": _v1(8, 1024, 2048, 8),
    "v1-0.935b": _v1(8, 1024, 2048, 8, experts=24, top_k=2),
    "v1-2.633b": _v1(24, 1024, 2048, 8, experts=24, top_k=4),
    # CPU rungs: short context, small widths; minutes per thousand steps on 2 cores.
    "v1-cpu-s": _cpu_v1(pos=32, life=64, d=64, ffn=128, enc=1, queries=16),
    "v1-cpu-m": _cpu_v1(pos=64, life=256, d=128, ffn=512, enc=2, queries=32),
}


def _v2(d: int, layers: int, heads: int) -> dict:
    """A paper-size V2 rung: SwiGLU FFNs of width 4 * d, context pathways at width 256."""
    return {
        **_PAPER_DATA,
        "tokenizer_codes": 8192,
        "model.family": "v2",
        **_section(
            "model.v2",
            {"d_model": d, "n_layers": layers, "n_heads": heads, "d_ff": 4 * d, "ffn": "swiglu"},
        ),
        "model.v2.loss": "mean",
        **_section("model.v2.context", {"d_model": 256, "n_heads": 4, "d_ff": 512}),
        "model.v2.context.ffn": "swiglu",
        **_section("model.v2.context", _PAPER_PATHWAYS),
        "model.v2.moe.n_experts": 0,
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
        **_section("model.v2.moe", {"n_experts": 53, "top_k": 3, "d_ff": 1408, "n_shared": 1}),
        "model.v2.first_dense": 2,
    },
    # The decoder of v1-cpu-s (2 blocks of width 64) with no encoder stack, reading the same
    # pathways at width 64: the pair experiments/v1_vs_v2.py compares.
    "v2-cpu-s": {
        "data.pos_len": 32,
        "data.life_len": 64,
        "model.family": "v2",
        **_section("model.v2", {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128}),
        "model.v2.loss": "mean",
        **_section("model.v2.context", {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_queries": 16}),
    },
}

# Micro rungs for CPU sweeps, built by the paper rungs' shape rules at small widths: V1 with both
# stacks at width d, GELU MLPs of width 2d (the report's 128/256 and 1024/2048) and the layers
# split evenly; V2 with SwiGLU FFNs of width 4d. Heads of width 32; the CPU rungs' short context
# (32 positive, 64 lifelong events, 16 queries) with V2's pathways at the model width. Named
# by their non-embedding parameters (`onerec plan --rung NAME`).
_MICRO_DATA = {"data.pos_len": 32, "data.life_len": 64}


def _v1_micro(layers: int, d: int) -> dict:
    return {
        **_MICRO_DATA,
        "model.family": "v1",
        **_section("model.v1", {"dec_layers": layers // 2, "n_heads": d // 32, "d_ff": 2 * d}),
        "model.v1.ffn": "mlp",
        **_section(
            "model.v1.encoder",
            {"d_model": d, "n_layers": layers // 2, "n_heads": d // 32, "d_ff": 2 * d},
        ),
        "model.v1.encoder.ffn": "mlp",
        "model.v1.encoder.n_queries": 16,
    }


def _v2_micro(layers: int, d: int) -> dict:
    return {
        **_MICRO_DATA,
        "model.family": "v2",
        **_section(
            "model.v2",
            {"d_model": d, "n_layers": layers, "n_heads": d // 32, "d_ff": 4 * d, "ffn": "swiglu"},
        ),
        "model.v2.loss": "mean",
        **_section("model.v2.context", {"d_model": d, "n_heads": d // 32, "d_ff": 2 * d}),
        "model.v2.context.n_queries": 16,
        "model.v2.moe.n_experts": 0,
    }


# (layers, d) per rung; the name is the non-embedding count `onerec plan` reports.
MICRO_RUNGS: dict[str, dict[str, Any]] = {
    **{
        f"v1-{size}": _v1_micro(layers, d)
        for size, layers, d in (
            ("0.07m", 2, 32), ("0.2m", 2, 64), ("0.45m", 2, 96), ("0.6m", 4, 96), ("1.1m", 4, 128),
            ("2.4m", 4, 192), ("5.5m", 6, 256), ("12m", 6, 384),
        )
    },
    **{
        f"v2-{size}": _v2_micro(layers, d)
        for size, layers, d in (
            ("0.09m", 2, 32), ("0.3m", 2, 64), ("0.6m", 2, 96), ("0.8m", 3, 96), ("1.7m", 4, 128),
            ("3.7m", 4, 192), ("8.9m", 6, 256), ("17m", 8, 320),
        )
    },
}  # fmt: skip

RUNGS = {**V1_RUNGS, **V2_RUNGS, **MICRO_RUNGS}


def rung_fields(name: str) -> dict[str, Any]:
    """The dotted config fields a rung sets; an unknown name is one error listing the rungs."""
    if name not in RUNGS:
        raise ValueError(f"unknown rung {name!r}; known rungs: {', '.join(sorted(RUNGS))}")
    return dict(RUNGS[name])
