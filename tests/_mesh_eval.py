"""Run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=4
(tests/test_mesh_eval.py).

`search FAMILIES MESH...`: beam search of small V1-MoE and V2-MoE models (8 beams, 6 requests,
which do not divide over 4 batch shards: the batch is padded) on each mesh given as an argument
(`data=2,fsdp=2` ...) and, as the reference, `beam_search` on one device; one JSON line per
(family, mesh) with whether the items and codes equal the reference's and the largest logprob
difference.

`restore WORKDIR MESH`: the run's newest checkpoint restored onto MESH and onto one device; one
JSON line with the share of parameter elements split over devices and whether the values are
the same.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from onerec_jax import config, sharding
from onerec_jax.configs import default
from onerec_jax.data import schema, sources
from onerec_jax.generate import beam_search, beam_search_on_mesh
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import state as state_lib
from onerec_jax.train.batches import schema_spec
from onerec_jax.train.model_factory import build_model

FAMILY = {
    "v1": ["model.v1.moe.n_experts=4", "model.v1.moe.top_k=2"],
    "v2": ["rung=v2-cpu-s", "model.v2.moe.n_experts=4", "model.v2.first_dense=1"],
}
N_REQUESTS, BEAM = 6, 8


def _mesh(text: str) -> jax.sharding.Mesh:
    axes = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    return sharding.make_mesh(axes, jax.devices()[: int(np.prod(list(axes.values())))])


def search(families: list[str], meshes: list[str]) -> None:
    src = sources.open_source("world:tiny", split="test")
    rng = np.random.default_rng(0)
    table = SemanticIds.from_codes(rng.integers(0, 16, (src.n_items, 3)), (16, 16, 16))
    for family in families:
        cfg = config.resolve(default.get_config(), FAMILY[family])
        spec = schema_spec(cfg)
        raw = src.raw_batch(np.arange(N_REQUESTS), spec.history_window, spec)
        b = schema.build_batch(raw, spec)
        inputs = {k: v for k, v in b.items() if k not in ("user_id", "request_ts")}
        model = build_model(cfg, src, table.vocab)
        _, tx, _ = state_lib.optimizer(cfg)
        ref = None
        for text in ["data=1", *meshes]:
            mesh = _mesh(text)
            # The same values on every mesh (a sharded init equals one device's: test_mesh.py).
            state, _ = state_lib.sharded_state(cfg, model, tx, table.n_levels, mesh)
            variables = {"params": state.params, "moe_bias": state.moe_bias}
            if ref is None:  # the plain single-device call, as tests/test_generate.py makes it
                out = beam_search(model, variables, inputs, table.trie(), BEAM)
                ref = out = {k: np.asarray(v) for k, v in out.items()}
            else:
                out = beam_search_on_mesh(model, variables, inputs, table.trie(), BEAM, mesh)
            finite = np.isfinite(ref["logprob"])
            row = {
                "family": family,
                "mesh": dict(mesh.shape),
                "shape": list(out["items"].shape),
                "same_items": bool(np.array_equal(out["items"], ref["items"])),
                "same_codes": bool(np.array_equal(out["codes"], ref["codes"])),
                "same_finite": bool(np.array_equal(np.isfinite(out["logprob"]), finite)),
                "logprob_max_abs_diff": float(
                    np.max(np.abs(out["logprob"][finite] - ref["logprob"][finite]))
                ),
                "sharded_fraction": sharding.sharded_fraction(state.params),
            }
            print(json.dumps(row), flush=True)


def restore(workdir: str, text: str) -> None:
    workdir = pathlib.Path(workdir).resolve()
    _, ref, _ = state_lib.restore_latest(workdir, _mesh("data=1"))
    _, got, step = state_lib.restore_latest(workdir, _mesh(text))
    pairs = zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params), strict=True)
    row = {
        "step": step,
        "sharded_fraction": sharding.sharded_fraction(got.params),
        "same_params": all(np.array_equal(np.asarray(a), np.asarray(r)) for a, r in pairs),
    }
    print(json.dumps(row), flush=True)


def main() -> None:
    assert jax.device_count() == 4, jax.device_count()
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py sets it
    if sys.argv[1] == "search":
        search(sys.argv[2].split(","), sys.argv[3:])
    elif sys.argv[1] == "restore":
        restore(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
