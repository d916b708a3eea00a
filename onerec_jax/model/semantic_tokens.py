"""The semantic-id token layout V1 and V2 share: the Q levels' codes live at per-level offsets
in one embedding table (BOS is its last id), teacher-forced decoder inputs, the per-level NLL
read from each level's slice of one output head, and the mask of real target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from onerec_jax.model.layers import FFN_KINDS


class SemanticVocab:
    """Mixin for model configs with `vocab` (codes per level), `loss` and `ffn` fields.

    Token ids of level l live at offset(l) + code in one embedding table; BOS is the last id.
    """

    vocab: tuple[int, ...]
    loss: str
    ffn: str
    max_targets: int

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.vocab)[:-1]]).astype(np.int32)

    @property
    def n_tokens(self) -> int:
        return int(sum(self.vocab)) + 1

    def check_shared_fields(self) -> None:
        """Validate the fields V1 and V2 configs share (called from their __post_init__)."""
        name = type(self).__name__
        if self.loss not in ("sum", "mean"):
            raise ValueError(f"{name}.loss must be sum or mean, got {self.loss!r}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"{name}.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if not self.vocab or min(self.vocab) < 1:
            raise ValueError(f"{name}.vocab must be positive sizes, got {self.vocab}")


def teacher_forcing(
    codes_BxMxQ: jax.Array, cfg: SemanticVocab, groups: int
) -> tuple[jax.Array, jax.Array]:
    """Token-table ids of the target codes as `groups` sequences per request, [B * groups, T],
    and the decoder inputs: the same shifted right behind BOS."""
    b, m, q = codes_BxMxQ.shape
    if q != len(cfg.vocab) or m != cfg.max_targets:
        raise ValueError(
            f"codes {codes_BxMxQ.shape}: expected [B, {cfg.max_targets}, {len(cfg.vocab)}] "
            f"for vocab {cfg.vocab}"
        )
    # Padding targets carry code -1 from the table; any in-range id will do (masked later).
    ids_BxMxQ = jnp.maximum(codes_BxMxQ, 0) + jnp.asarray(cfg.offsets)[None, None, :]
    seq_NxT = ids_BxMxQ.reshape(b * groups, -1)
    bos_Nx1 = jnp.full((b * groups, 1), cfg.n_tokens - 1, jnp.int32)
    return seq_NxT, jnp.concatenate([bos_Nx1, seq_NxT[:, :-1]], axis=1)


def token_mask(codes_BxMxQ: jax.Array, groups: int) -> jax.Array:
    """Which decoder positions [B * groups, T] belong to a real target item, laid out as
    `teacher_forcing`'s inputs: position p predicts the code of item p // Q of its row. Padded
    items are the table's -1 rows (a False `target_mask` means item 0, whose codes are -1), so
    the codes alone say which are valid. The MoE gives the rest no expert slot."""
    b, m, q = codes_BxMxQ.shape
    valid_BxM = jnp.all(codes_BxMxQ >= 0, axis=-1)
    return jnp.broadcast_to(valid_BxM[:, :, None], (b, m, q)).reshape(b * groups, -1)


def pack_index(valid_NxT: jax.Array, capacity: int) -> jax.Array:
    """`capacity` distinct flat positions of [N, T]: every valid one first (in order), then as
    many padding positions as fill the rest. With capacity >= the valid count (the caller's
    contract: `train.step.token_capacity`), per-position work on these rows covers every real
    target token and skips the rest of the padding."""
    return jnp.argsort(~valid_NxT.reshape(-1), stable=True)[:capacity]


def on_rows(fn, x_NxTxD: jax.Array, index_C: jax.Array | None) -> jax.Array:
    """`fn` (a per-position map [R, D] -> [R, E]) over the positions `index_C` of x only, the
    others left zero: [N, T, E]. None: over every position."""
    if index_C is None:
        return fn(x_NxTxD)
    n, t, d = x_NxTxD.shape
    y_CxE = fn(x_NxTxD.reshape(n * t, d)[index_C])
    out = jnp.zeros((n * t, y_CxE.shape[-1]), y_CxE.dtype).at[index_C].set(y_CxE)
    return out.reshape(n, t, -1)


def level_nll(logits_NxTxV: jax.Array, ids_NxT: jax.Array, cfg: SemanticVocab) -> jax.Array:
    """Next-token NLL [N, T] where position p holds a level-(p % Q) token id: each position is
    scored against its level's slice of the head only (T <= m * Q static positions)."""
    q = len(cfg.vocab)
    out = []
    for p in range(ids_NxT.shape[1]):
        lo, v = int(cfg.offsets[p % q]), cfg.vocab[p % q]
        logits_NxV = logits_NxTxV[:, p, lo : lo + v]
        out.append(optax.softmax_cross_entropy_with_integer_labels(logits_NxV, ids_NxT[:, p] - lo))
    return jnp.stack(out, axis=1)
