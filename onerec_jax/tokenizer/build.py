"""`onerec tokenize`: item embeddings -> balanced RQ-KMeans -> de-duplicated semantic-id table.

Writes into the output directory:
  semantic_ids.npz   the table (format version in the file; `SemanticIds.load`)
  report.json        what was measured (the JSON the CLI prints)
  config.json        the resolved config
  tb/                TensorBoard scalars (alignment loss, per-level metrics)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any

import ml_collections

from onerec_jax.data.sources import open_source
from onerec_jax.tokenizer import embed, rq_kmeans, rq_vae, semantic_ids
from onerec_jax.train.logging import MetricWriter


def get_config() -> ml_collections.ConfigDict:
    """Defaults of `onerec tokenize`; a config file returns a dict of the same shape."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # world seed and every random draw of the tokenizer
    c.embed = ml_collections.ConfigDict(dataclasses.asdict(embed.EmbedConfig()))
    rq = dataclasses.asdict(rq_kmeans.RQKMeansConfig())
    rq["n_codes"] = 0  # 0: auto_codes(n_items); else codes per level
    c.rq = ml_collections.ConfigDict(rq)
    c.compare_rq_vae = False  # also train an RQ-VAE on the same embeddings and report it
    vae = dataclasses.asdict(rq_vae.RQVAEConfig())
    vae["n_codes"] = 0  # 0: same as rq
    c.rq_vae = ml_collections.ConfigDict(vae)
    return c


def auto_codes(n_items: int, n_levels: int = 3) -> int:
    """Codes per level for a catalogue: the power of two nearest sqrt(n_items), in [2, 8192].

    sqrt(n) codes put ~sqrt(n) items in each first-level code and make the Q-level tuple space
    (n^{Q/2}) far larger than the catalogue, so collisions are rare; 8192 is the paper's size.
    """
    del n_levels
    return int(min(8192, max(2, 2 ** round(math.log2(max(n_items, 4)) / 2))))


def tokenize(
    source_name: str,
    out_dir: str | os.PathLike,
    cfg: ml_collections.ConfigDict,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build and save the semantic-id table of `source_name`; returns the report."""
    out = pathlib.Path(out_dir)
    if (out / semantic_ids.FILE_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"{out / semantic_ids.FILE_NAME} exists; pass --overwrite to replace it"
        )
    t_start = time.perf_counter()
    source = open_source(source_name, seed=cfg.seed, split="train")
    n_items = source.n_items
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricWriter(out / "tb")
    ecfg = embed.EmbedConfig(**{**cfg.embed.to_dict(), "seed": cfg.seed})
    emb, emb_report = embed.item_embeddings(source, ecfg, writer=writer, progress=progress)
    x = emb[1:]

    rq = cfg.rq.to_dict()
    rq["n_codes"] = rq["n_codes"] or auto_codes(n_items, rq["n_levels"])
    if rq["n_codes"] > n_items:
        raise ValueError(f"rq.n_codes={rq['n_codes']} > {n_items} items: lower it")
    rcfg = rq_kmeans.RQKMeansConfig(**{**rq, "seed": cfg.seed})
    t0 = time.perf_counter()
    quantiser, codes = rq_kmeans.fit(x, rcfg, progress=progress)
    rq_s = time.perf_counter() - t0
    metrics = rq_kmeans.level_metrics(x, codes, quantiser.codebooks)
    before = semantic_ids.collision_rate(codes)
    table = semantic_ids.SemanticIds.from_codes(
        codes,
        (rcfg.n_codes,) * rcfg.n_levels,
        meta={"source": source_name, "seed": cfg.seed, "n_codes": rcfg.n_codes},
    )
    after = semantic_ids.collision_rate(table.codes[1:])
    report: dict[str, Any] = {
        "source": source_name,
        "n_items": n_items,
        "embedding_dim": int(x.shape[1]),
        "n_levels": rcfg.n_levels,
        "n_codes": rcfg.n_codes,
        "vocab": list(table.vocab),
        "dedup_level": table.dedup,
        "max_items_per_tuple": int(table.vocab[-1]) if table.dedup else 1,
        "utilisation": metrics["utilisation"],
        "perplexity": metrics["perplexity"],
        "max_load": metrics["max_load"],
        "recon_error_per_level": metrics["recon_error"],
        "recon_error": metrics["recon_error"][-1],
        "collision_rate_before_dedup": before,
        "collision_rate_after_dedup": after,
        "rq_kmeans_s": round(rq_s, 2),
        "embedding": emb_report,
    }
    for level in range(rcfg.n_levels):
        writer.scalars(
            level,
            {
                "tokenizer/utilisation": metrics["utilisation"][level],
                "tokenizer/perplexity": metrics["perplexity"][level],
                "tokenizer/recon_error": metrics["recon_error"][level],
            },
        )
    if cfg.compare_rq_vae:
        vae = cfg.rq_vae.to_dict()
        vae["n_codes"] = vae["n_codes"] or rcfg.n_codes
        vae["n_levels"] = rcfg.n_levels
        vae["hidden"] = tuple(vae["hidden"])
        t0 = time.perf_counter()
        _, vcodes, vmetrics = rq_vae.fit(
            x, rq_vae.RQVAEConfig(**{**vae, "seed": cfg.seed}), writer=writer, progress=progress
        )
        vmetrics["collision_rate_before_dedup"] = semantic_ids.collision_rate(vcodes)
        vmetrics["seconds"] = round(time.perf_counter() - t0, 2)
        report["rq_vae"] = vmetrics
    report["total_s"] = round(time.perf_counter() - t_start, 2)
    table.save(out)
    (out / "config.json").write_text(cfg.to_json(indent=2, sort_keys=True) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    writer.close()
    return report
