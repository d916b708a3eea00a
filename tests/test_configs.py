"""Configs: every shipped config and every rung builds its model; `resolve` applies the rung,
then the overrides, then validation; run configs written before the per-family model sections
read as today's."""

import json
import pathlib

import jax
import pytest

from onerec_jax import config, flops
from onerec_jax.configs import default
from onerec_jax.model.rungs import RUNGS
from onerec_jax.train.model_factory import build_model
from onerec_jax.train.run_config import upgrade_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))


class _Catalogue:
    n_items, n_authors, n_tags = 1_000, 100, 256


def _params(cfg) -> int:
    codes = cfg.tokenizer_codes or 64
    model = build_model(cfg, _Catalogue, (codes,) * 3)
    shapes = flops.param_shapes(model)  # jax.eval_shape: nothing is allocated
    return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_builds_its_model(path):
    cfg = config.resolve(config.load(path))
    assert _params(cfg) > 0
    assert set(cfg.model) == {"family", cfg.model.family}  # the other family's section is gone


@pytest.mark.parametrize("name", config.packaged_configs())
def test_every_packaged_config_loads_by_name_and_builds(name):
    cfg = config.resolve(config.load(name))
    assert _params(cfg) > 0


def test_every_rung_builds_its_model():
    sizes = {}
    for name in sorted(RUNGS):
        cfg = config.resolve(default.get_config(), [f"rung={name}"])
        assert cfg.model.family == name[:2] and cfg.rung == name
        sizes[name] = _params(cfg)
    assert sizes["v1-0.015b"] < sizes["v1-0.121b"] < sizes["v1-0.935b"] < sizes["v1-2.633b"]
    assert sizes["v2-0.1b"] < sizes["v2-1b"] < sizes["v2-8b"]


def test_resolve_applies_the_rung_then_the_overrides_then_validates():
    base = default.get_config()
    cfg = config.resolve(base, ["rung=v1-cpu-s", "model.v1.encoder.d_model=96"])
    assert cfg.model.v1.encoder.d_model == 96  # the override wins over the rung
    assert cfg.model.v1.d_ff == 128 and cfg.data.life_len == 64  # the rung's other fields
    assert base.model.v1.encoder.d_model == 32 and "v2" in base.model  # the input is untouched
    # A rung named in the file is applied too; an override of its field still wins.
    base.rung = "v2-cpu-s"
    cfg = config.resolve(base, ["model.v2.n_layers=3"])
    assert (cfg.model.family, cfg.model.v2.n_layers, cfg.model.v2.d_model) == ("v2", 3, 64)
    with pytest.raises(config.ConfigError, match=r"family v1, but this run's model\.family is v2"):
        config.resolve(base, ["model.v1.dec_layers=3"])
    with pytest.raises(config.ConfigError, match="unknown rung 'v3-1b'"):
        config.resolve(default.get_config(), ["rung=v3-1b"])
    with pytest.raises(config.ConfigError, match=r"unknown config field 'model\.v1\.d_modl'"):
        config.resolve(default.get_config(), ["model.v1.d_modl=3"])
    with pytest.raises(config.ConfigError, match="checkpoint_every must be >= 1"):
        config.resolve(default.get_config(), ["checkpoint_every=0"])
    with pytest.raises(config.ConfigError, match="must be resolved"):
        config.check_resolved(default.get_config())
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load("no_such_config")


def test_configs_a_run_could_not_resume_are_refused_before_anything_is_written():
    # A field of its own would be saved in config.json and make the run unreadable later.
    extra = default.get_config()
    extra.notes = "x"
    with pytest.raises(config.ConfigError, match=r"\['notes'\] are not fields"):
        config.resolve(extra)
    # A rung of one family with a model of the other would record a rung it did not train.
    with pytest.raises(config.ConfigError, match="rung v1-cpu-s is a v1 model"):
        config.resolve(default.get_config(), ["rung=v1-cpu-s", "model.family=v2"])
    # A config written for the old flat model layout gets one error that says so.
    flat = default.get_config()
    del flat.model.v1
    flat.model.d_model = 32
    with pytest.raises(config.ConfigError, match=r"no model\.v1 section.*old flat layout"):
        config.resolve(flat)


# config.json of runs written before the per-family sections (flat `model`), as they were.
OLD_V1 = {
    "batch_size": 32, "bf16": False, "checkpoint_every": 50, "eval_every": 50,
    "data": {"life_len": 64, "max_targets": 5, "pos_len": 32, "short_len": 20},
    "eval_requests": 256, "keep_checkpoints": 3, "log_every": 10, "rung": "", "seed": 0,
    "model": {
        "author_dim": 16, "context_dim": 0, "context_ff": 0, "context_heads": 0, "d_ff": 64,
        "d_model": 32, "dec_layers": 2, "enc_layers": 1, "family": "v1", "feature_dim": 8,
        "ffn": "swiglu", "first_dense": 0, "g_kv": 0, "l_kv": 1, "loss": "sum", "moe_d_ff": 0,
        "moe_dispatch": "capacity", "moe_experts": 0, "moe_shared": 0, "moe_top_k": 2,
        "n_heads": 4, "n_queries": 8, "qformer_blocks": 1, "s_kv": 1, "session_wise": False,
    },
    "optim": {
        "clip_norm": 1.0, "grad_accum": 1, "learning_rate": 0.003, "warmup_steps": 20,
        "weight_decay": 0.01,
    },
    "source": "world:tiny", "steps": 200, "tokenizer_codes": 0, "tokenizer_dir": "",
    "workers": 0, "world_seed": -1, "world_split": "time_cut",
}  # fmt: skip
OLD_V2_MODEL = {
    **OLD_V1["model"], "family": "v2", "context_dim": 64, "context_ff": 128,
    "context_heads": 4, "d_ff": 128, "d_model": 64, "loss": "mean", "moe_experts": 4,
    "n_queries": 16,
}  # fmt: skip


def _flat(cfg):
    return config.flatten(cfg.to_dict())


def test_old_flat_run_configs_read_as_todays():
    assert _flat(upgrade_config(OLD_V1)) == _flat(config.resolve(default.get_config()))
    old_v2 = {**OLD_V1, "rung": "v2-cpu-s", "model": OLD_V2_MODEL}
    today = config.resolve(default.get_config(), ["rung=v2-cpu-s", "model.v2.moe.n_experts=4"])
    assert _flat(upgrade_config(old_v2)) == _flat(today)
    # The oldest: no `family`, no MoE dispatch (it was dropless then), eval_batches.
    oldest = json.loads(json.dumps(OLD_V1))
    for key in ("family", "moe_dispatch", "qformer_blocks", "l_kv"):
        del oldest["model"][key]
    oldest["eval_batches"] = oldest.pop("eval_requests") // oldest["batch_size"]
    up = upgrade_config(oldest)
    assert up.model.v1.moe.dispatch == "dropless" and up.eval_requests == 256
    assert _flat(up) == _flat(upgrade_config(OLD_V1)) | {"model.v1.moe.dispatch": "dropless"}
    # Today's config.json reads back as itself.
    assert _flat(upgrade_config(today.to_dict())) == _flat(today)
