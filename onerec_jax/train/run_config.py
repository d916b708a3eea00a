"""A run's config on disk: the seed of its data source, upgrading configs written by older
versions, refusing runs whose data are no longer what they claim, and the workdir guard."""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any

import ml_collections

from onerec_jax import config
from onerec_jax.atomic import write_atomic
from onerec_jax.configs import default


def source_seed(cfg: ml_collections.ConfigDict) -> int:
    """The seed of the run's data source (the world itself): `world_seed`, or `seed` when it is
    -1. Fixing `world_seed` lets runs of different seeds share one world and one tokenizer
    table while their init and example order differ."""
    ws = cfg.get("world_seed", -1)
    return int(cfg.seed if ws < 0 else ws)


# Config fields added after runs already existed, with the values that reproduce what those
# runs did (named as they were in the flat layout of the time). A run's config.json that lacks
# one is read as if it held this value, so older workdirs still evaluate and resume.
ADDED_FIELDS: dict[str, Any] = {
    "rung": "",
    "world_seed": -1,
    "eval_every": 0,
    "model.family": "v1",
    "model.ffn": "swiglu",
    "model.qformer_blocks": 1,
    "model.moe_d_ff": 0,
    "model.moe_shared": 0,
    "model.moe_dispatch": "dropless",
    "model.first_dense": 0,
    "model.context_dim": 0,
    "model.context_heads": 0,
    "model.context_ff": 0,
    "model.l_kv": 1,
    "model.s_kv": 1,
    "model.g_kv": 0,
    "remat": "none",
    "unroll_layers": False,
    "pack_targets": 0,
    "optim.moment_dtype": "float32",
    "data.log_session_len": 5,
}

# Fields a run may change when it resumes: they change where the state lies, how much memory a
# step takes or how it is compiled, not what it computes (a checkpoint restores onto any mesh;
# rematerialisation recomputes the same activations; an unrolled stack runs the same layers;
# packing skips only padding).
# `optim.moment_dtype` is not one of them: bf16 moments round differently, so the resumed run
# would not be the run it continues.
RESUMABLE_CHANGES = ("steps", "remat", "unroll_layers", "pack_targets")
RESUMABLE_SECTIONS = ("mesh.",)

# Where each field of the old flat `model` section lives in the per-family sections: one old
# field (e.g. `n_heads`, shared by V1's encoder and decoder) may feed several new ones.
_FLAT_MODEL = {
    "v1": {
        "d_model": ("encoder.d_model",),
        "n_heads": ("n_heads", "encoder.n_heads"),
        "d_ff": ("d_ff", "encoder.d_ff"),
        "ffn": ("ffn", "encoder.ffn"),
        "enc_layers": ("encoder.n_layers",),
        "dec_layers": ("dec_layers",),
        "session_wise": ("session_wise",),
        "loss": ("loss",),
    },
    "v2": {
        "d_model": ("d_model",),
        "n_heads": ("n_heads",),
        "d_ff": ("d_ff",),
        "ffn": ("ffn", "context.ffn"),
        "dec_layers": ("n_layers",),
        "first_dense": ("first_dense",),
        "loss": ("loss",),
        "l_kv": ("l_kv",),
        "s_kv": ("s_kv",),
        "g_kv": ("g_kv",),
    },
}
# Pathway fields: the same names in V1's `encoder` and V2's `context` section.
_FLAT_PATHWAYS = ("n_queries", "qformer_blocks", "author_dim", "feature_dim")
_FLAT_MOE = {
    "moe_experts": "n_experts",
    "moe_top_k": "top_k",
    "moe_d_ff": "d_ff",
    "moe_shared": "n_shared",
    "moe_dispatch": "dispatch",
}


def _sectioned_model(flat: dict[str, Any]) -> dict[str, Any]:
    """The old flat `model.*` fields of a run config as fields of its family's section."""
    old = {k[len("model.") :]: flat.pop(k) for k in list(flat) if k.startswith("model.")}
    family = old["family"]
    ctx = "encoder" if family == "v1" else "context"
    out = {"model.family": family}
    table = {**_FLAT_MODEL[family], **{k: (f"{ctx}.{k}",) for k in _FLAT_PATHWAYS}}
    for name, targets in table.items():
        for t in targets:
            out[f"model.{family}.{t}"] = old[name]
    for name, field in _FLAT_MOE.items():
        out[f"model.{family}.moe.{field}"] = old[name]
    if family == "v2":
        # 0 meant "the decoder's": the context section states its values.
        out["model.v2.context.d_model"] = old["context_dim"] or old["d_model"]
        out["model.v2.context.n_heads"] = old["context_heads"] or old["n_heads"]
        out["model.v2.context.d_ff"] = old["context_ff"] or old["d_ff"]
    return {**flat, **out}


