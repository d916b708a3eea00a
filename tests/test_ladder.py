"""The rung ladder: names resolve to configs whose parameter counts match the paper's."""

import json

import pytest

from onerec_jax import flops
from onerec_jax.train.model_factory import build_model
from scaling import ladder


class _Catalogue:
    n_items, n_authors, n_tags = 20_000, 2_048, 256


def _counts(name):
    cfg = ladder.rung_config(name)
    return cfg, flops.counts(build_model(cfg, _Catalogue, (cfg.tokenizer_codes,) * 3))


@pytest.mark.parametrize("name,billions", [("v1-0.935b", 0.935), ("v1-2.633b", 2.633)])
def test_moe_rungs_match_their_names(name, billions):
    """Non-embedding parameters (the catalogue's id tables excluded) within 3 % of the name."""
    cfg, c = _counts(name)
    assert abs(c.params_non_embedding / (billions * 1e9) - 1) < 0.03
    assert cfg.model.v1.moe.d_ff == 2688 and cfg.data.life_len == 2000
    # Only top_k of the 24 experts act: active parameters are a fraction of the total.
    k = cfg.model.v1.moe.top_k
    assert c.params_active == c.params_total - round(c.params_routed * (1 - k / 24))


def test_dense_rungs_and_errors():
    _, small = _counts("v1-0.015b")
    _, base = _counts("v1-0.121b")
    assert small.params_routed == base.params_routed == 0
    assert small.params_non_embedding < base.params_non_embedding
    assert 1e6 < small.params_non_embedding < 1e7  # see the ladder's docstring for 0.121B
    with pytest.raises(ValueError, match="unknown rung 'v1-9b'"):
        ladder.rung_config("v1-9b")


V2_NAMES = {
    "v2-0.1b": 0.1,
    "v2-0.2b": 0.2,
    "v2-0.5b": 0.5,
    "v2-1b": 1.0,
    "v2-2b": 2.0,
    "v2-4b": 4.0,
    "v2-8b": 8.0,
}


def test_v2_rungs_match_their_names_within_10_percent():
    for name, billions in V2_NAMES.items():
        row = ladder.plan(name)
        assert row["family"] == "v2"
        assert abs(row["params_non_embedding"] / (billions * 1e9) - 1) < 0.10, name
    moe = ladder.plan("v2-4b-a0.5b")
    assert abs(moe["params_non_embedding"] / 4e9 - 1) < 0.10
    active_non_embedding = moe["params_active"] - moe["params_embedding"]
    assert abs(active_non_embedding / 0.5e9 - 1) < 0.10


def test_paper_accounting_reproduces_the_context_split():
    # 0.5B + 0.5B encoder-decoder at context 512, k = 5 impressions, 3 target tokens.
    enc_dec = flops.paper_flops_per_sample(0.5e9, 0.5e9, 512)
    assert enc_dec["context"] == pytest.approx(307.2e9) and enc_dec["decoder"] == 9e9
    assert 0.97 < enc_dec["context_share"] < 0.98  # the paper: 97.66 %
    # A 1B lazy decoder spends ~18 GFLOPs on its targets; its context is a few percent.
    row = ladder.plan("v2-1b")
    lazy = flops.paper_flops_per_sample(row["params_context"], 1e9, 512)
    assert 18e9 < lazy["total"] < 21e9 and lazy["total"] < 0.07 * enc_dec["total"]


def test_onerec_plan_cli(capsys):
    from onerec_jax import cli

    assert cli.main(["plan", "--rung", "v2-0.1b", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert {"params_total", "params_active", "flops_per_sample"} <= set(row)
    assert row["params_total"] >= row["params_active"] > 0
    assert row["train_state_bytes_unsharded"] == 16 * row["params_total"]
    assert cli.main(["plan", "--rung", "nope", "--json"]) == 2
    assert "unknown rung 'nope'" in capsys.readouterr().err


def test_micro_rungs_span_a_cpu_sweep_and_match_their_names():
    # At least 6 sizes per family from ~0.1M to ~20M non-embedding parameters, each within
    # 15 % of the size in its name, growing with the rung.
    from onerec_jax.model.rungs import MICRO_RUNGS

    for family in ("v1", "v2"):
        names = [n for n in MICRO_RUNGS if n.startswith(family)]
        counts = [ladder.plan(n)["params_non_embedding"] for n in names]
        assert len(names) >= 6 and counts == sorted(counts), (names, counts)
        assert counts[0] < 0.15e6 and 10e6 < counts[-1] < 25e6, counts
        for name, count in zip(names, counts, strict=True):
            label = float(name.split("-")[1].removesuffix("m")) * 1e6
            assert abs(count / label - 1) < 0.15, (name, count)
