"""Sweeps: points and their names, atomic claims, and a tiny sweep run end to end."""

import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from onerec_jax.tokenizer.semantic_ids import SemanticIds
from scaling import claims as claims_lib
from scaling import results, runner
from scaling import sweep as sweep_lib
from scaling.sweep import Point, Sweep, grid, iso_flop


def test_points_are_named_by_what_varies_and_bad_points_are_refused():
    pts = grid(["v1-0.07m", "v2-0.3m"], [80e3, 1.5e6], seeds=[0, 1])
    names = [p.name for p in pts]
    assert names[:4] == ["v1-0.07m_t80k", "v1-0.07m_t80k_s1", "v1-0.07m_t1.5M", "v1-0.07m_t1.5M_s1"]
    assert {p.family for p in pts} == {"v1", "v2"}
    assert [p.name for p in iso_flop(["v2-1.7m"], [3e12])] == ["v2-1.7m_c3e12"]
    with pytest.raises(ValueError, match="unknown rung 'v3-1m'"):
        Point("v3-1m", tokens=1e3)
    with pytest.raises(ValueError, match="exactly one of tokens and budget"):
        Point("v1-0.07m", tokens=1e3, budget=1e12)
    with pytest.raises(ValueError, match="must be > 0"):
        Point("v1-0.07m", tokens=-5)
    with pytest.raises(ValueError, match=r"points repeat: v1-0\.07m_t1k"):
        Sweep(config="scaling_micro", points=grid(["v1-0.07m"], [1e3, 1e3]))


def test_a_sweep_file_loads_and_a_bad_one_gets_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.py does not exist"):
        sweep_lib.load(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match=r"empty\.py defines no get_sweep"):
        sweep_lib.load(tmp_path / "empty.py")
    demo = sweep_lib.load(pathlib.Path(__file__).parents[1] / "experiments/sweeps/demo.py")
    families = [p.family for p in demo.points]
    assert families.count("v1") >= 6 and families.count("v2") >= 6  # the issue's >= 6 sizes


