"""Balanced residual k-means and the RQ-VAE baseline."""

import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.tokenizer import rq_kmeans as rq
from onerec_jax.tokenizer import rq_vae


def skewed_blobs(n=6000, d=16, blobs=20, seed=0):
    """Zipf-weighted Gaussian blobs: plain k-means piles codes onto the big blobs."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, blobs + 1)
    lab = rng.choice(blobs, n, p=w / w.sum())
    return (rng.normal(size=(blobs, d)) * 4 + 0)[lab] + rng.normal(size=(n, d)), lab


@pytest.fixture(scope="module")
def blobs():
    return skewed_blobs()[0].astype(np.float32)


def test_balanced_assign_exact_capacities():
    rng = np.random.default_rng(1)
    for n, k in [(1000, 7), (64, 64), (513, 32)]:
        x = jnp.asarray(rng.normal(size=(n, 8)).astype(np.float32))
        c = x[:k] * 3.0  # far-off centroids: many rows want the same few codes
        a = np.asarray(rq.balanced_assign(x, c, t=2))
        counts = np.bincount(a, minlength=k)
        assert counts.sum() == n and a.min() >= 0
        assert set(counts.tolist()) <= {n // k, n // k + 1}


def test_balanced_assign_keeps_separated_equal_clusters():
    # K far-apart clusters of equal size: the balanced and nearest assignments agree.
    rng = np.random.default_rng(2)
    k, per = 8, 50
    centres = rng.normal(size=(k, 4)) * 50
    lab = np.repeat(np.arange(k), per)
    x = jnp.asarray((centres[lab] + rng.normal(size=(k * per, 4))).astype(np.float32))
    c = jnp.asarray(centres.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(rq.balanced_assign(x, c)), lab)
    np.testing.assert_array_equal(np.asarray(rq.nearest(x, c)), lab)


def test_contested_code_keeps_the_closest_rows():
    # Row 0 sits on centroid 0 and rows 0, 1, 2 all prefer it; with room for two, the code must
    # keep the two closest (0 and 1), not the ones farthest from the origin.
    x = jnp.asarray([[1.0], [0.9], [5.4], [9.0]])
    c = jnp.asarray([[1.0], [10.0]])
    np.testing.assert_array_equal(np.asarray(rq.balanced_assign(x, c, t=1)), [0, 0, 1, 1])


def test_balanced_assign_rejects_non_finite_rows():
    x = np.random.default_rng(3).normal(size=(16, 2)).astype(np.float32)
    x[5] = np.nan
    with pytest.raises(ValueError, match="no finite distance"):
        rq.balanced_assign(jnp.asarray(x), jnp.asarray(x[:4] + 0.0))
    with pytest.raises(ValueError, match="t must be >= 1"):
        rq.balanced_assign(jnp.asarray(x[:8]), jnp.asarray(x[:2]), t=0)


def test_nearest_matches_numpy(blobs):
    c = blobs[:37]
    d = ((blobs[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(rq.nearest(blobs, jnp.asarray(c))), d.argmin(1))


def test_balance_fixes_collapse_on_skewed_data(blobs):
    k = 32
    plain, pcodes = rq.fit(blobs, rq.RQKMeansConfig(n_codes=k, balanced=False), progress=False)
    bal, bcodes = rq.fit(blobs, rq.RQKMeansConfig(n_codes=k), progress=False)
    mp = rq.level_metrics(blobs, pcodes, plain.codebooks)
    mb = rq.level_metrics(blobs, bcodes, bal.codebooks)
    ideal = -(-len(blobs) // k) / (len(blobs) / k)
    assert mb["utilisation"] == [1.0, 1.0, 1.0]
    assert max(mb["max_load"]) <= ideal + 1e-9
    assert mp["max_load"][0] > 1.5  # without balance, codes on the big blobs hold far more rows
    # Each level removes error, and the codes decode to the sum of the chosen centroids.
    assert mb["recon_error"][0] > mb["recon_error"][1] > mb["recon_error"][2]
    x_hat = sum(np.asarray(c)[bcodes[:, i]] for i, c in enumerate(bal.codebooks))
    np.testing.assert_allclose(bal.decode(bcodes), x_hat, rtol=1e-6, atol=1e-6)
    assert bcodes.shape == (len(blobs), 3) and bcodes.dtype == np.int32


def test_minibatch_mode_is_balanced_and_close_to_lloyd(blobs):
    k = 32
    full, fcodes = rq.fit(blobs, rq.RQKMeansConfig(n_codes=k), progress=False)
    mini, mcodes = rq.fit(
        blobs, rq.RQKMeansConfig(n_codes=k, batch_size=512, n_iters=60), progress=False
    )
    ef = rq.level_metrics(blobs, fcodes, full.codebooks)["recon_error"][-1]
    em = rq.level_metrics(blobs, mcodes, mini.codebooks)
    assert em["utilisation"] == [1.0, 1.0, 1.0]
    assert em["recon_error"][-1] < 1.15 * ef


def test_fit_is_deterministic_given_seed(blobs):
    cfg = rq.RQKMeansConfig(n_codes=16, n_levels=2, n_iters=4)
    _, a = rq.fit(blobs, cfg, progress=False)
    _, b = rq.fit(blobs, cfg, progress=False)
    np.testing.assert_array_equal(a, b)


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_codes"):
        rq.RQKMeansConfig(n_codes=0)
    with pytest.raises(ValueError, match="init"):
        rq.RQKMeansConfig(init="forgy")
    with pytest.raises(ValueError, match="lower n_codes"):
        rq.fit(np.zeros((10, 4), np.float32), rq.RQKMeansConfig(n_codes=16), progress=False)
    x = np.ones((40, 4), np.float32)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        rq.fit(x, rq.RQKMeansConfig(n_codes=4), progress=False)


def test_rq_vae_trains_and_reports(blobs):
    cfg = rq_vae.RQVAEConfig(n_codes=16, latent_dim=8, hidden=(32,), steps=300, batch_size=256)
    _, codes, m = rq_vae.fit(blobs, cfg, progress=False)
    _, _, m0 = rq_vae.fit(blobs, rq_vae.RQVAEConfig(**{**cfg.__dict__, "steps": 1}), progress=False)
    assert codes.shape == (len(blobs), 3)
    assert codes.min() >= 0 and codes.max() < 16
    assert m["recon_error"] < 0.5 * m0["recon_error"]
    assert len(m["utilisation"]) == 3 and all(0 < u <= 1 for u in m["utilisation"])
