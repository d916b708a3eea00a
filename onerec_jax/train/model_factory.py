"""Config -> model: the family's section of `cfg.model` maps field for field onto the model's
dataclasses; what a config cannot know (the catalogue's sizes, the semantic-id vocabulary, the
context lengths of `cfg.data`) is filled in here."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from onerec_jax.data import schema
from onerec_jax.model.layers import check_remat
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.user_encoder import EncoderConfig
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Config


def build_model(
    cfg: ml_collections.ConfigDict, catalogue: Any, vocab: tuple[int, ...]
) -> OneRecV1 | OneRecV2:
    """The model of a resolved config (onerec_jax/config.py) for a catalogue (anything with
    n_items, n_authors, n_tags: a data source) and a semantic-id vocabulary (codes per level)."""
    family = cfg.model.family
    if family not in ("v1", "v2"):
        raise ValueError(f"model.family must be 'v1' or 'v2', got {family!r}")
    check_remat(cfg.remat)  # before anything is built: one error naming the field
    section = cfg.model[family].to_dict()
    pathways = section.pop("encoder" if family == "v1" else "context")
    encoder = EncoderConfig(
        **pathways,
        # V2's context processor has no encoder stack (its blocks read the pathways directly).
        **({"n_layers": 0} if family == "v2" else {}),
        n_items=catalogue.n_items,
        n_authors=catalogue.n_authors,
        n_tags=catalogue.n_tags,
        short_len=cfg.data.short_len,
        pos_len=cfg.data.pos_len,
        life_len=cfg.data.life_len,
        n_scenarios=len(schema.SCENARIOS) if cfg.data.scenarios else 0,
        click_len=cfg.data.click_len,
        cart_len=cfg.data.cart_len,
        order_len=cfg.data.order_len,
        remat=cfg.remat,
        unroll=cfg.unroll_layers,
    )
    moe = section.pop("moe")
    moe = MoEConfig(**{**moe, "d_ff": moe["d_ff"] or section["d_ff"]}) if moe["n_experts"] else None
    # `remat` is a top-level field (like `bf16`, it changes memory, not the model), one
    # policy for every scanned stack of the model.
    common = {
        "moe": moe,
        "vocab": tuple(vocab),
        "max_targets": cfg.data.max_targets,
        "remat": cfg.remat,
        "unroll": cfg.unroll_layers,
    }
    dtype = jnp.bfloat16 if cfg.bf16 else jnp.float32
    if family == "v1":
        return OneRecV1(V1Config(encoder=encoder, **section, **common), dtype=dtype)
    return OneRecV2(V2Config(context=encoder, **section, **common), dtype=dtype)