def upgrade_config(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A run config as written by any version, in today's fields: the default config with the
    saved values set on it by `config.update` (the mechanism of rungs and overrides), after
    filling `ADDED_FIELDS` and moving renamed fields to their new names."""
    flat = config.flatten(saved)
    # eval_batches (batches of batch_size validation requests) became eval_requests.
    if "eval_requests" not in flat:
        flat["eval_requests"] = flat.pop("eval_batches", 0) * flat.get("batch_size", 0)
    # World runs from before the per-user time cut (they have no world_seed, added with it)
    # drew every split from the same requests; `check_split` refuses them.
    if "world_split" not in flat:
        old_world = str(flat.get("source", "")).startswith("world:") and "world_seed" not in flat
        flat["world_split"] = "hash" if old_world else "time_cut"
    if "model.d_model" in flat:  # the flat `model` section of configs before the families
        for dotted, value in ADDED_FIELDS.items():
            flat.setdefault(dotted, value)
        flat = _sectioned_model(flat)
    else:
        flat = {k: v for k, v in ADDED_FIELDS.items() if "." not in k} | flat
    cfg = default.get_config()
    cfg.lock()
    config.update(cfg, {"model.family": flat.get("model.family", "v1")}, "run config")
    config.keep_family(cfg)
    config.update(cfg, flat, "run config")
    return cfg


def check_split(cfg: Any, workdir: str | os.PathLike) -> None:
    """Refuse a run trained on the world's old splits: its validation and test requests overlap
    its training requests, so nothing measured on them is held out."""
    if cfg.get("world_split", "time_cut") != "time_cut":
        raise ValueError(
            f"{workdir}: this run was trained on the world's old hash-stream splits, whose "
            "validation/test requests overlap the training requests, so its held-out numbers "
            "are not held out; train it again in a new --workdir"
        )


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run was started with (WORKDIR/config.json), upgraded to current fields."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir}: no run here (config.json missing)")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise TypeError(f"a JSON {type(saved).__name__}, not an object")
        return upgrade_config(saved)
    except (ValueError, config.ConfigError, KeyError, TypeError, AttributeError) as e:
        # (UnicodeDecodeError and JSONDecodeError are ValueErrors: garbage bytes, a torn file)
        raise ValueError(f"{path}: not a run config this version can read ({e})") from None


def check_workdir_config(
    cfg: ml_collections.ConfigDict, workdir: pathlib.Path, write: bool = True
) -> None:
    """Refuse to resume a run under a different config (only `RESUMABLE_CHANGES` and the
    fields of `RESUMABLE_SECTIONS` may change), then, with `write` (the main process of a
    multi-host run), write the config to WORKDIR/config.json (atomically: a crash leaves the
    old file or the new). A workdir whose run saved no checkpoint (a start that failed, e.g.
    on a model the config cannot build) takes the new config: it holds nothing to resume."""
    path = workdir / "config.json"
    text = cfg.to_json(indent=2, sort_keys=True) + "\n"
    if path.exists():
        saved = load_run_config(workdir)
        check_split(saved, workdir)
        old, new = config.flatten(saved.to_dict()), config.flatten(cfg.to_dict())
        for side in (old, new):  # a relative table path means what it resolves to here
            if side.get("tokenizer_dir"):
                side["tokenizer_dir"] = str(pathlib.Path(side["tokenizer_dir"]).resolve())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        changed = [
            k
            for k in changed
            if k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_SECTIONS)
        ]
        if changed and (has_checkpoint(workdir) or (workdir / "summary.json").exists()):
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {changed}); "
                "use a new --workdir or the same config"
            )
        if changed and write:  # a start that saved nothing (it failed): nothing to keep
            warnings.warn(
                f"{workdir}: its earlier start saved no checkpoint; its config gives way to "
                f"this one (fields {changed})",
                stacklevel=2,
            )
            _set_aside_stale_table(workdir, set(changed) & TABLE_FIELDS)
    if not write:
        return
    write_atomic(path, text)


# The fields WORKDIR/tokenizer is built from (train/state.load_table).
TABLE_FIELDS = {"source", "seed", "world_seed", "tokenizer_codes", "tokenizer_dir"}


def has_checkpoint(workdir: pathlib.Path) -> bool:
    """Whether a run saved a checkpoint (a finished step directory) in WORKDIR/checkpoints."""
    return any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))


def _set_aside_stale_table(workdir: pathlib.Path, changed: set[str]) -> None:
    """A start that failed before its first checkpoint may be redone with another config; a
    WORKDIR/tokenizer it built from other table fields, and the fingerprint it recorded
    (table.json), are renamed (kept, not deleted), so the corrected command builds its own."""
    if not changed:
        return
    for name in ("tokenizer", "table.json"):
        old = workdir / name
        if not old.exists():
            continue
        dest, k = workdir / f"{name}.replaced", 1
        while dest.exists():
            dest, k = workdir / f"{name}.replaced{k}", k + 1
        os.rename(old, dest)
        warnings.warn(
            f"{old}: made for this workdir's earlier, failed start under other "
            f"{sorted(changed)}; moved to {dest.name}",
            stacklevel=3,
        )
