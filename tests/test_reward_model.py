"""The P-Score reward model: labels, AUC and the fused score by hand; save/load round trip;
(slow) fit on a run's logged feedback, then used by `onerec align`."""

from __future__ import annotations

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import tiny_encoder

from onerec_jax import cli, feedback
from onerec_jax.data import schema, sources
from onerec_jax.rl import reward_model as rm


def test_labels_by_hand():
    batch = {
        "target_play_ms": np.asarray([[15e3, 90e3, np.nan]], np.float32),
        "target_dur_ms": np.asarray([[30e3, 60e3, 10e3]], np.float32),
        "target_flags": np.asarray([[schema.LIKE | schema.SHARE, schema.DISLIKE, 0]], np.uint8),
    }
    y, known = rm.labels(batch)
    np.testing.assert_allclose(y[0, :2, 0], [0.5, 1.0])  # play share, capped at 1
    # an unknown play time is left out of the play label (not taken as 0); flags always known
    assert known[0, :, 0].tolist() == [True, True, False] and known[0, :, 1:].all()
    assert y[0, 0, 1:].tolist() == [1, 0, 0, 1, 0]  # like, follow, comment, share, dislike
    assert y[0, 1, 1:].tolist() == [0, 0, 0, 0, 1]


def test_logged_reward_by_hand():
    w = dict(zip(rm.LABELS, rm.WEIGHTS.tolist(), strict=True))
    batch = {  # one request logging items 5, 7, 5 again and a pad slot
        "target_item": np.asarray([[5, 7, 5, 9]]),
        "target_mask": np.asarray([[True, True, True, False]]),
        "target_play_ms": np.asarray([[15e3, np.nan, 30e3, 30e3]], np.float32),
        "target_dur_ms": np.asarray([[30e3, 60e3, 30e3, 30e3]], np.float32),
        "target_flags": np.asarray([[schema.LIKE, schema.DISLIKE, 0, schema.SHARE]], np.uint8),
    }
    v = feedback.logged_value(batch)[0]
    # play share 0.5 and a like; unknown play left out and a dislike; a whole play; padding
    np.testing.assert_allclose(v, [0.5 * w["play_frac"] + w["like"], w["dislike"], 1.0, 0.0])
    r = feedback.logged_reward(batch, np.asarray([[5, 7, 9, 3, 0]]), miss=-0.25)[0]
    # item 5 logged twice: the mean of its exposures; 9 sits only in a pad slot: a miss
    want = [(v[0] + v[2]) / 2, w["dislike"], -0.25, -0.25]
    np.testing.assert_allclose(r[:4], want, rtol=1e-6)
    assert np.isnan(r[4])  # no item


def test_auc_equals_the_share_of_ordered_pairs():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pairs = [(a, b) for a, b in itertools.product(s[y], s[~y])]
    want = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert rm.auc(s, y) == pytest.approx(want)
    assert np.isnan(rm.auc(s, np.zeros(60, bool)))


def test_fused_score_weighs_probabilities_like_the_true_reward():
    logits = jnp.zeros((1, 1, 6))  # every probability 1/2
    assert float(rm.fused(logits)[0, 0]) == pytest.approx(0.5 * rm.WEIGHTS.sum())


def test_save_and_load_round_trip(tmp_path):
    spec = schema.SchemaSpec(pos_len=8, life_len=16)
    src = sources.open_source("world:tiny")
    b = schema.build_batch(src.raw_batch(np.arange(2), spec.history_window, spec), spec)
    model = rm.PScore(rm.PScoreConfig(tiny_encoder(src, 8, 16), hidden=16))
    x = {k: jnp.asarray(v) for k, v in rm._inputs(b).items()}
    items = jnp.asarray(b["target_item"])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x, items))["params"]
    rm.save(tmp_path / "rm", model, params, {"note": "x"})
    model2, params2, meta = rm.load(tmp_path / "rm")
    assert meta["note"] == "x" and model2.cfg == model.cfg
    apply = jax.jit(model.apply)  # model2 == model (checked above): one compile
    np.testing.assert_array_equal(
        apply({"params": params}, x, items), apply({"params": params2}, x, items)
    )
    with pytest.raises(FileNotFoundError, match="no reward model here"):
        rm.load(tmp_path)


@pytest.mark.slow
def test_fit_then_align_against_it(tmp_path, capsys):
    pre, out, work = tmp_path / "pre", tmp_path / "rm", tmp_path / "aligned"
    train = ["--config.steps=10", "--config.eval_requests=0", "--config.checkpoint_every=10"]
    assert cli.main(["train", "--config", "default", "--workdir", str(pre), *train]) == 0
    fit = ["reward-model", "--init", str(pre), "--out", str(out), "--steps", "20"]
    assert cli.main([*fit, "--eval-requests", "64"]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    json.dumps(meta, allow_nan=False)  # strict JSON: no NaN for a label without signal
    for name in rm.LABELS:
        if name not in meta["eval"]["labels_without_signal"]:
            assert 0.0 <= meta["eval"][f"auc/{name}"] <= 1.0
            assert meta["eval"][f"calibration/{name}"] > 0
    assert -1.0 <= meta["eval"]["corr_true_reward/logged"] <= 1.0
    assert cli.main(fit) == 2  # never overwritten without --overwrite
    assert "holds a reward model already" in capsys.readouterr().err
    args = ["align", "--method", "gbpo", "--init", str(pre), "--workdir", str(work)]
    args += ["--config.steps=2", "--config.batch_size=4", "--config.group=4"]
    args += ["--config.eval_requests=8", "--config.eval_beam=8", "--config.reward=model"]
    assert cli.main([*args, f"--config.reward_model={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"reward_model@10", "engagement@10"} <= set(summary["after"])
