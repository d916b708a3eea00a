"""Experiment configs: ml-collections `get_config()` files plus `--config.a.b=value` overrides.

A config file is a Python file defining `get_config() -> ConfigDict`. Overrides name existing
fields only (the dict is locked), and values are parsed to the field's type, so a typo or a
wrong type fails with one error that names the field instead of running the wrong experiment.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from collections.abc import Callable, Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def load_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    spec = importlib.util.spec_from_file_location(f"_onerec_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {p} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{p}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def _parse(value: str, like: object, key: str) -> object:
    if isinstance(like, str):
        return value
    try:
        v = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if like is None:
            return value
        raise ConfigError(f"--config.{key}={value}: not a {type(like).__name__}") from None
    if isinstance(like, bool) != isinstance(v, bool) and like is not None:
        # bool is an int subclass: without this, --config.n=True would make a count of 1.
        want = "True or False" if isinstance(like, bool) else type(like).__name__
        raise ConfigError(f"--config.{key}={value}: expected {want}")
    if isinstance(like, float) and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if isinstance(like, tuple) and isinstance(v, list):
        v = tuple(v)
    if like is not None and not isinstance(v, type(like)):
        raise ConfigError(f"--config.{key}={value}: expected {type(like).__name__}")
    return v


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Set `a.b=value` entries on cfg in place; unknown fields raise ConfigError."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form --config.field=value")
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config field {key!r}")
            node = node[part]
        if parts[-1] not in node:
            known = ", ".join(sorted(node.keys()))
            raise ConfigError(f"unknown config field {key!r} (known here: {known})")
        node[parts[-1]] = _parse(value, node[parts[-1]], key)


def resolve(
    path: str | None,
    default: Callable[[], ml_collections.ConfigDict],
    overrides: Sequence[str] = (),
) -> ml_collections.ConfigDict:
    """The config of a run: file (or default), overrides applied, then locked."""
    cfg = load_file(path) if path else default()
    cfg.lock()
    apply_overrides(cfg, overrides)
    return cfg


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
