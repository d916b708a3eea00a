"""A run's config on disk: the seed of its data source, upgrading configs written by older
versions, refusing runs whose data are no longer what they claim, and the workdir guard."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections


def source_seed(cfg: ml_collections.ConfigDict) -> int:
    """The seed of the run's data source (the world itself): `world_seed`, or `seed` when it is
    -1. Fixing `world_seed` lets runs of different seeds share one world and one tokenizer
    table while their init and example order differ."""
    ws = cfg.get("world_seed", -1)
    return int(cfg.seed if ws < 0 else ws)


# Config fields added after runs already existed, with the values that reproduce what those
# runs did. A run's config.json that lacks one is read as if it held this value, so older
# workdirs still evaluate and resume.
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
}


def upgrade_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with every field of `ADDED_FIELDS` it lacks filled in, and renamed
    fields under their new names."""
    out = json.loads(json.dumps(saved))
    # eval_batches (batches of batch_size validation requests) became eval_requests.
    if "eval_requests" not in out:
        out["eval_requests"] = out.pop("eval_batches", 0) * out.get("batch_size", 0)
    # World runs from before the per-user time cut (they have no world_seed, added with it)
    # drew every split from the same requests; `check_split` refuses them.
    if "world_split" not in out:
        old_world = str(out.get("source", "")).startswith("world:") and "world_seed" not in saved
        out["world_split"] = "hash" if old_world else "time_cut"
    for dotted, value in ADDED_FIELDS.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node.setdefault(leaf, value)
    return out


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
    return ml_collections.ConfigDict(upgrade_config(json.loads(path.read_text())))


def check_workdir_config(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    path = workdir / "config.json"
    text = cfg.to_json(indent=2, sort_keys=True) + "\n"
    if path.exists():
        old = upgrade_config(json.loads(path.read_text()))
        check_split(old, workdir)
        new = json.loads(text)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        # Only the step budget may change between a run and its resumption.
        changed = [k for k in changed if k != "steps"]
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {changed}); "
                "use a new --workdir or the same config"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
