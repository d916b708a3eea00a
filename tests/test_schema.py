import numpy as np
import pytest

from onerec_jax.data import schema


def _raw(items, ts, flags, request_ts, targets=(7,), play=None, dur=None):
    n = len(items)
    return {
        "user_id": np.array([1]),
        "request_ts": np.array([request_ts]),
        "static": np.array([[1, 2, 3, 4]]),
        "hist_offsets": np.array([0, n]),
        "target_offsets": np.array([0, len(targets)]),
        "hist_item": np.array(items),
        "hist_author": np.array(items) + 100,
        "hist_tag": np.ones(n, int),
        "hist_ts": np.array(ts),
        "hist_play_ms": np.full(n, np.nan) if play is None else np.array(play),
        "hist_dur_ms": np.full(n, np.nan) if dur is None else np.array(dur),
        "hist_flags": np.array(flags, np.uint8),
        "target_item": np.array(targets),
        "target_author": np.zeros(len(targets), int),
        "target_tag": np.zeros(len(targets), int),
        "target_play_ms": np.zeros(len(targets)),
        "target_dur_ms": np.ones(len(targets)),
        "target_flags": np.zeros(len(targets), np.uint8),
    }


def test_bucket_golden_values():
    # The worked example in log_bucket's docstring.
    np.testing.assert_array_equal(
        schema.tdelta_bucket(np.array([0, 59, 60, 180, 86400])), [2, 2, 3, 4, 12]
    )
    np.testing.assert_array_equal(
        schema.time_bucket_ms(np.array([np.nan, 0, 1000, 3000, 1e9])), [1, 2, 4, 6, 31]
    )


def test_pathways_golden():
    spec = schema.SchemaSpec(short_len=3, pos_len=2, life_len=4, max_targets=2)
    L, D = schema.LIKE, schema.DISLIKE
    raw = _raw(
        items=[1, 2, 3, 4, 5],
        ts=[10, 20, 30, 40, 50],
        flags=[L, 0, L, L | D, 0],
        request_ts=50,
        targets=(7, 8, 9),
        play=[0, 950, 0, 0, 0],
        dur=[1000] * 5,
    )
    ex = schema.build_example(raw, spec)
    np.testing.assert_array_equal(ex["short_item"], [5, 4, 3])  # most recent first
    np.testing.assert_array_equal(ex["short_author"], [105, 104, 103])
    # positives: like (1, 3) or play >= 90 % (2); 4 is liked but disliked too.
    np.testing.assert_array_equal(ex["pos_item"], [3, 2])
    np.testing.assert_array_equal(ex["life_item"], [5, 4, 3, 2])
    np.testing.assert_array_equal(ex["life_mask"], [True] * 4)
    np.testing.assert_array_equal(ex["short_tdelta"], [2, 2, 2])  # under a minute
    np.testing.assert_array_equal(ex["target_item"], [7, 8])  # truncated to m
    np.testing.assert_array_equal(ex["target_mask"], [True, True])
    assert ex["static"][1:].tolist() == [1, 2, 3, 4] and 1 <= ex["static"][0] <= spec.user_buckets


def test_padding_stride_and_shapes():
    spec = schema.SchemaSpec(short_len=4, pos_len=4, life_len=3, life_mode="stride")
    raw = _raw(items=list(range(1, 8)), ts=list(range(7)), flags=[0] * 7, request_ts=9)
    ex = schema.build_example(raw, spec)
    np.testing.assert_array_equal(ex["life_item"], [7, 4, 1])  # evenly spaced, newest first
    assert not ex["pos_mask"].any() and (ex["pos_item"] == 0).all()
    np.testing.assert_array_equal(ex["target_mask"], [True] + [False] * 4)
    assert np.isnan(ex["target_play_ms"][1])
    for k, (shape, dt) in spec.shapes().items():
        assert ex[k].shape == shape and ex[k].dtype == dt, k
    empty = schema.build_example(_raw([], [], [], request_ts=5), spec)
    assert not empty["short_mask"].any() and not empty["life_mask"].any()


def test_history_after_request_is_rejected():
    with pytest.raises(ValueError, match="after the request"):
        schema.build_example(_raw([1, 2], [10, 60], [0, 0], request_ts=50), schema.SchemaSpec())


def test_bad_spec():
    with pytest.raises(ValueError, match="life_mode"):
        schema.SchemaSpec(life_mode="kmeans")
    with pytest.raises(ValueError, match="short_len"):
        schema.SchemaSpec(short_len=0)


def test_stride_of_one_keeps_the_most_recent_event():
    spec = schema.SchemaSpec(short_len=2, pos_len=2, life_len=1, life_mode="stride")
    ex = schema.build_example(_raw([4, 5, 6], [1, 2, 3], [0, 0, 0], request_ts=9), spec)
    np.testing.assert_array_equal(ex["life_item"], [6])
