"""Small model pieces shared by the model tests (not a test module)."""

from onerec_jax.model.user_encoder import EncoderConfig


def tiny_encoder(src, pos_len: int, life_len: int, **kw) -> EncoderConfig:
    """A CPU-sized encoder for a source's catalogue: width 32, 4 heads, 4 QFormer queries."""
    base = dict(n_queries=4, d_model=32, d_ff=64, n_heads=4, n_layers=1)
    return EncoderConfig(
        n_items=src.n_items,
        n_authors=src.n_authors,
        n_tags=src.n_tags,
        pos_len=pos_len,
        life_len=life_len,
        **{**base, **kw},
    )
