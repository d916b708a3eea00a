import json
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from onerec_jax import cli
from onerec_jax.data import logs, movielens
from onerec_jax.monitor import MetricWriter


def _onerec(*args):
    return subprocess.run(
        [sys.executable, "-m", "onerec_jax.cli", *args], capture_output=True, text=True
    )


def test_stats_are_byte_identical_across_processes():
    args = (
        "data",
        "stats",
        "--source",
        "world:tiny",
        "--seed",
        "3",
        "--max-examples",
        "300",
        "--json",
    )
    a, b = _onerec(*args), _onerec(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.count("\n") == 1
    s = json.loads(a.stdout)
    assert s["kind"] == "world" and s["sampled_examples"] == 300
    floors = s["entropy_floor_nats"]
    assert set(floors) == {"train", "validation", "test"}
    assert all(f["stderr"] > 0 for f in floors.values())
    # world:tiny: 1,000 users x 160 / 20 / 20 sessions
    assert s["n_distinct"] == {"train": 160_000, "validation": 20_000, "test": 20_000}
    assert sum(s["pathway_length_hist"]["life"].values()) == 300


def test_movielens_stats(capsys):
    assert cli.main(["data", "stats", "--source", "movielens-100k", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["n_interactions"], s["n_users"], s["n_items"]) == (100_000, 943, 1682)
    assert s["n_examples"]["test"] == s["n_examples"]["validation"] == 943
    assert 0 < s["popularity_slope"] < 3 and 0.5 < s["positive_rate"] < 0.6


def test_parquet_source_and_bad_source(tmp_path, capsys):
    path = tmp_path / "ml.parquet"
    logs.write(path, movielens.load())
    assert cli.main(["data", "stats", "--source", f"parquet:{path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_interactions"] == 100_000
    assert cli.main(["data", "stats", "--source", "world:huge"]) == 2
    assert "unknown world preset 'huge'" in capsys.readouterr().err
    assert cli.main(["data", "stats", "--source", f"parquet:{tmp_path / 'missing.parquet'}"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_metric_writer_reads_back(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.hparams({"lr": 0.1})
        for step in range(3):
            w.scalars(step, {"perf/examples_per_s": 10.0 * step})
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Tensors("perf/examples_per_s")
    assert [e.step for e in events] == [0, 1, 2]
    np.testing.assert_allclose([e.tensor_proto.float_val[0] for e in events], [0.0, 10.0, 20.0])
    assert json.loads((tmp_path / "hparams.json").read_text()) == {"lr": 0.1}


def test_stats_of_a_tiny_log_is_strict_json(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "few.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [1] * 4 + [2] * 3,
                "item_id": [1, 2, 3, 4, 1, 2, 3],
                "timestamp": [0, 10, 20, 30, 0, 10, 20],
            }
        ),
        path,
    )
    assert cli.main(["data", "stats", "--source", f"parquet:{path}", "--json"]) == 0
    s = json.loads(capsys.readouterr().out, parse_constant=lambda c: 1 / 0)  # rejects NaN
    assert s["n_examples"] == {"train": 0, "validation": 2, "test": 2}
    assert s["popularity_slope"] is None


# Slow (a training run and two evaluations, ~45 s on 2 cores): the property itself, beams that
# do not depend on their batch mates under capacity MoE, is tested fast in test_generate.py.
@pytest.mark.slow
def test_eval_batch_size_does_not_change_the_metrics_of_a_moe_run(tmp_path, capsys):
    from onerec_jax import config
    from onerec_jax.tokenizer.semantic_ids import SemanticIds
    from onerec_jax.train import loop

    # A random semantic-id table for world:tiny's 500 items (the tokenizer has its own tests).
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (500, 3))
    SemanticIds.from_codes(codes, (16, 16, 16)).save(tmp_path / "tok")
    overrides = [
        f"tokenizer_dir={tmp_path / 'tok'}",
        "steps=3",
        "batch_size=8",
        "log_every=1",
        "checkpoint_every=3",
        "eval_every=0",
        "eval_requests=0",
        "model.v1.moe.n_experts=8",
        "model.v1.moe.dispatch=capacity",
    ]
    cfg = config.resolve(config.load("experiments/v1_world_tiny.py"), overrides)
    loop.train(cfg, tmp_path / "run")
    capsys.readouterr()
    out = {}
    for b in (1, 32):
        args = ["eval", "--workdir", str(tmp_path / "run"), "--max-requests", "32"]
        assert cli.main([*args, "--beam", "8", "--batch-size", str(b), "--json"]) == 0
        out[b] = json.loads(capsys.readouterr().out)
    # A request's recommendations may not depend on which requests share its batch: generation
    # must not share expert capacity between the requests (or beam rows) of a batch.
    assert out[1] == out[32]
    assert out[1]["n_requests"] == 32 and out[1]["protocol"]["drop_seen"] is False
