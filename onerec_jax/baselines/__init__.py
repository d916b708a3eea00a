"""The sequential-recommendation baselines V1 and V2 are compared with, on their protocol.

Each is fitted on the training events of a logged source (`data.training_data`), tuned on its
validation split and reported on its test split with the ranking code models are scored with
(`onerec_jax.ranking.evaluate_scorer`): `onerec baseline NAME --source S --json` (tune.py).
TIGER (Rajput et al. 2023) is V1 without user features: no separate model.
"""

# One line each, as `onerec baseline --help` lists them (the fits live in registry.py, which
# imports JAX: the CLI reads these without it).
ABOUT = {
    "popularity": "training interactions per item",
    "item-knn": "cosine item-item co-occurrence over the whole history, k neighbours per item",
    "seq-knn": "item-to-item transitions out of the last few items, recency-weighted",
    "bpr": "BPR matrix factorisation (JAX)",
    "ease": "EASE closed-form item-item model",
    "sasrec": "self-attentive sequential recommendation, full softmax (JAX/Flax)",
}
