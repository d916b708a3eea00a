"""onerec_jax: OneRec generative recommenders in JAX/Flax, built for scaling studies."""

__version__ = "0.1.0"
