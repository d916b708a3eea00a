"""Several JAX processes on one machine: `onerec train --coordinator 127.0.0.1:PORT` with two
processes of two simulated CPU devices each (collectives through gloo) against one process of
four devices; a kill and resume on the same two processes; a dead peer.

The end-to-end runs are slow (three to four trainings with their compiles on 2 cores): run them
with `pytest -m slow tests/test_multihost.py`. Tolerance: the two layouts reduce the same float32
sums in another order, so losses match to ~1e-6 relative; the tests allow 1e-4, as
tests/test_mesh.py. (The global batch is row for row the one-process batch: process p reads
rows [p*B/n, (p+1)*B/n) of it, tests/test_pipeline.py.)
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from onerec_jax import distributed
from onerec_jax.tokenizer.semantic_ids import SemanticIds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_process_flags_must_come_together_and_make_sense(monkeypatch):
    with pytest.raises(ValueError, match="give all of --coordinator"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ValueError, match="--process-id 2 is not in"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    # One process, or no launch detected: nothing started (this pytest process has 1 device).
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False
    for k in ("SLURM_NTASKS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("MEGASCALE_COORDINATOR_ADDRESS", raising=False)
    assert distributed.cluster_detected() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_detected() is None  # sbatch's shell, not inside srun
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert distributed.cluster_detected() == "slurm"
    monkeypatch.setenv(distributed.ENV_DISABLE, "0")
    assert distributed.cluster_detected() is None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, tok, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "onerec_jax.cli", "train",
        "--config", "experiments/v1_world_tiny.py", "--workdir", str(workdir),
        f"--config.tokenizer_dir={tok}", "--config.steps=4", "--config.checkpoint_every=2",
        "--config.eval_every=4", "--config.log_every=1", "--config.batch_size=8",
        "--config.model.v1.moe.n_experts=4", *extra,
    ]  # fmt: skip


def _env(devices: int) -> dict:
    flag = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _processes(workdir, tok, n=2, env=None, heartbeat=30, extra=()):
    """Start the n processes of one run; returns the Popen objects."""
    port = _port()
    procs = []
    for i in range(n):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n)]
        flags += ["--process-id", str(i), "--heartbeat-s", str(heartbeat)]
        procs.append(
            subprocess.Popen(
                _cmd(workdir, tok, *flags, *extra),
                cwd=ROOT,
                env={**_env(2), **((env or {}).get(i, {}))},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait(procs, timeout: float = 600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def _metrics(workdir) -> dict:
    rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: (r["train/loss"], r.get("eval/loss")) for r in rows}


@pytest.fixture
def tok(tmp_path):
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 16, 500) for _ in range(3)], 1)
    SemanticIds.from_codes(codes, (16, 16, 16)).save(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_a_kill(tmp_path, tok):
    one = subprocess.run(
        _cmd(tmp_path / "one", tok, "--config.mesh.fsdp=2"),
        cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    # Both processes die at step 3 (after the step-2 checkpoint), then resume on two again.
    kill = {i: {"ONEREC_TEST_SIGKILL_AT_STEP": "3"} for i in range(2)}
    killed = _wait(_processes(tmp_path / "two", tok, env=kill))
    assert [rc for rc, _ in killed] == [-9, -9], killed[0][1][-2000:] + killed[1][1][-2000:]
    data_files = sorted(p.name for p in (tmp_path / "two/checkpoints/2/data").iterdir())
    assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files
    # Resumed on {tensor 2, expert 2}: tensor groups must stay within a process (each
    # process's devices then hold its own rows of the batch); before the mesh laid tensor
    # outside expert, each process's rows went to the other's devices: a wrong batch.
    mesh = ["--config.mesh.data=1", "--config.mesh.tensor=2", "--config.mesh.expert=2"]
    resumed = _wait(_processes(tmp_path / "two", tok, extra=mesh))
    assert [rc for rc, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    ref, got = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for step in ref:
        np.testing.assert_allclose(got[step][0], ref[step][0], rtol=1e-4, err_msg=str(step))
        if ref[step][1] is not None:
            np.testing.assert_allclose(got[step][1], ref[step][1], rtol=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["processes"] == 2
    assert summary["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2, "expert": 2}
    # A tensor axis wider than one process's devices would split batch shards over processes.
    wide = ["--config.mesh.data=1", "--config.mesh.tensor=4", "--config.steps=6"]
    refused = _wait(_processes(tmp_path / "two", tok, extra=wide))
    assert [rc for rc, _ in refused] == [2, 2]
    assert "a batch shard spans processes" in refused[0][1]
    # A run saved by two processes does not silently resume on one.
    more = ["--config.steps=6", "--config.mesh.fsdp=2"]
    single = subprocess.run(
        _cmd(tmp_path / "two", tok, *more), cwd=ROOT, env=_env(4), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 2
    assert "was saved by 2 process(es); resume it with 2" in single.stderr


@pytest.mark.slow
def test_a_dead_peer_stops_the_other_process_within_the_heartbeat_timeout(tmp_path, tok):
    heartbeat = 5
    kill = {1: {"ONEREC_TEST_SIGKILL_AT_STEP": "1"}}
    t = time.monotonic()
    procs = _processes(tmp_path / "run", tok, env=kill, heartbeat=heartbeat)
    (rc0, err0), (rc1, _) = _wait(procs, timeout=300)
    assert rc1 == -9
    assert rc0 != 0  # the survivor fails, it does not hang nor report success
    assert "another task died" in err0 or "unhealthy" in err0, err0[-2000:]
    assert time.monotonic() - t < 240  # compile + the heartbeat timeout, never a hang
