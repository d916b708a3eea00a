import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onerec_jax.data import logs, movielens


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_round_trip(tmp_path, suffix):
    log = movielens.load()
    path = tmp_path / f"ml.{suffix}"
    logs.write(path, log)
    back = logs.load(path)
    for f in ("offsets", "item", "author", "tag", "ts", "flags", "user_raw", "item_raw"):
        np.testing.assert_array_equal(getattr(back, f), getattr(log, f), err_msg=f)
    np.testing.assert_array_equal(back.play_ms, log.play_ms)


def _write(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


def test_unsorted_rows_are_sorted(tmp_path):
    p = _write(
        tmp_path / "a.parquet",
        user_id=["u1", "u1", "u2", "u1"],
        item_id=[5, 3, 5, 9],
        timestamp=[30, 10, 5, 10],
        duration_ms=[1000.0, 2000.0, 1000.0, None],
        like=[1, 0, 0, 1],
    )
    log = logs.load(p)
    assert log.n_users == 2 and log.n_items == 3
    np.testing.assert_array_equal(log.ts, [10, 10, 30, 5])
    np.testing.assert_array_equal(log.item_raw[log.item], [3, 9, 5, 5])  # ties by item id
    assert np.isnan(log.dur_ms[1]) and log.flags[1] == 1


@pytest.mark.parametrize(
    "cols, needle",
    [
        (dict(user_id=[1], item_id=[2]), "missing required column 'timestamp'"),
        (
            dict(user_id=[1, 2], item_id=[2, 3], timestamp=["10", "abc"]),
            "column 'timestamp' row 1: expected a number",
        ),
        (
            dict(
                user_id=[1, 2, 3],
                item_id=[2, 3, 4],
                timestamp=[1, 2, 3],
                duration_ms=[5.0, 1.0, -3.0],
            ),
            "column 'duration_ms' row 2: negative value",
        ),
        (
            dict(user_id=[1, None], item_id=[2, 3], timestamp=[1, 2]),
            "column 'user_id' row 1: missing value",
        ),
        (
            dict(user_id=[1], item_id=[2], timestamp=[1], like=[2]),
            "column 'like' row 0: expected 0 or 1",
        ),
        (
            dict(user_id=[1], item_id=[2.5], timestamp=[1]),
            "column 'item_id': expected integer or string",
        ),
    ],
)
def test_bad_input_names_file_column_row(tmp_path, cols, needle):
    p = _write(tmp_path / "bad.parquet", **cols)
    with pytest.raises(logs.LogFormatError, match=needle) as e:
        logs.load(p)
    assert str(p) in str(e.value)


def test_empty_files(tmp_path):
    header_only = tmp_path / "h.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(logs.LogFormatError, match="empty file"):
        logs.load(header_only)
    zero = tmp_path / "z.csv"
    zero.write_text("")
    with pytest.raises(logs.LogFormatError, match="empty file"):
        logs.load(zero)
    with pytest.raises(logs.LogFormatError, match="file not found"):
        logs.load(tmp_path / "nope.parquet")
    junk = tmp_path / "j.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(logs.LogFormatError, match="cannot read as Parquet"):
        logs.load(junk)


def test_arrow_timestamps_uint64_ids_and_float_ids_with_nulls(tmp_path):
    ts = pa.array([1_500_000_000_500, 1_500_000_001_000], pa.timestamp("ms"))
    big = pa.array([2**63 + 5, 2**63 + 7], pa.uint64())
    log = logs.load(_write(tmp_path / "t.parquet", user_id=big, item_id=[1, 2], timestamp=ts))
    np.testing.assert_array_equal(log.ts, [1_500_000_000, 1_500_000_001])  # floored to seconds
    assert log.user_raw[1] == 2**63 + 5
    p = _write(
        tmp_path / "f.parquet",
        user_id=[1, 1],
        item_id=[1, 2],
        timestamp=[1, 2],
        author_id=pa.array([1.0, None]),
    )
    with pytest.raises(logs.LogFormatError, match="column 'author_id': expected integer or string"):
        logs.load(p)
