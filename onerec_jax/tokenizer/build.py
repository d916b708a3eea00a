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
import shutil
import time
from typing import Any

import ml_collections

from onerec_jax.atomic import write_atomic
from onerec_jax.data.sources import open_source
from onerec_jax.monitor import MetricWriter
from onerec_jax.tokenizer import embed, rq_kmeans, rq_vae, semantic_ids


def get_config() -> ml_collections.ConfigDict:
    """Defaults of `onerec tokenize`; a config file returns a dict of the same shape."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # world seed and every random draw of the tokenizer
    # The sub-configs are the dataclasses' fields (documented there), minus their seeds: every
    # random draw follows the one `seed` above.
    c.embed = ml_collections.ConfigDict(_fields(embed.EmbedConfig()))
    c.rq = ml_collections.ConfigDict(_fields(rq_kmeans.RQKMeansConfig()))
    c.rq.n_codes = 0  # 0: auto_codes(n_items); else codes per level
    c.compare_rq_vae = False  # also train an RQ-VAE on the same embeddings and report it
    c.rq_vae = ml_collections.ConfigDict(_fields(rq_vae.RQVAEConfig()))
    c.rq_vae.n_codes = 0  # 0: the same as rq
    del c.rq_vae["n_levels"]  # always rq's
    return c


def _fields(dc: Any) -> dict[str, Any]:
    d = dataclasses.asdict(dc)
    d.pop("seed")
    return d


def auto_codes(n_items: int) -> int:
    """Codes per level for a catalogue: the power of two nearest sqrt(n_items), in [2, 8192].

    sqrt(n) codes put ~sqrt(n) items in each first-level code and make the Q-level tuple space
    (n^{Q/2}) far larger than the catalogue, so collisions are rare; 8192 is the paper's size.
    """
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
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and (out / "tb").is_dir():
        shutil.rmtree(out / "tb")  # else the old run's curves mix with the new one's
    with MetricWriter(out / "tb") as writer:
        report = _tokenize(source_name, cfg, writer, progress)
    report["total_s"] = round(time.perf_counter() - t_start, 2)
    resolved = cfg.to_dict()
    resolved["rq"]["n_codes"] = report["n_codes"]
    resolved["rq_vae"]["n_codes"] = report.get("rq_vae", {}).get("n_codes", 0)
    # The table last but one, the report last: a reader that finds report.json finds its table.
    report_path = out / "report.json"
    report_path.unlink(missing_ok=True)
    report["table"].save(out)
    del report["table"]
    write_atomic(out / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    write_atomic(report_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _tokenize(source_name: str, cfg: Any, writer: MetricWriter, progress: bool) -> dict[str, Any]:
    source = open_source(source_name, seed=cfg.seed, split="train")
    n_items = source.n_items
    ecfg = embed.EmbedConfig(**{**cfg.embed.to_dict(), "seed": cfg.seed})
    emb, emb_report = embed.item_embeddings(source, ecfg, writer=writer, progress=progress)
    x = emb[1:]

    rq = cfg.rq.to_dict()
    rq["n_codes"] = rq["n_codes"] or auto_codes(n_items)
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
        vae["hidden"] = tuple(vae["hidden"])
        t0 = time.perf_counter()
        vcfg = rq_vae.RQVAEConfig(**{**vae, "n_levels": rcfg.n_levels, "seed": cfg.seed})
        _, vcodes, vmetrics = rq_vae.fit(x, vcfg, writer=writer, progress=progress)
        vmetrics["n_codes"] = vcfg.n_codes
        vmetrics["collision_rate_before_dedup"] = semantic_ids.collision_rate(vcodes)
        vmetrics["seconds"] = round(time.perf_counter() - t0, 2)
        report["rq_vae"] = vmetrics
    report["table"] = table
    return report
