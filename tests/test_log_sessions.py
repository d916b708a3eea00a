"""data.log_session_len: how a logged source's training events become examples."""

from __future__ import annotations

import numpy as np
import pytest

from onerec_jax import config
from onerec_jax.configs import default
from onerec_jax.data import movielens, schema
from onerec_jax.train.run_config import upgrade_config
from onerec_jax.train.state import training_source


def _cfg(*overrides: str):
    return config.resolve(default.get_config(), ["source=movielens-100k", *overrides])


def test_every_prefix_is_one_example():
    log = movielens.load()
    sessions = training_source(_cfg())
    prefixes = training_source(_cfg("data.log_session_len=1"))
    n_ev = np.diff(log.offsets)[1:]
    train_events = int((n_ev - np.where(n_ev >= 3, 2, 0)).sum())
    # One example per training event except each user's first (it has no history).
    assert len(prefixes) == train_events - log.n_users
    raw = prefixes.raw_batch(np.arange(len(prefixes)))
    assert (np.diff(raw["target_offsets"]) == 1).all()
    # Each example's history is every earlier event of its user: it ends right before the target.
    assert (
        prefixes.target_start - log.offsets[prefixes.user] == np.diff(raw["hist_offsets"])
    ).all()
    # Sessions of 5 drop a user's whole first session (no history), prefixes its first event:
    # every session target is a prefix target.
    raw5 = sessions.raw_batch(np.arange(len(sessions)))
    assert np.diff(raw5["target_offsets"]).max() == 5
    at5 = schema.ranges(sessions.target_start, sessions.target_end - sessions.target_start)
    assert np.isin(at5, prefixes.target_start).all() and len(at5) < len(prefixes)


def test_refused_where_it_means_nothing():
    with pytest.raises(config.ConfigError, match="log_session_len must be >= 1"):
        _cfg("data.log_session_len=0")
    with pytest.raises(config.ConfigError, match="logged sources only"):
        config.resolve(default.get_config(), ["data.log_session_len=1"])  # the world


def test_a_run_from_before_the_field_reads_as_sessions_of_five():
    cfg = _cfg().to_dict()
    del cfg["data"]["log_session_len"]
    assert upgrade_config(cfg).data.log_session_len == 5


def test_more_session_events_than_target_slots_is_refused():
    with pytest.raises(config.ConfigError, match=r"exceeds data\.max_targets"):
        _cfg("data.max_targets=3")
    _cfg("data.max_targets=3", "data.log_session_len=3")


def test_a_sweep_plans_with_the_sessions_its_runs_train_on():
    from scaling import sweep

    one = sweep._train_source(_cfg("data.log_session_len=1", "data.max_targets=1"))
    five = sweep._train_source(_cfg())
    assert len(one) > 4 * len(five) // 2  # ~97k prefixes against ~20k sessions
    assert (one.target_end - one.target_start == 1).all()
