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


def assert_padding_users_change_nothing(model, inputs, codes) -> None:
    """Two users with only padded targets put in front of a capacity-dispatch MoE batch (where
    capacity would serve them first) change neither a valid item's loss nor any MoE statistic,
    and capacity really binds."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    v = jax.jit(model.init)(jax.random.key(0), inputs, codes)
    apply = jax.jit(model.apply)
    nll, stats = apply(v, inputs, codes)
    padded_x = jax.tree.map(lambda a: jnp.concatenate([a[:2], a]), inputs)
    padded_codes = jnp.concatenate([jnp.full((2, *codes.shape[1:]), -1), codes])
    nll_p, stats_p = apply(v, padded_x, padded_codes)
    valid = np.asarray(jnp.all(codes >= 0, axis=-1))
    np.testing.assert_allclose(np.asarray(nll_p)[2:][valid], np.asarray(nll)[valid], atol=1e-5)
    for name in ("load", "max_load", "dropped", "aux_loss"):
        np.testing.assert_allclose(stats_p[name], stats[name], rtol=1e-5, err_msg=name)
    assert float(jnp.max(stats["dropped"])) > 0  # capacity binds, and binds the same way


def param_listing(model, inputs, codes) -> list[str]:
    """Every variable of `model` as "collection/path/to/leaf AxBxC", sorted: what a checkpoint
    is keyed by (the variables are shapes only, nothing is computed)."""
    import flax.linen as nn
    import jax

    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs, codes)
    return sorted(
        "/".join(str(k.key) for k in path) + " " + "x".join(map(str, leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(shapes))
    )


def listed(text: str) -> list[str]:
    """The non-empty lines of an inline listing."""
    return [line.strip() for line in text.splitlines() if line.strip()]
