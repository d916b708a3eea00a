"""The fault suite on trained runs (slow: each trains): a config rejected after config.json
was written, a torn metrics line, a finished run run again, a read-only eval, a corrupt newest
checkpoint, another semantic-id table, a full disk during a save (injected, and a real tmpfs),
SIGTERM and Ctrl-C in every phase of a training process (exit 0, resumable), SIGKILL at random
moments (resume bit-identical)."""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from onerec_jax import cli, evaluate
from onerec_jax import config as config_lib
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import loop

# Each case trains (a compile or more): the whole file runs with `pytest -m slow`; the fast
# fault cases, one per defect, are in test_faults.py and test_faults_io.py.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments/v1_world_tiny.py")
TRAIN = ["steps=4", "checkpoint_every=2", "log_every=1", "batch_size=8", "eval_requests=0"]


def _strict(path: pathlib.Path) -> dict:
    def no_nan(x):
        raise AssertionError(f"{path}: {x} is not JSON")

    return json.loads(path.read_text(), parse_constant=no_nan)


def _cfg(table: pathlib.Path, *extra: str):
    return config_lib.resolve(config_lib.load(CONFIG), [f"tokenizer_dir={table}", *TRAIN, *extra])


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 16, 500) for _ in range(3)], 1)  # world:tiny: 500 items
    out = tmp_path_factory.mktemp("tok")
    SemanticIds.from_codes(codes, (16, 16, 16)).save(out)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, table):
    """A run whose first start failed after config.json was written (heads that do not divide
    the width fail only when the model is built), then the corrected command in the same
    workdir: it must be taken, not refused as "a run with a different config"."""
    work = tmp_path_factory.mktemp("runs") / "run"
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, 16, 500) for _ in range(3)], 1)
    other = tmp_path_factory.mktemp("other_tok")
    SemanticIds.from_codes(codes, (16, 16, 16)).save(other)
    with pytest.raises(ValueError, match="heads"):  # and another table, recorded
        loop.train(_cfg(other, "model.v1.n_heads=3"), work)
    assert (work / "config.json").exists() and (work / "table.json").exists()
    summary = loop.train(_cfg(table), work)
    assert summary["status"] == "finished" and summary["step"] == 4
    return work


