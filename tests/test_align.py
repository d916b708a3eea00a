"""`onerec align`: config checks before anything is written, and (slow) a short alignment run
end to end: it resumes where it stopped and its workdir evaluates like a training run's."""

from __future__ import annotations

import json

import pytest

from onerec_jax import cli
from onerec_jax.rl import align_config


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("group", 1, "group must be >= 2"),
        ("rollout", "greedy", "rollout='greedy'"),
        ("reward", "clicks", "reward='clicks'"),
        ("checkpoint_every", 5, "multiple of refresh"),
        ("trie", False, "needs rollout='sample'"),
        ("temperature", 0.0, "temperature must be > 0"),
        ("advantage", "rank", "advantage='rank'"),
        ("dpo_share", 0.0, "dpo_share must be in"),
        ("objective", "revenue", "objective='revenue'"),
    ],
)
def test_bad_align_fields_are_refused_by_name(field, value, message):
    c = align_config.get_config()
    c.refresh = 2 if field == "checkpoint_every" else 1
    c[field] = value
    with pytest.raises(ValueError, match=message):
        align_config.check(c)


def test_gmv_objective_needs_rollouts_scored_by_the_world_or_a_model():
    for field, value in (("reward", "logged"), ("method", "rsft")):
        c = align_config.get_config()
        c.objective, c[field] = "gmv", value
        with pytest.raises(ValueError, match="objective='gmv'"):
            align_config.check(c)


def test_align_cli_refuses_bad_input_before_writing(tmp_path, capsys):
    """An unknown method, an unknown field and a missing init each give one error line, and
    the workdir is not created."""
    work = tmp_path / "aligned"
    argv = ["align", "--init", str(tmp_path / "nothing"), "--workdir", str(work)]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--method", "ppo"])
    assert cli.main([*argv, "--method", "ecpo", "--config.nope=1"]) == 2
    assert "unknown config field 'nope'" in capsys.readouterr().err
    assert cli.main([*argv, "--method", "ecpo"]) == 2
    assert "no run here" in capsys.readouterr().err
    assert not work.exists()


def test_align_help_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["align", "--help"])
    out = capsys.readouterr().out
    for name in align_config.METHODS:
        assert f"  {name} " in out


@pytest.mark.slow
def test_short_alignment_runs_resumes_and_evaluates(tmp_path, capsys):
    pre, work = tmp_path / "pre", tmp_path / "aligned"
    train = ["--config.steps=20", "--config.eval_requests=0", "--config.checkpoint_every=20"]
    assert cli.main(["train", "--config", "default", "--workdir", str(pre), *train]) == 0
    args = ["align", "--method", "ecpo", "--init", str(pre), "--workdir", str(work)]
    common = ["--config.batch_size=4", "--config.group=4", "--config.checkpoint_every=2"]
    common += ["--config.log_every=1", "--config.eval_requests=8", "--config.eval_beam=8"]
    assert cli.main([*args, *common, "--config.steps=2"]) == 0
    capsys.readouterr()
    assert cli.main([*args, *common, "--config.steps=4"]) == 0  # resumes at step 2
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["align/legal_rate"] == 1.0  # beam rollouts name real items
        assert abs(r["align/ratio"] - 1.0) < 1e-3  # refresh 1: on-policy at each update
    assert {"engagement@10", "recall@10"} <= set(summary["before"]) & set(summary["after"])
    # Another method in the same workdir is refused, nothing lost.
    other = ["align", "--method", "gppo", "--init", str(pre), "--workdir", str(work)]
    assert cli.main([*other, *common, "--config.steps=4"]) == 2
    assert "another config" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(work), "--max-requests", "8", "--beam", "8"]) == 0


def test_alignment_learning_rate_is_constant_after_a_warmup_that_starts_above_zero():
    """The first update already moves the parameters, and the rate depends on the update count
    alone (a resumed or extended run steps as an uninterrupted one)."""
    import jax.numpy as jnp
    import ml_collections

    from onerec_jax.rl.align import optimizer

    pre = ml_collections.ConfigDict({"optim": {"clip_norm": 1.0, "moment_dtype": "float32"}})
    for warmup, want in ((0, [1.0, 1.0, 1.0]), (2, [0.5, 1.0, 1.0])):
        a = align_config.get_config()
        a.learning_rate, a.warmup_steps = 1.0, warmup
        tx = optimizer(pre, a)
        params = {"kernel": jnp.zeros(())}
        state = tx.init(params)
        moves = []
        for _ in range(3):  # Adam's first steps move by ~lr whatever the gradient's size
            upd, state = tx.update({"kernel": jnp.ones(())}, state, params)
            moves.append(-float(upd["kernel"]))
        assert moves == pytest.approx(want, rel=1e-3)


@pytest.mark.slow
def test_dpo_rsft_and_duration_shaped_gbpo_run(tmp_path, capsys):
    pre = tmp_path / "pre"
    train = ["--config.steps=10", "--config.eval_requests=0", "--config.checkpoint_every=10"]
    assert cli.main(["train", "--config", "default", "--workdir", str(pre), *train]) == 0
    common = ["--config.batch_size=4", "--config.group=4", "--config.steps=2"]
    common += ["--config.log_every=1", "--config.eval_requests=0"]
    runs = (
        ("dpo", "align/pairs", []),
        ("rsft", "align/kept", []),
        ("gbpo", "align/legal_rate", ["--config.advantage=duration"]),
    )
    for method, key, extra in runs:
        work = tmp_path / method
        args = ["align", "--method", method, "--init", str(pre), "--workdir", str(work)]
        assert cli.main([*args, *common, *extra]) == 0
        rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(0.0 <= r[key] <= 1.0 for r in rows)
        assert all(r["align/loss"] == r["align/loss"] for r in rows)  # finite, not NaN


@pytest.mark.slow
def test_logged_feedback_aligns_a_movielens_run(tmp_path, capsys):
    """reward=logged needs neither a world nor a reward model: ECPO on MovieLens-100k, judged
    before/after by Recall and the logged reward of the top-K lists; a run whose align.json
    predates a field resumes (that field ran with its default)."""
    pre, work = tmp_path / "pre", tmp_path / "aligned"
    train = ["--config.source=movielens-100k", "--config.steps=10", "--config.eval_requests=0"]
    assert cli.main(["train", "--config", "default", "--workdir", str(pre), *train]) == 0
    args = ["align", "--method", "ecpo", "--init", str(pre), "--workdir", str(work)]
    common = ["--config.reward=logged", "--config.batch_size=8", "--config.group=8"]
    common += ["--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_beam=8"]
    common += ["--config.eval_requests=16"]
    assert cli.main([*args, *common, "--config.steps=2"]) == 0
    record = json.loads((work / "align.json").read_text())
    assert record["align"]["reward"] == "logged"
    del record["align"]["logged_miss"]
    (work / "align.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main([*args, *common, "--config.steps=4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # like +2, dislike -5, a miss 0: a batch's mean reward lies within those bounds
    assert all(-5.0 <= r["align/reward"] <= 2.0 for r in rows)
    for side in ("before", "after"):
        assert -5.0 <= summary[side]["logged_reward@10"] <= 2.0
        assert "engagement@10" not in summary[side]  # no world: no true reward
