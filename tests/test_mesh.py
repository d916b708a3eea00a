"""The device mesh: the rules table, sharded state and train step on simulated CPU devices.

Multi-device runs need `--xla_force_host_platform_device_count` before JAX starts, so they run
in subprocesses (tests/_mesh_step.py; `onerec train`). Tolerances: a sharded step reorders
float32 sums (all-reduces over shards), so loss and gradients match one device to ~1e-7
relative (measured); the tests allow 1e-5, and 1e-4 for losses after several optimizer steps.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from onerec_jax import sharding
from onerec_jax.tokenizer.semantic_ids import SemanticIds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
    flag = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}


def test_mesh_shape_fills_the_rest_and_rejects_what_cannot_be():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == {
        "data": 4,
        "fsdp": 2,
        "tensor": 1,
        "expert": 1,
    }
    assert sharding.mesh_shape({"expert": 4, "data": 2}, 8)["tensor"] == 1
    # `data` takes the rest by default; another axis at -1 takes it instead.
    assert sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)["fsdp"] == 8
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        sharding.mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.mesh_shape({"fsdp": -1, "tensor": -1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"model": 2}, 2)


def test_two_logical_axes_on_one_mesh_axis_are_caught():
    # "feature" and "mlp" both map to "tensor": one of them would silently stay whole.
    bad = {"w": nn.LogicallyPartitioned(jnp.zeros((4, 4)), ("feature", "mlp"))}
    with pytest.raises(ValueError, match="'feature' and 'mlp' both map to mesh axis 'tensor'"):
        sharding.check_logical(bad)
    sharding.check_logical({"w": nn.LogicallyPartitioned(jnp.zeros((4, 4)), ("embed", "mlp"))})


def test_a_dimension_a_mesh_axis_does_not_divide_stays_whole():
    mesh = jax.sharding.AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES)
    assert sharding._divisible(P("tensor", "fsdp"), (33, 8), mesh) == P(None, "fsdp")
    assert sharding._divisible(P(("data", "fsdp")), (6,), mesh) == P("data")
    assert sharding._divisible(P(("data", "fsdp")), (8,), mesh) == P(("data", "fsdp"))


def _mesh_step(families: str, *meshes: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "tests/_mesh_step.py", families, *meshes],
        cwd=ROOT,
        env={**_env(8), "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _check(rows: list[dict]) -> None:
    for r in rows:
        assert r["same_init"], r  # initialised sharded, the values of one device
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        assert r["grad_rel_err"] < 1e-5, r
        if r["mesh"].get("fsdp", 1) > 1:
            assert r["sharded_fraction"] == 1.0, r  # every parameter split
        elif r["mesh"].get("expert", 1) > 1:
            assert r["sharded_fraction"] > 0.05, r  # the experts split


# Slow (about 2 min of compiles on 2 cores), as is the end-to-end resume test below (2 min):
# the default suite's mesh coverage is the rules, the MoE layer's all-to-all dispatch and the
# compiled plans; `make test-slow` runs the rest (tests/test_multihost.py also resumes a run
# on another mesh).
@pytest.mark.slow
def test_both_moe_families_on_every_mesh_match_one_device():
    rows = _mesh_step("v1,v2", "data=8", "data=2,fsdp=2,tensor=2", "data=2,expert=4")
    assert len(rows) == 8
    _check(rows)


def test_one_moe_layer_dispatches_by_all_to_all_and_matches_one_device():
    out = subprocess.run(
        [sys.executable, "tests/_expert_parallel.py"],
        cwd=ROOT, env={**_env(4), "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["all_to_all"] for r in rows] == [True, False], rows  # {data 2, expert 2}, {data 4}
    for r in rows:
        # Each device routes its own 12 of the 48 tokens (XLA's partitioner gathered all 48
        # router scores for the top-k, even on a pure data mesh).
        assert r["top_k_rows"] == [12], r
        assert r["y_max"] <= 1e-5 and r["loss_rel"] <= 1e-5, r
        assert r["grad_max"] <= 1e-5 * r["grad_scale"], r


@pytest.mark.slow
def test_expert_parallel_all_to_all_matches_one_device():
    """Dropless MoE on an `expert` mesh dispatches tokens by shard_map + all-to-all: the loss
    and gradients of V1-MoE and V2-MoE equal one device's (the capacity rows above leave the
    experts to XLA's partitioner instead, with no all-to-all of ours)."""
    rows = _mesh_step("v1-dropless,v2-dropless", "data=2,expert=4", "fsdp=2,expert=2,tensor=2")
    assert len(rows) == 6
    _check(rows)
    assert [r["all_to_all"] for r in rows] == [False, True, True] * 2  # none on 1 device


