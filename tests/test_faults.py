"""The fault suite, fast cases: torn and broken run files, signals, the workdir lock, another
semantic-id table, corrupt checkpoints, bad arguments and timestamps, TensorBoard replays and
orphaned data workers. Each reproduces a fault of issue 17 on the code before its fix. The
cases that need a trained run are in test_faults_run.py."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onerec_jax import atomic, cli, evaluate
from onerec_jax import config as config_lib
from onerec_jax.data import logs
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import checkpointing, run_config, run_log, state
from onerec_jax.train.loop import Preemption
from onerec_jax.train.workdir_lock import WorkdirBusyError, workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rows(n: int) -> str:
    return "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, n + 1))


# ----------------------------------------------------------------------------- metrics.jsonl


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(4) + '{"step": 5, "train/lo')  # disk full mid-line
    with pytest.warns(UserWarning, match="metrics.jsonl: its last line is torn"):
        run_log.truncate_metrics(path, 4)
    assert path.read_text() == _rows(4)  # the history kept, the torn tail gone
    path.write_text(_rows(4) + "{garbage\n")  # cut, then a newline: still the last line
    with pytest.warns(UserWarning, match="torn"):
        rows, torn = run_log.read_metrics(path)
    assert torn and [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_broken_line_before_the_last_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(2) + "not json\n" + _rows(3))
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a metrics line"):
        run_log.truncate_metrics(path, 10)


def test_resume_never_empties_metrics_on_a_kill_during_the_rewrite(tmp_path, monkeypatch):
    """The rewrite goes through a temporary file: a kill while it is written leaves the old
    file whole; a start with nothing to drop does not rewrite at all."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(6))
    inode = path.stat().st_ino
    run_log.truncate_metrics(path, 6)
    assert path.stat().st_ino == inode  # untouched

    def killed(p, data):  # the process dies while the new file is half written
        pathlib.Path(p).with_name(".half").write_text(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(run_log, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        run_log.truncate_metrics(path, 3)
    assert path.read_text() == _rows(6)


def test_a_full_disk_while_appending_metrics_is_one_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "open", full)
    with pytest.raises(OSError, match=r"metrics.jsonl: could not append metrics \(No space"):
        run_log.append_metrics(path, {"step": 1, "train/loss": 2.0})
    monkeypatch.undo()
    # NaN is not JSON: a value that is not finite (no standard error of one request) is null
    run_log.append_metrics(path, {"step": 1, "eval/loss_se": float("nan"), "x": 2.0})
    assert json.loads(path.read_text()) == {"step": 1, "eval/loss_se": None, "x": 2.0}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=200), st.integers(0, 400))
def test_any_damage_to_metrics_reads_or_fails_naming_the_file(tmp_path, junk, cut):
    """Random bytes appended to, or a random cut of, a good file: the rows before the damage
    or one error naming the file, never another exception."""
    path = tmp_path / "metrics.jsonl"
    good = _rows(5).encode()
    path.write_bytes(good[:cut] + junk)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn tail's warning
            rows, _ = run_log.read_metrics(path)
    except ValueError as e:
        assert "metrics.jsonl" in str(e)
        return
    assert all(isinstance(r["step"], int) for r in rows)


# ----------------------------------------------------------------------------- signals


