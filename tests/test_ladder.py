"""The rung ladder: names resolve to configs whose parameter counts match the paper's."""

import pathlib

import pytest

from onerec_jax import flops
from onerec_jax.config import load_file
from onerec_jax.train import loop
from scaling import ladder

BASE = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "v1_world_tiny.py"


class _Catalogue:
    n_items, n_authors, n_tags = 20_000, 2_048, 256


def _counts(name):
    cfg = ladder.apply_rung(load_file(BASE), name)
    return cfg, flops.counts(loop.build_model(cfg, _Catalogue, (cfg.tokenizer_codes,) * 3))


@pytest.mark.parametrize("name,billions", [("v1-0.935b", 0.935), ("v1-2.633b", 2.633)])
def test_moe_rungs_match_their_names(name, billions):
    """Non-embedding parameters (the catalogue's id tables excluded) within 3 % of the name."""
    cfg, c = _counts(name)
    assert abs(c.params_non_embedding / (billions * 1e9) - 1) < 0.03
    assert cfg.model.moe_d_ff == 2688 and cfg.data.life_len == 2000
    # Only top_k of the 24 experts act: active parameters are a fraction of the total.
    k = cfg.model.moe_top_k
    assert c.params_active == c.params_total - round(c.params_routed * (1 - k / 24))


def test_dense_rungs_and_errors():
    _, small = _counts("v1-0.015b")
    _, base = _counts("v1-0.121b")
    assert small.params_routed == base.params_routed == 0
    assert small.params_non_embedding < base.params_non_embedding
    assert 1e6 < small.params_non_embedding < 1e7  # see the ladder's docstring for 0.121B
    with pytest.raises(ValueError, match="unknown rung 'v1-9b'"):
        ladder.apply_rung(load_file(BASE), "v1-9b")
