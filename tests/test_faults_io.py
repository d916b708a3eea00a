"""The fault suite, inputs and outputs: timestamps in other units or out of range, TensorBoard
after a replay, data workers orphaned by a killed trainer, an eval JSON that cannot be written
or would replace another request count's, a checkpoint that cannot fit (issue 17)."""

from __future__ import annotations

import errno
import json
import pathlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onerec_jax import cli, evaluate, monitor
from onerec_jax.data import logs

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- timestamps


def _log(path, ts):
    n = len(ts)
    table = pa.table(
        {"user_id": [1 + i % 3 for i in range(n)], "item_id": list(range(n)), "timestamp": ts}
    )
    pq.write_table(table, path)
    return path


def test_millisecond_timestamps_are_detected_and_read_as_seconds(tmp_path):
    secs = [1_700_000_000 + 60 * i for i in range(12)]
    want = logs.load(_log(tmp_path / "s.parquet", secs))
    with pytest.warns(UserWarning, match="reads as milliseconds since the epoch"):
        got = logs.load(_log(tmp_path / "ms.parquet", [s * 1000 + 7 for s in secs]))
    np.testing.assert_array_equal(got.ts, want.ts)
    with pytest.warns(UserWarning, match="nanoseconds"):
        logs.load(_log(tmp_path / "ns.parquet", [s * 10**9 for s in secs]))


def test_timestamps_beyond_int64_or_of_mixed_units_are_refused_naming_the_row(tmp_path):
    ts = [1_700_000_000.0] * 5 + [2.0**64]
    with pytest.raises(logs.LogFormatError, match=r"row 5: .* is beyond any time unit"):
        logs.load(_log(tmp_path / "big.parquet", ts))
    ts = [1_700_000_000.0] * 5 + [1_700_000_000_000.0, 1_700_000_100.0]  # one stray in ms
    with pytest.raises(logs.LogFormatError, match=r"row 5: .* milliseconds .* as seconds"):
        logs.load(_log(tmp_path / "mixed.parquet", ts))


# ----------------------------------------------------------------------------- TensorBoard


def _tb_steps(logdir: pathlib.Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(logdir.glob("*tfevents*")):
        steps += [e.step for e in EventFileLoader(str(f)).Load() if e.summary.value]
    return steps


def test_replayed_steps_appear_once_in_tensorboard(tmp_path):
    w = monitor.MetricWriter(tmp_path)
    for s in range(1, 8):  # a run killed after step 7, whose last checkpoint is step 4
        w.scalars(s, {"train/loss": 1.0 / s})
    w.close()
    files = list(tmp_path.glob("*tfevents*"))
    files[0].write_bytes(files[0].read_bytes()[:-5])  # and its last record torn
    monitor.drop_events_after(tmp_path, 4)
    w = monitor.MetricWriter(tmp_path)  # the resumed run replays 5..7
    for s in range(5, 8):
        w.scalars(s, {"train/loss": 1.0 / s})
    w.close()
    assert sorted(_tb_steps(tmp_path)) == list(range(1, 8))


# ----------------------------------------------------------------------------- grain workers


def test_data_workers_exit_when_their_trainer_is_killed(tmp_path):
    code = textwrap.dedent(
        """
        import os, sys, time
        from onerec_jax.data import pipeline, sources
        src = sources.open_source("world:tiny", split="train")
        from onerec_jax.train.batches import schema_spec
        from onerec_jax import config
        cfg = config.resolve(config.load("experiments/v1_world_tiny.py"))
        ds = pipeline.make_dataset(src, schema_spec(cfg), pipeline.PipelineConfig(
            batch_size=4, workers=1))
        next(iter(ds))
        print("ready", flush=True)
        time.sleep(120)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "ready"

    def children(pid: int) -> list[int]:
        out = []
        for d in pathlib.Path("/proc").iterdir():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if d.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        return out

    workers = children(p.pid)
    assert workers, "the pipeline started no worker process"
    p.kill()  # SIGKILL: the trainer cannot stop its workers itself
    p.wait()
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.25)
        alive = [
            w
            for w in workers
            if pathlib.Path(f"/proc/{w}").exists()
            and "Z" not in (pathlib.Path(f"/proc/{w}/stat").read_text().split()[2:3] or [""])
        ]
    assert not alive, f"workers {alive} outlived their trainer"


def test_a_checkpoint_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import collections

    import grain
    import jax.numpy as jnp

    from onerec_jax.train import checkpointing

    ckpt = checkpointing.Checkpoints(tmp_path / "ckpt")
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt.save(1, {"w": jnp.ones((1000,))}, data, {"step": 1})
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage(10**6, 10**6, 100))
    with pytest.raises(OSError, match=r"0.0 MB free, a checkpoint needs about .*step 1, is intact"):
        ckpt.save(2, {"w": jnp.ones((1000,))}, data, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]
    ckpt.close()


def test_eval_prints_its_metrics_before_a_failed_write(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    metrics = {"split": "test", "beam": 4, "n_requests": 4, "recall@10": 0.5}
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: dict(metrics))

    def read_only(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(evaluate, "write_atomic", read_only)
    argv = ["eval", "--workdir", str(tmp_path), "--max-requests", "4", "--beam", "4", "--json"]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == metrics  # printed first
    line = [x for x in err.splitlines() if x.startswith("onerec: error")]
    assert len(line) == 1 and "eval_test_n4_beam4.json: could not write" in line[0]


def test_evaluations_of_other_request_counts_do_not_replace_each_other(tmp_path):
    full = evaluate.eval_path(tmp_path, "test", None, evaluate.DEFAULT_BEAM)
    look = evaluate.eval_path(tmp_path, "test", 8, 8)
    assert full.name == "eval_test.json" and look.name == "eval_test_n8_beam8.json"
    assert evaluate.eval_path(tmp_path, "test", None, 32).name == "eval_test_nall_beam32.json"
