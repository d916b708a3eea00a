"""The training loop end to end: SIGKILL then resume equals an uninterrupted run; bad inputs."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from onerec_jax import config as config_lib
from onerec_jax import evaluate
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import loop
from onerec_jax.train.run_config import load_run_config

CONFIG = "experiments/v1_world_tiny.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(out, n_items, seed=0):
    """A semantic-id table without the tokenizer's cost (its own tests cover the tokenizer)."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 16, n_items) for _ in range(3)], 1)
    SemanticIds.from_codes(codes, (16, 16, 16)).save(out)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _table(tmp_path_factory.mktemp("tok"), 500)  # world:tiny has 500 items


def _train(workdir, tok, *extra, env=None):
    cmd = [
        sys.executable,
        "-m",
        "onerec_jax.cli",
        "train",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        f"--config.tokenizer_dir={tok}",
        "--config.steps=12",
        "--config.checkpoint_every=4",
        "--config.log_every=1",
        "--config.batch_size=8",
        *extra,
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines)}


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tokenizer_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    full = _train(a, tokenizer_dir)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _train(b, tokenizer_dir, env={"ONEREC_TEST_SIGKILL_AT_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    resumed = _train(b, tokenizer_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    assert la == lb  # bit-identical: same state, same data order, same program
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sb["step"] == 12 and sb["status"] == "finished"
    # Counters survive the restart (they travel in the checkpoint), and the final validation
    # loss of the resumed run is the uninterrupted run's.
    counters = ("items_seen", "tokens_seen", "samples_seen", "flops_seen", "final_train_loss")
    for key in (*counters, "final_eval_loss", "final_eval_loss_se"):
        assert sb[key] == sa[key], key
    # Running a finished run again trains nothing and reports what the run did.
    again = _train(b, tokenizer_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    sc = json.loads((b / "summary.json").read_text())
    assert all(sc[k] == sb[k] for k in (*counters, "final_eval_loss", "final_eval_loss_se"))
    assert sc["wall_s_total"] == sb["wall_s_total"] > sb["wall_s_this_run"] > 0
    assert sb["samples_seen"] == 12 * 8 and sb["flops_seen"] == 96 * sb["flops_per_sample"]
    assert (
        0 < sb["items_seen"] <= 96 * 5 and sb["tokens_seen"] == len(sb["vocab"]) * sb["items_seen"]
    )
    assert sb["params_total"] == sb["params_embedding"] + sb["params_non_embedding"]
    assert np.isfinite(sb["final_eval_loss"]) and sb["final_eval_loss"] > 0
    # A run written before fields were added still reads: drop two of them from config.json.
    saved = json.loads((b / "config.json").read_text())
    del saved["rung"], saved["model"]["family"], saved["model"]["v1"]["encoder"]["n_heads"]
    (b / "config.json").write_text(json.dumps(saved))
    # The resumed run evaluates through the CLI path's function: real items, metrics in range,
    # and the world's true engagement of what it recommends.
    m = evaluate.evaluate_run(b, "test", beam=8, max_requests=8)
    assert m["step"] == 12 and m["n_requests"] == 8
    assert 0.0 <= m["ndcg@10"] <= 1.0 and 0.0 <= m["recall@10"] <= m["recall@50"] <= 1.0
    for key in ("engagement@1", "engagement@5", "engagement@10", "engagement_logged"):
        assert np.isfinite(m[key]), key
    assert all(np.isfinite(m[f"logged_reward@{k}"]) for k in (1, 5, 10))


def test_bad_inputs_fail_clearly_and_keep_the_run(tmp_path, tokenizer_dir):
    base = config_lib.load(os.path.join(ROOT, CONFIG))
    with pytest.raises(config_lib.ConfigError, match="unknown config field"):
        config_lib.resolve(base, ["model.v1.d_modl=3"])
    cfg = config_lib.resolve(config_lib.load(os.path.join(ROOT, CONFIG)), [])
    # A table whose catalogue is not the source's.
    cfg.tokenizer_dir = str(_table(tmp_path / "other_tok", 1682))
    with pytest.raises(ValueError, match="covers 1682 items"):
        loop.train(cfg, tmp_path / "run")
    missing = config_lib.resolve(config_lib.load(os.path.join(ROOT, CONFIG)), [])
    missing.tokenizer_dir = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no semantic-id table"):
        loop.train(missing, tmp_path / "run2")
    # A workdir holding another config's run (one that saved a checkpoint) is refused and
    # left as it was; one whose start failed before any checkpoint takes the new config
    # (test_faults_run.py).
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    changed = config_lib.resolve(
        config_lib.load(os.path.join(ROOT, CONFIG)), ["model.v1.encoder.d_model=64"]
    )
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match="different config"):
        loop.train(changed, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    overrides = [
        f"tokenizer_dir={tokenizer_dir}",
        "steps=8",
        "checkpoint_every=2",
        "log_every=1",
        "batch_size=8",
        "optim.learning_rate=1e30",  # diverges within a few steps
        "optim.warmup_steps=1",
        "optim.clip_norm=1e30",
    ]
    cfg = config_lib.resolve(config_lib.load(os.path.join(ROOT, CONFIG)), overrides)
    monkeypatch.chdir(tmp_path)  # a relative workdir, as the README's commands use
    with pytest.raises(FloatingPointError, match=r"at step (\d+); stopping\. Last good checkpoint"):
        loop.train(cfg, "run")
    tmp_path = tmp_path / "run"
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    losses = _losses(tmp_path)
    # Every checkpoint on disk was taken at a step whose loss was finite.
    assert saved and all(np.isfinite(losses[s]) for s in saved)
    assert not saved or max(saved) < 8


def test_eval_loss_at_step_s_is_that_of_the_state_after_s_steps(tmp_path, tokenizer_dir):
    """With a checkpoint at every step the eval of step s cannot see a later state; without
    checkpoints in between it must log the same numbers."""
    common = [
        f"tokenizer_dir={tokenizer_dir}",
        "steps=4",
        "log_every=1",
        "eval_every=2",
        "eval_requests=20",  # not a multiple of the batch: the padded batch carries no loss
        "batch_size=8",
    ]
    evals = {}
    for name, ckpt in (("every", 1), ("end", 100)):
        cfg = config_lib.resolve(
            config_lib.load(os.path.join(ROOT, CONFIG)), [*common, f"checkpoint_every={ckpt}"]
        )
        summary = loop.train(cfg, tmp_path / name)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        evals[name] = {
            r["step"]: (r["eval/loss"], r["eval/loss_se"])
            for r in map(json.loads, lines)
            if "eval/loss" in r
        }
        assert summary["eval_requests"] == 20
        assert summary["final_eval_loss"] == evals[name][4][0]
        assert 0 < summary["final_eval_loss_se"] < 0.5 * summary["final_eval_loss"]
        assert summary["distinct_train_requests"] == 160_000
        assert summary["data_passes"] == 4 * 8 / 160_000
    assert sorted(evals["every"]) == [2, 4]
    assert evals["every"] == evals["end"]


def test_a_world_run_from_before_the_time_cut_is_refused_and_kept(tmp_path, tokenizer_dir):
    cfg = config_lib.resolve(
        config_lib.load(os.path.join(ROOT, CONFIG)), [f"tokenizer_dir={tokenizer_dir}"]
    )
    old = json.loads(cfg.to_json())
    del old["world_seed"], old["world_split"]  # what a run's config.json held before the cut
    old["eval_batches"] = old.pop("eval_requests") // old["batch_size"]
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(old))
    assert load_run_config(run).eval_requests == cfg.eval_requests
    with pytest.raises(ValueError, match=r"old hash-stream splits.*new --workdir"):
        loop.train(cfg, run)
    with pytest.raises(ValueError, match="old hash-stream splits"):
        evaluate.evaluate_run(run)
    assert json.loads((run / "config.json").read_text()) == old
    # An old MovieLens run is not a world run: its split never changed.
    old["source"] = "movielens-100k"
    (run / "config.json").write_text(json.dumps(old))
    assert load_run_config(run).world_split == "time_cut"


def test_a_sigterm_the_loop_did_not_act_on_is_delivered_again():
    from onerec_jax.train.loop import Preemption

    seen = []
    old = signal.signal(signal.SIGTERM, lambda *a: seen.append(1))
    try:
        with Preemption() as p:  # a SIGTERM during the final save: after the flag was read
            os.kill(os.getpid(), signal.SIGTERM)
            assert p.requested and not seen
        assert seen == [1]  # re-delivered to the handler restored on exit
        with Preemption() as p:  # one the loop acted on (it checkpointed and stopped)
            os.kill(os.getpid(), signal.SIGTERM)
            p.acted = True
        assert seen == [1]
    finally:
        signal.signal(signal.SIGTERM, old)
