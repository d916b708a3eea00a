"""Configs: ml-collections `get_config()` files, and the one way every change reaches them.

A config is a Python file defining `get_config() -> ConfigDict`, or the name of one shipped in
`onerec_jax/configs/` (`default`, `v1_ml100k`, ...). Every change to a config goes through one
mechanism, `update` (ml-collections' dotted `update_from_flattened_dict` on the locked dict):
a rung's fields, `--config.a.b=value` overrides, and the upgrade of a run config written by an
older version (onerec_jax/train/run_config.py). Fields must exist and values keep the field's
type, so a typo or a wrong type fails with one error that names the field instead of running
the wrong experiment.

`resolve(cfg, overrides)` gives the config a run uses, in this order: the rung named by
`rung` (an override may name it) -> the command-line overrides (so they win over the rung) ->
validation. For a training config, only the section of its `model.family` is kept.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from onerec_jax.configs import default
from onerec_jax.model import rungs

FAMILIES = ("v1", "v2")


class ConfigError(ValueError):
    """A config file, field or override that cannot be used."""


def packaged_configs() -> list[str]:
    """Names of the configs shipped in onerec_jax/configs/."""
    here = pathlib.Path(__file__).with_name("configs")
    return sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))


def load(
    path_or_name: str | os.PathLike | None,
    default: Callable[[], ml_collections.ConfigDict] | None = None,
) -> ml_collections.ConfigDict:
    """The `get_config()` of a file, of a packaged config name, or `default()` when None."""
    if path_or_name is None:
        if default is None:
            raise ConfigError("no config given")
        return default()
    p = pathlib.Path(path_or_name)
    if p.is_file():
        spec = importlib.util.spec_from_file_location(f"_onerec_config_{p.stem}", p)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
    elif str(path_or_name) in packaged_configs():
        module = importlib.import_module(f"onerec_jax.configs.{path_or_name}")
    else:
        raise ConfigError(
            f"config file {p} does not exist (nor is it one of the packaged configs: "
            f"{', '.join(packaged_configs())})"
        )
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {p} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{p}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted form every update takes."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping | ml_collections.ConfigDict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_field(cfg: ml_collections.ConfigDict, key: str, source: str) -> Any:
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            here = (
                ", ".join(sorted(node.keys()))
                if isinstance(node, ml_collections.ConfigDict)
                else ""
            )
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{source}: unknown config field {key!r} (known at {where}: {here})")
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"{source}: {key!r} is a section, not a field")
    return node


def update(cfg: ml_collections.ConfigDict, fields: Mapping[str, Any], source: str) -> None:
    """Set dotted `fields` on cfg in place; `source` names where they come from in errors."""
    for key, value in fields.items():
        like = _check_field(cfg, key, source)
        if isinstance(like, bool) != isinstance(value, bool) and like is not None:
            # bool is an int subclass: without this, n=True would make a count of 1.
            raise ConfigError(f"{source}: {key}={value!r}: expected {type(like).__name__}")
    try:
        cfg.update_from_flattened_dict(dict(fields))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _parse(value: str, like: object, key: str) -> object:
    """An override's text as a value of the field's type."""
    if isinstance(like, str):
        return value
    try:
        v = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if like is None:
            return value
        raise ConfigError(f"--config.{key}={value}: not a {type(like).__name__}") from None
    if isinstance(like, bool) != isinstance(v, bool) and like is not None:
        want = "True or False" if isinstance(like, bool) else type(like).__name__
        raise ConfigError(f"--config.{key}={value}: expected {want}")
    if isinstance(like, float) and isinstance(v, int):
        v = float(v)
    if isinstance(like, tuple) and isinstance(v, list):
        v = tuple(v)
    if like is not None and not isinstance(v, type(like)):
        raise ConfigError(f"--config.{key}={value}: expected {type(like).__name__}")
    return v


def parse_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` strings -> {dotted field: typed value}; unknown fields raise ConfigError."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form --config.field=value")
        out[key] = _parse(value, _check_field(cfg, key, "--config"), key)
    return out


def resolve(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """The config a run uses: rung -> overrides -> validation (module docstring). Returns a
    locked copy; `cfg` is not changed."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.lock()
    fields = parse_overrides(cfg, overrides)
    rung = fields.get("rung", cfg.get("rung", ""))
    if rung:
        try:
            update(cfg, rungs.rung_fields(rung), f"rung {rung}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    update(cfg, fields, "--config")
    if "model" in cfg and "family" in cfg.model:
        keep_family(cfg, touched=fields)
        if rung and rungs.rung_fields(rung)["model.family"] != cfg.model.family:
            raise ConfigError(
                f"rung {rung} is a {rungs.rung_fields(rung)['model.family']} model but "
                f"model.family is {cfg.model.family}; pick a rung of that family"
            )
        check_training_fields(cfg)
    validate(cfg)
    return cfg


def check_training_fields(cfg: ml_collections.ConfigDict) -> None:
    """A training config has exactly the fields of the default config (for its family): a
    field of its own would be recorded in the run's config.json but read by nothing, and a
    missing one would fail deep inside the run."""
    ref = default.get_config()
    ref.lock()
    update(ref, {"model.family": cfg.model.family}, "default config")
    keep_family(ref)
    have, want = set(flatten(cfg.to_dict())), set(flatten(ref.to_dict()))
    if have - want:
        raise ConfigError(
            f"config fields {sorted(have - want)} are not fields of a training config "
            "(onerec_jax/configs/default.py lists them all)"
        )
    if want - have:
        raise ConfigError(f"the config lacks the training fields {sorted(want - have)}")


def check_resolved(cfg: ml_collections.ConfigDict) -> None:
    """Refuse a training config that did not go through `resolve` (its rung would be ignored
    and both families' sections would be kept)."""
    if "model" in cfg and all(f in cfg.model for f in FAMILIES):
        raise ConfigError("a training config must be resolved first: onerec_jax.config.resolve")


def keep_family(cfg: ml_collections.ConfigDict, touched: Mapping[str, Any] = ()) -> None:
    """Drop the model sections of the other families (a V2 run has no encoder stack to
    configure); refuse overrides of a section the run does not use."""
    family = cfg.model.family
    if family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(cfg.model.get(family), ml_collections.ConfigDict):
        flat = "d_model" in cfg.model  # the layout before the per-family sections
        raise ConfigError(
            f"the config has no model.{family} section"
            + (
                " (its model fields are the old flat layout: derive the config from "
                "onerec_jax/configs/default.py, where model.v1 / model.v2 hold them)"
                if flat
                else ""
            )
        )
    for key in touched:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] in FAMILIES and parts[1] != family:
            raise ConfigError(
                f"--config.{key} sets a field of model family {parts[1]}, but this run's "
                f"model.family is {family}"
            )
    with cfg.unlocked():
        for other in FAMILIES:
            if other != family and other in cfg.model:
                del cfg.model[other]


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Values no run can use, caught before anything is built or written."""
    at_least = {
        "steps": 1,  # 0 would report a run that never trained as finished
        "batch_size": 1,
        "log_every": 1,
        "checkpoint_every": 1,
        "keep_checkpoints": 1,
        "eval_every": 0,
        "eval_requests": 0,
        "workers": 0,
        "pack_targets": 0,
    }
    for key, low in at_least.items():
        if key in cfg and cfg[key] < low:
            raise ConfigError(f"config field {key} must be >= {low}, got {cfg[key]}")
    data = cfg.get("data", {})
    src = str(cfg.get("source", ""))
    if data.get("scenarios") and not src.startswith(("world:mall-", "parquet:", "csv:")):
        raise ConfigError(
            "config field data.scenarios needs an e-commerce source (world:mall-tiny, "
            f"world:mall-small, or a user log with a scenario column); source {src!r} has "
            "no scenarios"
        )
    for name in ("click_len", "cart_len", "order_len"):
        if data.get(name, 0) < 0:
            raise ConfigError(f"config field data.{name} must be >= 0, got {data[name]}")
    if "log_session_len" in data:
        if data.log_session_len < 1:
            raise ConfigError(
                f"config field data.log_session_len must be >= 1, got {data.log_session_len}"
            )
        if str(cfg.get("source", "")).startswith("world:"):
            if data.log_session_len != 5:
                raise ConfigError(
                    "config field data.log_session_len applies to logged sources only; the "
                    f"world's sessions are its own (source {cfg.source})"
                )
        elif "max_targets" in data and data.log_session_len > data.max_targets:
            raise ConfigError(
                f"config field data.log_session_len ({data.log_session_len}) exceeds "
                f"data.max_targets ({data.max_targets}): the events past max_targets in a "
                "session would never be a target"
            )


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.x=y` (and `--config.x y`) arguments from the rest of argv."""
    rest, overrides = [], []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value")
                body = f"{body}={argv[i + 1]}"
                next(it)
            overrides.append(body)
        else:
            rest.append(a)
    return rest, overrides