def _copy(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dest = tmp_path / "copy"
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def test_a_finished_run_run_again_keeps_its_result(run, table):
    before = _strict(run / "summary.json")
    for steps in (4, 2):  # the same command, and one with fewer steps
        summary = loop.train(_cfg(table, f"steps={steps}"), run)
        assert summary["final_train_loss"] == before["final_train_loss"]
        assert np.isfinite(_strict(run / "summary.json")["final_train_loss"])


def test_a_torn_metrics_line_does_not_stop_the_run(run, table, tmp_path):
    work = _copy(run, tmp_path)
    lines = (work / "metrics.jsonl").read_text()
    (work / "metrics.jsonl").write_text(lines + '{"step": 5, "train/lo')
    with pytest.warns(UserWarning, match="torn"):
        loop.train(_cfg(table), work)
    assert (work / "metrics.jsonl").read_text() == lines


def test_eval_prints_its_metrics_before_a_failed_write(run, tmp_path, capsys, monkeypatch):
    work = _copy(run, tmp_path)

    def read_only(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(evaluate, "write_atomic", read_only)
    argv = ["eval", "--workdir", str(work), "--max-requests", "4", "--beam", "4", "--json"]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["n_requests"] == 4  # printed first
    line = [x for x in err.splitlines() if x.startswith("onerec: error")]
    assert len(line) == 1 and "eval_test_n4_beam4.json: could not write" in line[0]


def test_a_corrupt_newest_checkpoint_falls_back_in_eval_and_training(run, table, tmp_path):
    work = _copy(run, tmp_path)
    files = [p for p in (work / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)  # the array data, cut short
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"checkpoints/4: checkpoint unreadable"):
        m = evaluate.evaluate_run(work, "test", beam=4, max_requests=4, write=False)
    assert m["step"] == 2 and (work / "checkpoints" / "4").is_dir()  # eval moves nothing
    with pytest.warns(UserWarning, match=r"moved to 4.corrupt; using step 2"):
        summary = loop.train(_cfg(table), work)  # resumes from 2 and saves 4 anew
    assert summary["step"] == 4 and (work / "checkpoints" / "4.corrupt").is_dir()
    assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]


def test_another_table_is_refused_with_one_line(run, tmp_path, capsys):
    work = _copy(run, tmp_path)
    good = SemanticIds.load(
        table_dir := pathlib.Path(_strict(work / "config.json")["tokenizer_dir"])
    )
    assert table_dir.is_absolute()
    body = good.codes[1:][::-1].copy()  # the same codes, given to other items
    SemanticIds.from_codes(body, good.vocab).save(tmp_path / "other")
    cfg = _strict(work / "config.json")
    cfg["tokenizer_dir"] = str(tmp_path / "other")
    (work / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["eval", "--workdir", str(work), "--max-requests", "4", "--beam", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the semantic-id table this run was trained with" in err[0]


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(run, table, tmp_path, monkeypatch):
    work = _copy(run, tmp_path)
    from onerec_jax.train import checkpointing

    real = checkpointing.Checkpoints.save

    def full(self, step, *a, **k):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **k)

    monkeypatch.setattr(checkpointing.Checkpoints, "save", full)
    with pytest.raises(OSError, match="No space left"):
        loop.train(_cfg(table, "steps=6"), work)
    monkeypatch.undo()  # space freed: the same command resumes from step 4
    summary = loop.train(_cfg(table, "steps=6"), work)
    assert summary["status"] == "finished" and summary["step"] == 6
    assert [
        json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()
    ] == list(range(1, 7))


def _start(work: pathlib.Path, table: pathlib.Path, steps: int) -> subprocess.Popen:
    argv = ["train", "--config", CONFIG, "--workdir", str(work)]
    argv += [f"--config.{x}" for x in (*_cfg_args(table), f"steps={steps}")]
    return subprocess.Popen(
        [sys.executable, "-m", "onerec_jax.cli", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cfg_args(table: pathlib.Path) -> list[str]:
    return [
        f"tokenizer_dir={table}",
        *(x for x in TRAIN if not x.startswith("steps")),
        "checkpoint_every=1",
    ]


def _logged(work: pathlib.Path) -> int:
    path = work / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_step(work: pathlib.Path, step: int, p: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if _logged(work) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} logged: {p.poll()} {p.stderr.read() if p.poll() else ''}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_any_phase_exits_0_and_resumes(table, tmp_path, sig):
    """Sent during start-up (before the first step), mid-training with a save every step (so
    often during a save), the process exits 0 with a checkpoint and a summary saying
    "preempted"; the same command then finishes the run."""
    work = tmp_path / "run"
    for phase in ("startup", "training"):
        logged = _logged(work)
        p = _start(work, table, steps=400)
        if phase == "startup":  # config.json is written once the handlers are in place
            while not (work / "config.json").exists() and p.poll() is None:
                time.sleep(0.02)
        else:
            _wait_for_step(work, logged + 3, p)  # 3 steps of this start
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        s = _strict(work / "summary.json")
        assert s["status"] == "preempted" and 0 < s["step"] < 400
    p = _start(work, table, steps=s["step"] + 2)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert _strict(work / "summary.json")["status"] == "finished"
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, s["step"] + 3))  # no step logged twice, none missing


def test_a_real_full_disk_is_one_line_and_the_same_command_resumes(table, tmp_path):
    """A workdir on a small tmpfs (where this machine lets the test mount one): the disk
    fills at a checkpoint; one error line, no traceback, the last checkpoint intact; once the
    disk is grown the same command finishes the run with every step logged once."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here (the injected-ENOSPC tests still run)")
    try:
        work = mnt / "run"
        p = _start(work, table, steps=12)
        _, err = p.communicate(timeout=300)
        lines = [x for x in err.splitlines() if x.startswith("onerec: error")]
        assert p.returncode == 2 and len(lines) == 1, err[-3000:]
        assert "MB free, a checkpoint needs" in lines[0] and "Traceback" not in err
        saved = _logged(work)
        assert 0 < saved < 12
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        p = _start(work, table, steps=12)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 13))
    finally:
        subprocess.run(["umount", str(mnt)])


def test_sigkill_at_random_moments_resumes_bit_identical(table, tmp_path):
    """SIGKILL at random wall-clock moments of a run that saves every step (so several land
    inside a save): every restart resumes from the newest complete checkpoint and the loss
    curve equals an uninterrupted run's, bit for bit."""
    steps = 16
    ref = tmp_path / "ref"
    p = _start(ref, table, steps=steps)
    assert p.wait(timeout=300) == 0
    rng = np.random.default_rng(0)
    work = tmp_path / "killed"
    kills = 0
    while kills < 4:
        logged = _logged(work)
        p = _start(work, table, steps=steps)
        _wait_for_step(work, logged + 1, p)  # past start-up: into training and saving
        time.sleep(float(rng.uniform(0.0, 1.5)))
        if p.poll() is not None:
            break  # it finished before the kill
        p.kill()
        p.wait()
        kills += 1
    p = _start(work, table, steps=steps)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]

    def losses(w):
        rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows}

    assert kills >= 2 and losses(work) == losses(ref)
    assert sorted(losses(work)) == list(range(1, steps + 1))