def test_ctrl_c_asks_for_a_save_and_a_second_one_interrupts():
    # The handler before is pinned to Python's own (as under the CLI): a test worker process
    # may hold another one (once seen under pytest-xdist: SIGINT ignored, cause not found).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Preemption() as p:
            os.kill(os.getpid(), signal.SIGINT)
            assert p.requested and p.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the old handler is back: Python's
                time.sleep(0.1)
            p.acted = True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_late_sigterm_under_the_default_handler_lets_the_finished_run_return():
    """A SIGTERM during the final save (after the loop read the flag) under the CLI, whose
    SIGTERM handler is the default: the run is finished and saved, so it returns (exit 0)
    instead of being killed with no summary."""
    code = textwrap.dedent(
        """
        import os, signal
        from onerec_jax.train.loop import Preemption
        with Preemption():
            os.kill(os.getpid(), signal.SIGTERM)
        print("returned")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "returned" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- the lock


def _hold_lock(workdir: pathlib.Path) -> subprocess.Popen:
    code = (
        "import pathlib, sys, time\n"
        "from onerec_jax.train.workdir_lock import workdir_lock\n"
        "with workdir_lock(pathlib.Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_runner_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(
    tmp_path, monkeypatch
):
    work = tmp_path / "run"
    holder = _hold_lock(work)
    try:
        with pytest.raises(WorkdirBusyError, match=f"in use by another run \\(pid {holder.pid} "):
            with workdir_lock(work):
                pass
        # the CLI: one line, exit 2, before anything is read or written
        argv = ["train", "--config", "experiments/v1_world_tiny.py", "--workdir", str(work)]
        monkeypatch.chdir(ROOT)
        assert cli.main(argv) == 2
        assert not (work / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the flock
        holder.wait()
    with workdir_lock(work):
        assert f"pid {os.getpid()} " in (work / ".lock").read_text()


# ----------------------------------------------------------------------------- the table


def _table(seed: int = 0, n: int = 40, vocab=(8, 8, 8)) -> SemanticIds:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, n) for k in vocab], 1)
    return SemanticIds.from_codes(codes, vocab)


def test_another_table_of_the_same_shape_is_refused(tmp_path):
    table = _table()
    state.record_table(tmp_path, table, tmp_path / "tok")
    state.check_table(tmp_path, table, tmp_path / "tok")  # the same table: fine
    body = table.codes[1:]
    perm = body[np.random.default_rng(1).permutation(len(body))]  # codes permuted over items
    other = SemanticIds.from_codes(perm, table.vocab)
    assert other.fingerprint() != table.fingerprint()
    with pytest.raises(ValueError, match=r"not the semantic-id table this run was trained with"):
        state.check_table(tmp_path, other, tmp_path / "tok")
    wider = _table(vocab=(16, 8, 8))
    with pytest.raises(ValueError, match=r"vocab \(16, 8, 8\).*the run's: vocab \(8, 8, 8\)"):
        state.check_table(tmp_path, wider, tmp_path / "tok")
    (tmp_path / "table.json").write_text("{")  # a damaged record: one line naming it
    with pytest.raises(ValueError, match=r"table.json: unreadable"):
        state.check_table(tmp_path, table, tmp_path / "tok")


# ----------------------------------------------------------------------------- checkpoints


def _saved_checkpoints(directory: pathlib.Path, steps) -> checkpointing.Checkpoints:
    ckpt = checkpointing.Checkpoints(directory)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    for s in steps:
        next(data)
        ckpt.save(s, {"w": jnp.full((4,), float(s))}, data, {"step": s})
    return ckpt


def _damage(step_dir: pathlib.Path) -> None:
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file())
    for f in files:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])  # truncated


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    ckpt = _saved_checkpoints(tmp_path / "ckpt", (1, 2, 3))
    _damage(tmp_path / "ckpt" / "3")
    target = {"w": jnp.zeros((4,))}
    with pytest.warns(UserWarning, match=r"ckpt/3: checkpoint unreadable .*moved to 3.corrupt"):
        step, st = ckpt.restore_newest(lambda s: ckpt.restore_state(s, target))
    assert step == 2 and float(st["w"][0]) == 2.0
    assert (tmp_path / "ckpt" / "3.corrupt").is_dir()  # kept for a look, never deleted
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt.save(3, {"w": jnp.full((4,), 3.5)}, data, {"step": 3})  # the name is free again
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_reading_falls_back_without_moving_and_none_intact_is_one_error(tmp_path):
    ckpt = _saved_checkpoints(tmp_path / "ckpt", (1, 2))
    _damage(tmp_path / "ckpt" / "2")
    # Without its file list (an older checkpoint), the failed restore itself tells.
    (tmp_path / "ckpt" / "2" / checkpointing.FILE_LIST).unlink()
    target = {"w": jnp.zeros((4,))}
    with pytest.warns(UserWarning, match="checkpoint unreadable"):
        step, _ = ckpt.restore_newest(lambda s: ckpt.restore_state(s, target), move_aside=False)
    assert step == 1 and (tmp_path / "ckpt" / "2").is_dir()
    _damage(tmp_path / "ckpt" / "1")
    with pytest.raises(ValueError, match=r"no checkpoint restores \(step 2: .*; step 1: .*has"):
        ckpt.restore_newest(lambda s: ckpt.restore_state(s, target))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]  # nothing moved
    ckpt.close()


def test_only_a_training_resume_needs_the_process_count_it_was_saved_with(tmp_path):
    ckpt = _saved_checkpoints(tmp_path / "ckpt", (1,))
    data = tmp_path / "ckpt" / "1" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # as if 2 hosts
    (tmp_path / "ckpt" / "1" / checkpointing.FILE_LIST).unlink()  # (its list names the old)
    target = {"w": jnp.zeros((4,))}
    step, _ = ckpt.restore_newest(lambda s: ckpt.restore_state(s, target))  # eval: any count
    assert step == 1
    with pytest.raises(ValueError, match=r"saved by 2 process\(es\); resume it with 2"):
        ckpt.restore_newest(lambda s: ckpt.restore_state(s, target), check_processes=True)
    ckpt.close()


def test_a_failed_start_gives_way_to_the_corrected_config_but_a_finished_run_does_not(
    tmp_path,
):
    base = config_lib.load(str(ROOT / "experiments/v1_world_tiny.py"))
    first = config_lib.resolve(base, ["model.v1.n_heads=3"])
    fixed = config_lib.resolve(base, [])
    run_config.check_workdir_config(first, tmp_path)  # the first start wrote its config
    (tmp_path / "table.json").write_text("{}")  # and its table's fingerprint
    with pytest.warns(UserWarning, match=r"saved no checkpoint; .*model.v1.n_heads"):
        run_config.check_workdir_config(fixed, tmp_path)
    assert run_config.load_run_config(tmp_path).model.v1.n_heads == fixed.model.v1.n_heads
    assert (tmp_path / "table.json").exists()  # the table fields did not change: kept
    other = config_lib.resolve(base, ["world_seed=7"])  # another table: its record moves
    with pytest.warns(UserWarning, match=r"table.json: made for .*moved to table.json.replaced"):
        run_config.check_workdir_config(other, tmp_path)
    (tmp_path / "summary.json").write_text("{}")  # a run that finished (checkpoints pruned)
    with pytest.raises(ValueError, match="holds a run with a different config"):
        run_config.check_workdir_config(fixed, tmp_path)


# ----------------------------------------------------------------------------- run files


@pytest.mark.parametrize(
    "content", [b"", b"\x89PNG\r\n\x1a\n\x00\xff", b"[1, 2]", b"null", b'{"seed": "x"']
)
def test_a_garbage_config_json_is_one_error_naming_it(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"config.json: not a run config this version can read"):
        run_config.load_run_config(tmp_path)


def test_a_summary_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "summary.json").write_text('{"status": "finished"}')

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", lambda fd: full(fd, b""))
    with pytest.raises(OSError):
        atomic.write_atomic(tmp_path / "summary.json", "{}")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "finished"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"beam": 0}, "beam must be >= 1"),
        ({"beam": -3}, "beam must be >= 1"),
        ({"max_requests": -5}, "max_requests must be >= 1"),
        ({"max_requests": 0}, "max_requests must be >= 1"),
    ],
)
def test_bad_eval_arguments_are_refused_first(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate_run(tmp_path / "nothing", "test", **kw)


def test_bad_plan_items_and_zero_steps_are_refused(capsys):
    assert cli.main(["plan", "--rung", "v1-0.015b", "--items", "-5"]) == 2
    assert "--items must be >= 1" in capsys.readouterr().err
    base = config_lib.load(str(ROOT / "experiments/v1_world_tiny.py"))
    with pytest.raises(config_lib.ConfigError, match="steps must be >= 1"):
        config_lib.resolve(base, ["steps=0"])


# ----------------------------------------------------------------------------- random damage

_GOOD_CSV = "user_id,item_id,timestamp,like\n" + "".join(
    f"{1 + i % 4},{10 + i},{1_700_000_000 + 60 * i},{i % 2}\n" for i in range(24)
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(0, len(_GOOD_CSV)),
    st.binary(max_size=60),
    st.sampled_from(["log", "npz", "config"]),
)
def test_damaged_logs_tables_and_configs_load_or_fail_naming_the_file(tmp_path, cut, junk, kind):
    """A good file cut at a random byte with random bytes appended: it loads (a valid prefix)
    or fails with the module's own error naming the file, never another exception."""
    if kind == "log":
        path = tmp_path / "log.csv"
        path.write_bytes(_GOOD_CSV.encode()[:cut] + junk)
        try:
            logs.load(path)
        except logs.LogFormatError as e:
            assert str(path) in str(e)
    elif kind == "config":
        good = config_lib.resolve(config_lib.load(str(ROOT / "experiments/v1_world_tiny.py")))
        text = good.to_json(indent=2).encode()
        (tmp_path / "config.json").write_bytes(text[: cut * len(text) // len(_GOOD_CSV)] + junk)
        try:
            run_config.load_run_config(tmp_path)
        except ValueError as e:
            assert "config.json" in str(e)
    else:
        _table().save(tmp_path / "tok")
        path = tmp_path / "tok" / "semantic_ids.npz"
        good = path.read_bytes()
        path.write_bytes(good[: cut * len(good) // len(_GOOD_CSV)] + junk)
        try:
            SemanticIds.load(tmp_path / "tok")
        except ValueError as e:  # SemanticIdError
            assert "semantic_ids.npz" in str(e) or str(tmp_path / "tok") in str(e)