def _train(workdir, tok, devices: int, *extra: str, env: dict | None = None):
    cmd = [
        sys.executable,
        "-m",
        "onerec_jax.cli",
        "train",
        "--config",
        "experiments/v1_world_tiny.py",
        "--workdir",
        str(workdir),
        f"--config.tokenizer_dir={tok}",
        "--config.steps=4",
        "--config.checkpoint_every=2",
        "--config.eval_every=4",
        "--config.log_every=1",
        "--config.batch_size=8",
        "--config.model.v1.moe.n_experts=4",
        *extra,
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env={**_env(devices), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _metrics(workdir) -> dict:
    rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: (r["train/loss"], r.get("eval/loss")) for r in rows}


@pytest.mark.slow
def test_a_run_killed_on_one_mesh_resumes_on_another_and_matches_one_device(tmp_path):
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 16, 500) for _ in range(3)], 1)
    tok = tmp_path / "tok"
    SemanticIds.from_codes(codes, (16, 16, 16)).save(tok)
    one = _train(tmp_path / "one", tok, 1)
    assert one.returncode == 0, one.stderr[-2000:]
    mesh_a = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    kill = {"ONEREC_TEST_SIGKILL_AT_STEP": "3"}
    killed = _train(tmp_path / "mesh", tok, 4, *mesh_a, env=kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # The mesh may change between a run and its resumption: here to pure data parallelism.
    resumed = _train(tmp_path / "mesh", tok, 4, "--config.mesh.data=4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = _metrics(tmp_path / "one"), _metrics(tmp_path / "mesh")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for step in ref:
        np.testing.assert_allclose(got[step][0], ref[step][0], rtol=1e-4, err_msg=str(step))
        if ref[step][1] is not None:
            np.testing.assert_allclose(got[step][1], ref[step][1], rtol=1e-4)
    summary = json.loads((tmp_path / "mesh" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["status"] == "finished"
    assert summary["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}


def _plan(mesh: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "onerec_jax.cli", "plan", "--rung", "v1-cpu-s", "--compile"]
    cmd += ["--devices", "4", "--mesh", mesh, "--batch", "8", "--json", *extra]
    out = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_plan_compiles_the_sharded_step_and_fsdp_shrinks_the_state_per_device():
    """`onerec plan --compile` on 4 simulated devices (the CLI starts JAX with them): with
    fsdp = 4 each device holds a quarter of the float32 state (12 bytes per parameter: params
    and two AdamW moments), with data = 4 all of it; the memory limit decides `fits`."""
    data = _plan("data=4", "--device-memory", "3e7")
    fsdp = _plan("fsdp=4", "--device-memory", "3e7")
    assert data["mesh"]["data"] == 4 and fsdp["mesh"]["fsdp"] == 4 and data["devices"] == 4
    state_bytes = 12 * data["params_total"]  # params + two AdamW moments, float32
    assert data["per_device_arguments_bytes"] >= state_bytes
    assert fsdp["per_device_arguments_bytes"] < 0.5 * data["per_device_arguments_bytes"]
    assert (data["fits"], fsdp["fits"]) == (False, True)
    assert data["per_device_bytes"] > 3e7 > fsdp["per_device_bytes"] > 0
    assert fsdp["flops_per_step"] == data["flops_per_step"] > 0  # the same step, analytic
