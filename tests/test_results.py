"""The sweep's results table (scaling/results.py): whole rows under concurrent appends, torn
tails cut off, NaN refused, a row per finished run, Parquet export."""

import json
import multiprocessing

import pytest

from scaling import fit, results


def _writer(path: str, who: int, n: int) -> None:
    for i in range(n):
        results.append_row(path, {"who": who, "i": i, "pad": "x" * 5000})  # > one page


def test_concurrent_appends_keep_every_row_whole(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = results.read_rows(path)
    assert sorted((r["who"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(40)]


def test_a_torn_tail_is_skipped_on_read_and_cut_on_the_next_append(tmp_path):
    path = tmp_path / "results.jsonl"
    results.append_row(path, {"run": 1, "loss": 3.0})
    with path.open("a") as f:
        f.write('{"run": 2, "lo')  # a writer killed mid-row
    with pytest.warns(UserWarning, match="torn last line"):
        assert results.read_rows(path) == [{"loss": 3.0, "run": 1}]
    results.append_row(path, {"run": 3, "loss": 2.5})
    assert [r["run"] for r in results.read_rows(path)] == [1, 3]
    with pytest.raises(ValueError, match="Out of range float"):
        results.append_row(path, {"run": 4, "loss": float("nan")})
    assert [r["run"] for r in results.read_rows(path)] == [1, 3]  # nothing half-written
    path.write_text('{"run": 1}\nnot json\n{"run": 2}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON row"):
        results.read_rows(path)


def test_append_missing_adds_each_key_once(tmp_path):
    path = tmp_path / "results.jsonl"
    assert results.append_missing(path, [{"point": "a", "loss": 1.0}], key="point") == 1
    rows = [{"point": "a", "loss": 9.0}, {"point": "b", "loss": 2.0}]
    assert results.append_missing(path, rows, key="point") == 1
    assert results.read_rows(path) == [{"point": "a", "loss": 1.0}, {"point": "b", "loss": 2.0}]


def test_sync_table_mirrors_the_rows_and_rewrites_only_when_one_changed(tmp_path):
    path = tmp_path / "results.jsonl"
    a, b, c = ({"point": k, "loss": v} for k, v in (("a", 1.0), ("b", 2.0), ("c", 3.0)))
    assert results.sync_table(path, [a, b], key="point") == 2  # appended
    inode = path.stat().st_ino
    assert results.sync_table(path, [a, b, c], key="point") == 1
    assert path.stat().st_ino == inode  # only appends: the file is the same
    # b re-run with a new loss, c's results dropped: the table is replaced whole.
    assert results.sync_table(path, [a, {"point": "b", "loss": 2.5}], key="point") == 2
    assert results.read_rows(path) == [a, {"point": "b", "loss": 2.5}]
    assert path.stat().st_ino != inode
    results.append_row(path, c)  # appends after a replace go to the new table
    assert [r["point"] for r in results.read_rows(path)] == ["a", "b", "c"]


def _fake_run(workdir, status="finished", family="v2", mode="mean"):
    workdir.mkdir()
    model = {"family": family, family: {"loss": mode}}
    (workdir / "config.json").write_text(json.dumps({"model": model}))
    summary = {
        "status": status, "rung": "v2-0.3m", "params_total": 2_000_000, "params_active": 1_500_000,
        "params_embedding": 1_200_000, "params_non_embedding": 800_000, "tokens_seen": 3e6,
        "samples_seen": 64_000, "flops_seen": 4e13, "step": 1000, "final_train_loss": 3.2,
        "final_eval_loss": 3.4, "final_eval_loss_se": 0.02, "wall_s_total": 120.0,
        "data_passes": 1.3, "vocab": [128, 128, 128, 4],
    }  # fmt: skip
    (workdir / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": s, "train/loss": 4.0 - s / 1000} for s in range(1, 1001, 10)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return workdir


def test_a_finished_run_makes_a_row_a_fit_can_read_and_parquet_keeps(tmp_path):
    row = results.run_row(_fake_run(tmp_path / "a"), {"recall@10": 0.1}, family="v2")
    assert row["family"] == "v2" and row["recall@10"] == 0.1 and row["rung"] == "v2-0.3m"
    assert row["n_active"] == 300_000  # active minus embedding parameters: the fits' N
    assert row["repeated_data"] is True and row["tokens"] == 3e6
    # A mean over the 4 levels becomes NLL per item: x 4, the objective kept beside it.
    assert row["loss"] == pytest.approx(13.6) and row["loss_objective"] == 3.4
    assert row["loss_se"] == pytest.approx(0.08) and row["train_loss"] == pytest.approx(12.8)
    # The last 10 % of the 100 logged losses: steps 901 ... 991.
    assert row["train_loss_smoothed"] == pytest.approx(4 * (4.0 - 0.946))
    summed = results.run_row(_fake_run(tmp_path / "v1", family="v1", mode="sum"))
    assert summed["loss"] == 3.4 and summed["train_loss"] == 3.2  # a sum is per item already
    assert set(fit.columns([row], ["n_active", "tokens", "flops", "loss"])) == {
        "n_active", "tokens", "flops", "loss"
    }  # fmt: skip
    import pyarrow.parquet as pq

    out = results.to_parquet([row, {**row, "family": "v1", "recall@10": None}], tmp_path / "t.pq")
    back = pq.read_table(out).to_pylist()
    assert [r["family"] for r in back] == ["v2", "v1"] and back[0]["n_active"] == 300_000
    with pytest.raises(ValueError, match="status 'preempted', not a finished run"):
        results.run_row(_fake_run(tmp_path / "b", status="preempted"))
    with pytest.raises(FileNotFoundError, match="has no summary"):
        results.run_row(tmp_path / "none")
