"""Generation and evaluation on the device mesh: beam search and `onerec eval` on simulated CPU
devices give one device's items and metrics.

Multi-device runs need `--xla_force_host_platform_device_count` before JAX starts, so they run
in subprocesses (tests/_mesh_eval.py; `onerec eval`). Tolerance: a sharded search reorders
float32 sums (all-reduces over `fsdp` / `tensor` shards), so a beam's log-probability (a sum of
Q = 3 log-softmaxes, about -10 here) moves by up to 3e-6 (measured); the test allows 1e-5
absolute. Items and codes must be identical.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from onerec_jax import cli, config, evaluate
from onerec_jax.configs import default
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import loop
from onerec_jax.train.run_config import load_run_config
from onerec_jax.train.state import run_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
    flag = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run(devices: int, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(devices), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# Slow (about 3 min of compiles on 2 cores): two families x four meshes.
@pytest.mark.slow
def test_beam_search_on_every_mesh_gives_one_devices_items():
    meshes = ("data=4", "data=2,fsdp=2", "data=2,tensor=2")
    rows = _rows(_run(4, "tests/_mesh_eval.py", "search", "v1,v2", *meshes))
    assert len(rows) == 8  # per family: one device, then each mesh
    for r in rows:
        # 6 requests on 4 batch shards: padded to 8, the pad rows dropped.
        assert r["shape"] == [6, 8], r
        assert r["same_items"] and r["same_codes"] and r["same_finite"], r
        assert r["logprob_max_abs_diff"] <= 1e-5, r
        if r["mesh"]["fsdp"] > 1:
            assert r["sharded_fraction"] == 1.0, r  # the search read split parameters


def _write_run_config(workdir, *overrides: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = config.resolve(default.get_config(), list(overrides))
    (workdir / "config.json").write_text(cfg.to_json(indent=2, sort_keys=True))


def test_a_runs_mesh_that_does_not_fit_is_one_clear_error(tmp_path, capsys):
    # A run trained on {data 1, fsdp 2}, read on this process's one device.
    _write_run_config(tmp_path / "run", "mesh.data=1", "mesh.fsdp=2")
    with pytest.raises(ValueError, match=r"mesh .*'fsdp': 2.* does not fit the 1 devices here"):
        evaluate.evaluate_run(tmp_path / "run")
    assert cli.main(["eval", "--workdir", str(tmp_path / "run")]) == 2
    assert "onerec eval --mesh data=-1" in capsys.readouterr().err
    # Another mesh is the caller's choice, spelled as `onerec plan --mesh` spells it.
    cfg = load_run_config(tmp_path / "run")
    mesh = run_mesh(cfg, {"data": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    assert cli.main(["eval", "--workdir", str(tmp_path / "run"), "--mesh", "data"]) == 2
    assert "expected AXIS=SIZE" in capsys.readouterr().err


# Slow (about 40 s: a 2-step run evaluated on one device, then in a 2-device and a 4-device
# process).
@pytest.mark.slow
def test_eval_on_two_devices_restores_sharded_and_matches_one_device(tmp_path):
    rng = np.random.default_rng(0)
    SemanticIds.from_codes(rng.integers(0, 16, (500, 3)), (16, 16, 16)).save(tmp_path / "tok")
    overrides = [
        f"tokenizer_dir={tmp_path / 'tok'}",
        "steps=2",
        "batch_size=8",
        "checkpoint_every=2",
        "eval_every=0",
        "eval_requests=0",
        "model.v1.moe.n_experts=4",  # trained with capacity dispatch, decoded dropless
    ]
    run = tmp_path / "run"
    loop.train(config.resolve(config.load("experiments/v1_world_tiny.py"), overrides), run)
    # As if trained on {data 1, fsdp 2} (a run's mesh may change at resumption, so a run's
    # config holds the mesh it last ran on).
    saved = json.loads((run / "config.json").read_text())
    saved["mesh"] = {"data": 1, "fsdp": 2, "tensor": 1, "expert": 1}
    (run / "config.json").write_text(json.dumps(saved))
    # 12 requests in batches of 5: on 2 batch shards each batch is padded to 6.
    args = {"split": "test", "beam": 8, "batch": 5, "max_requests": 12}
    ref = evaluate.evaluate_run(run, mesh={"data": -1}, **args)
    saved = evaluate.eval_path(run, "test", 12, 8)  # a 12-request look: its own file
    saved.unlink()
    cmd = ["-m", "onerec_jax.cli", "eval", "--workdir", str(run), "--json", "--beam", "8"]
    got = _run(2, *cmd, "--batch-size", "5", "--max-requests", "12")  # the run's own mesh
    assert json.loads(got.splitlines()[-1]) == ref
    assert json.loads(saved.read_text()) == ref and not (run / "eval_test.json").exists()
    assert ref["n_requests"] == 12 and 0.0 <= ref["recall@10"] <= 1.0
    # The checkpoint is restored straight into the fsdp layout: every parameter split, with
    # one device's values.
    (restored,) = _rows(_run(4, "tests/_mesh_eval.py", "restore", str(run), "fsdp=4"))
    assert restored == {"step": 2, "sharded_fraction": 1.0, "same_params": True}