def test_grid_steps_follow_tokens_and_iso_flop_steps_follow_the_budget():
    sw = Sweep(
        config="scaling_micro",
        points=grid(["v1-0.07m"], [8e3, 16e3]) + iso_flop(["v1-0.07m", "v1-0.6m"], [1e11]),
        min_steps=50,
    )
    resolved, notes = sweep_lib.resolve(sw, (16, 16, 16))
    by = {r.point.name: r for r in resolved}
    t8, t16 = by["v1-0.07m_t8k"], by["v1-0.07m_t16k"]
    assert t16.steps == pytest.approx(2 * t8.steps, abs=1)
    assert t8.planned["tokens_planned"] == pytest.approx(8e3, rel=0.05)
    iso = by["v1-0.07m_c1e11"]
    assert iso.planned["flops_planned"] == pytest.approx(1e11, rel=0.05)
    # The 0.6M rung gets ~1/10 of the steps at the same budget: fewer than min_steps, left out.
    assert "v1-0.6m_c1e11" not in by and "fewer than min_steps 50" in notes[0]
    assert iso.cfg.checkpoint_every == -(-iso.steps // 4) and iso.cfg.eval_every == 0


def test_one_runner_holds_a_claim_and_a_dead_or_silent_holder_is_taken_over(tmp_path):
    d = tmp_path / "claims"
    a, b = claims_lib.Claims(d, "a"), claims_lib.Claims(d, "b")
    assert a.try_claim("p") and not b.try_claim("p")
    assert b.holder("p")["runner"] == "a"
    a.release("p")  # a "released" generation: nothing is deleted while runners work
    assert b.holder("p") is None and json.loads((d / "p.1").read_text())["released"]
    assert b.try_claim("p") and b.holder("p")["runner"] == "b" and (d / "p.2").is_file()
    b.release("p")
    # A claim left by a dead process of this machine is stale at once: taken over.
    dead = subprocess.Popen(["true"])  # a process of this machine that has exited
    dead.wait()
    info = {"runner": "x", "host": a.host, "machine": a.machine, "pid": dead.pid}
    (d / "q.0").write_text(json.dumps(info))
    assert a.try_claim("q") and (d / "q.1").is_file()
    # The same host name on another machine (a container, say): its PIDs mean nothing here,
    # so only a silent heartbeat makes its claim stale.
    (d / "r.0").write_text(json.dumps(info | {"machine": "another boot"}))
    assert not a.try_claim("r")
    old = time.time() - 3600
    os.utime(d / "r.0", (old, old))
    assert a.try_claim("r") and a.holder("r")["runner"] == "a"
    # A live holder of this machine keeps its claim however old its heartbeat (a laptop's
    # sleep, a stopped job): only its death frees the point here.
    alive = subprocess.Popen(["sleep", "30"])
    (d / "s.0").write_text(json.dumps(info | {"pid": alive.pid}))
    os.utime(d / "s.0", (old, old))
    assert not a.try_claim("s")
    alive.kill()
    alive.wait()
    assert a.try_claim("s")
    for c in (a, b):
        c.close()
    assert all(a.holder(n) is None for n in "pqrs")  # close releases what it held
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary file left


def _race(d, name, start, end, q):
    c = claims_lib.Claims(d)
    start.wait()  # all at once
    q.put(c.try_claim(name))
    end.wait()  # every racer still alive (its claim live) until all have tried


def test_runners_racing_for_a_point_get_one_winner(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # not fork: this process runs JAX's threads
    n = 8
    q, start, end = ctx.Queue(), ctx.Barrier(n), ctx.Barrier(n)
    procs = [ctx.Process(target=_race, args=(tmp_path, "p", start, end, q)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert sorted(q.get() for _ in procs) == [False] * (n - 1) + [True]
    assert [p.name for p in tmp_path.iterdir()] == ["p.0"]


SWEEP = """
from scaling.sweep import Sweep, grid

def get_sweep():
    return Sweep(
        name="tiny",
        config="scaling_micro",
        points=grid(["v1-0.07m", "v2-0.09m"], [200]),
        overrides=("batch_size=8", "eval_requests=16", "log_every=1"),
        eval_requests=8,
        beam=4,
    )
"""


def _sweep(tmp_path):
    path = tmp_path / "tiny_sweep.py"
    path.write_text(textwrap.dedent(SWEEP))
    d = tmp_path / "sweep"
    # A random table for world:tiny's 500 items (the tokenizer has its own tests).
    from onerec_jax.tokenizer.semantic_ids import SemanticIds

    codes = np.random.default_rng(0).integers(0, 16, (500, 3))
    SemanticIds.from_codes(codes, (16, 16, 16)).save(d / "tokenizer")
    return sweep_lib.load(path), d


def test_a_sweep_runs_each_point_once_retries_a_failed_one_and_then_finishes_at_once(
    tmp_path, monkeypatch
):
    sw, d = _sweep(tmp_path)
    sw = dataclasses.replace(sw, eval_requests=0)  # no beam search here (its compile is slow)
    real = runner._train_point

    def flaky(r, sweep, sweep_dir):
        if r.point.family == "v2":
            raise RuntimeError("out of memory (simulated)")
        return real(r, sweep, sweep_dir)

    monkeypatch.setattr(runner, "_train_point", flaky)
    assert runner.run(sw, d) == 1  # v1 trains, v2 fails: recorded, its claim released
    assert "out of memory (simulated)" in (d / "failed" / "v2-0.09m_t200.txt").read_text()
    probe = claims_lib.Claims(d / "claims", "probe")
    assert all(probe.holder(p.name) is None for p in sw.points)  # every claim released
    monkeypatch.setattr(runner, "_train_point", real)
    assert runner.run(sw, d) == 0  # the failed point is retried, the finished one skipped
    assert not (d / "failed" / "v2-0.09m_t200.txt").exists()
    rows = results.read_rows(d / "results.jsonl")
    assert sorted(r["point"] for r in rows) == ["v1-0.07m_t200", "v2-0.09m_t200"]
    for r in rows:
        for k in ("n_total", "n_active", "n_non_embedding", "tokens", "flops", "loss",
                  "loss_se", "train_loss_smoothed", "wall_s", "hardware", "repeated_data",
                  "entropy_floor"):  # fmt: skip
            assert r.get(k) is not None, k
        # NLL per item for both families: above the world's floor, and (3 steps in) near a
        # uniform guess over the table's 16^3 code tuples, not a per-level mean (~1/3 of it).
        assert r["entropy_floor"] < r["loss"] and r["loss"] > 3 * np.log(16) * 0.75
        assert (d / "runs" / r["point"] / "tb").is_dir()
        assert 0.5 < r["tokens"] / r["tokens_target"] < 2  # steps from tokens x levels
    v2 = next(r for r in rows if r["family"] == "v2")
    levels = len(SemanticIds.load(d / "tokenizer").vocab)  # 3 + a level telling collisions apart
    assert v2["loss"] == pytest.approx(v2["loss_objective"] * levels)  # its mean over levels
    # A third run trains nothing and adds no row.
    monkeypatch.setattr("onerec_jax.train.loop.train", lambda *a: pytest.fail("trained again"))
    assert runner.run(sw, d) == 0
    assert len(results.read_rows(d / "results.jsonl")) == 2
    # A row file whose append was lost (a runner stopped in between) is appended once.
    lines = (d / "results.jsonl").read_text().splitlines(keepends=True)
    (d / "results.jsonl").write_text(lines[0])
    assert runner.sync_results(d) == 1 and len(results.read_rows(d / "results.jsonl")) == 2
    # A plan written before a config field was added (here unroll_layers) still matches: the
    # new field at its default changes nothing the points trained with.
    plan = json.loads((d / "plan.json").read_text())
    assert all(fields["unroll_layers"] is False for fields in plan.values())
    old = {p: {k: v for k, v in f.items() if k != "unroll_layers"} for p, f in plan.items()}
    (d / "plan.json").write_text(json.dumps(old))
    assert runner.run(sw, d) == 0
    # Speed and memory options a run may change on resume do not make a finished point stale.
    faster = (*sw.overrides, "unroll_layers=True", "remat=dots", "pack_targets=4")
    assert runner.run(dataclasses.replace(sw, overrides=faster), d) == 0
    # The sweep file changed under a finished point: refused, naming the field and the fix.
    changed = dataclasses.replace(sw, overrides=(*sw.overrides, "optim.learning_rate=1e-3"))
    with pytest.raises(ValueError, match=r"v1-0.07m_t200 was planned with other settings "
                       r"\(optim.learning_rate\).*rm -r"):  # fmt: skip
        runner.run(changed, d)


@pytest.mark.slow
def test_dropping_a_changed_points_results_retrains_it_and_replaces_its_row(tmp_path):
    sw, d = _sweep(tmp_path)
    assert runner.run(sw, d) == 0
    old = {r["point"]: r for r in results.read_rows(d / "results.jsonl")}
    for r in old.values():  # scored by beam search: ranking and the world's true engagement
        assert 0 <= r["recall@10"] <= 1 and r["engagement@10"] > 0 and r["ranked_requests"] == 8
    changed = dataclasses.replace(
        sw, overrides=(*sw.overrides, "optim.learning_rate=1e-3"), eval_requests=0
    )
    with pytest.raises(ValueError, match="rm -r"):
        runner.run(changed, d)
    for name in old:  # the fix the message names
        shutil.rmtree(d / "runs" / name)
        (d / "rows" / f"{name}.json").unlink()
    assert runner.run(changed, d) == 0  # retrained at the new rate; the table's rows replaced
    new = {r["point"]: r for r in results.read_rows(d / "results.jsonl")}
    assert sorted(new) == sorted(old) and all(new[k]["loss"] != old[k]["loss"] for k in new)
    cfg = json.loads((d / "runs" / "v1-0.07m_t200" / "config.json").read_text())
    assert cfg["optim"]["learning_rate"] == 1e-3


@pytest.mark.slow
def test_dry_run_compiles_each_rungs_run_config_for_its_memory(tmp_path, capsys):
    from onerec_jax import cli

    _, d = _sweep(tmp_path)
    args = ["sweep", "--sweep", str(tmp_path / "tiny_sweep.py"), "--dir", str(d), "--dry-run"]
    assert cli.main([*args, "--devices", "1", "--device-memory", "1e12", "--json"]) == 0
    plans = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all(p["fits"] and p["per_device_bytes"] > 1e5 and p["mesh"]["fsdp"] == 1 for p in plans)
    assert cli.main([*args, "--devices", "1", "--device-memory", "1e3", "--json"]) == 0
    plans = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert not any(p["fits"] for p in plans)  # 1 kB fits nothing: said, not hidden


def test_print_commands_index_and_dry_run(tmp_path, capsys):
    from onerec_jax import cli

    sw, d = _sweep(tmp_path)
    f = str(tmp_path / "tiny_sweep.py")
    assert cli.main(["sweep", "--sweep", f, "--dir", "rel/dir", "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        f"onerec sweep --sweep {f} --dir {pathlib.Path('rel/dir').resolve()} --point {p.name}"
        for p in sw.points
    ]
    args = ["sweep", "--sweep", f, "--dir", str(d), "--dry-run", "--no-memory", "--json"]
    assert cli.main(args) == 0
    plans = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [p["point"] for p in plans] == [p.name for p in sw.points]
    assert all(p["steps"] >= 1 and p["table"] == "built" and p["flops_planned"] > 0 for p in plans)
    assert not (d / "runs").exists() and not (d / "plan.json").exists()  # nothing written
    assert cli.main(["sweep", "--sweep", f, "--dir", str(d), "--index", "7"]) == 2
    assert "--index 7: sweep has 2 points" in capsys.readouterr().err


def _cli_sweep(sweep_file, d, env=None):
    cmd = [sys.executable, "-m", "onerec_jax.cli", "sweep", "--sweep", str(sweep_file)]
    cmd += ["--dir", str(d)]
    return subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_a_killed_runner_leaves_a_point_the_next_runner_resumes(tmp_path, capfd):
    sw, d = _sweep(tmp_path)
    killed = _cli_sweep(tmp_path / "tiny_sweep.py", d, {"ONEREC_TEST_SIGKILL_AT_STEP": "2"})
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode == -9, out
    name = sw.points[0].name
    assert list((d / "claims").glob(f"{name}.*"))  # the dead runner's claim is left behind
    steps_before = [json.loads(x)["step"] for x in (d / "runs" / name / "metrics.jsonl").open()]
    capfd.readouterr()
    assert runner.run(sw, d) == 0  # the dead holder's claim is stale at once: taken over
    first = next(x for x in capfd.readouterr().err.splitlines() if x.startswith("train: step"))
    assert first != "train: step 1/3", "restarted from step 0 instead of resuming"
    lines = [json.loads(x) for x in (d / "runs" / name / "metrics.jsonl").open()]
    steps = [r["step"] for r in lines if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == max(steps_before + steps)
    summary = json.loads((d / "runs" / name / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert len(results.read_rows(d / "results.jsonl")) == 2
    assert claims_lib.Claims(d / "claims", "probe").holder(name) is None


@pytest.mark.slow
def test_two_runner_processes_train_each_point_exactly_once(tmp_path):
    sw, d = _sweep(tmp_path)
    procs = [_cli_sweep(tmp_path / "tiny_sweep.py", d) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [line.split(":")[1].strip() for o in outs for line in o.splitlines()
               if line.startswith("sweep: ") and " steps x " in line]  # fmt: skip
    assert sorted(trained) == sorted(p.name for p in sw.points)  # each point by one runner
    rows = results.read_rows(d / "results.jsonl")
    assert sorted(r["point"] for r in rows) == sorted(p.name for p in sw.points)
