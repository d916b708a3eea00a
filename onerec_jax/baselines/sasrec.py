"""SASRec (Kang & McAuley 2018): a causal transformer over a user's item ids, JAX/Flax.

Each position of a user's training sequence predicts the next item, with a FULL softmax over
every item (cross-entropy; recent reproductions find it well ahead of the paper's sampled
binary loss, and at 1,682 items it is cheap). The usual recipe otherwise: the last `maxlen`
items (200), item embeddings scaled by sqrt(d) and shared with the output layer, learned
positions, pre-norm blocks (attention + ReLU FFN) with dropout, Adam. Positions are counted
from the newest item, so a sequence shorter than `maxlen` is left-padded and its newest item
always has the same position. A user's sequence longer than `maxlen` + 1 gives several
windows (every event is a target once). Batches group windows of similar length (padded to
a multiple of 32, one compile each), so no compute goes to long runs of padding.

The epoch count is chosen on the validation split (`validate`, every `eval_every` epochs):
the parameters of the best validation NDCG@10 are the ones returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from onerec_jax.baselines.data import BestEpoch, TrainData, last_items
from onerec_jax.model.layers import attend

GRID = {"dropout": [0.2, 0.5]}
DEFAULT = {
    "maxlen": 200,
    "d_model": 64,
    "n_blocks": 2,
    "n_heads": 2,
    "dropout": 0.5,
    "learning_rate": 1e-3,
    "batch_size": 32,
    "epochs": 60,
    "eval_every": 5,
}
BUCKET = 32  # windows are padded to a multiple of this many positions


class Block(nn.Module):
    d_model: int
    n_heads: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> tuple[jax.Array, None]:
        b, length, d = x.shape
        h = nn.LayerNorm()(x)
        qkv = nn.Dense(3 * d)(h).reshape(b, length, 3, self.n_heads, d // self.n_heads)
        a = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, jnp.float32)
        x = x + nn.Dropout(self.dropout)(nn.Dense(d)(a.reshape(b, length, d)), not train)
        h = nn.LayerNorm()(x)
        h = nn.Dropout(self.dropout)(nn.relu(nn.Dense(d)(h)), not train)
        return x + nn.Dropout(self.dropout)(nn.Dense(d)(h), not train), None


class SASRec(nn.Module):
    n_items: int
    maxlen: int
    d_model: int
    n_blocks: int
    n_heads: int
    dropout: float

    def setup(self) -> None:
        self.item_emb = nn.Embed(self.n_items + 1, self.d_model)
        self.pos_emb = self.param("pos", nn.initializers.normal(0.02), (self.maxlen, self.d_model))
        self.blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=self.n_blocks,
        )(self.d_model, self.n_heads, self.dropout)
        self.drop = nn.Dropout(self.dropout)
        self.norm = nn.LayerNorm()

    def __call__(self, items_BxL: jax.Array, train: bool) -> jax.Array:
        """Hidden states [B, L, d] of right-aligned (newest last) item sequences."""
        length = items_BxL.shape[1]
        x = self.item_emb(items_BxL) * jnp.sqrt(jnp.float32(self.d_model))
        x = self.drop(x + self.pos_emb[self.maxlen - length :][None], not train)
        valid = items_BxL > 0
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None] & valid[:, None, :]
        x = x * valid[..., None]
        x, _ = self.blocks(x, mask, train)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Scores of every item (0 is padding, never a target)."""
        return self.item_emb.attend(hidden)


def _loss(model: SASRec, params, inputs, targets, rng) -> jax.Array:
    hidden = model.apply({"params": params}, inputs, True, rngs={"dropout": rng})
    logits = model.apply({"params": params}, hidden, method=SASRec.logits).astype(jnp.float32)
    logits = logits.at[..., 0].set(-1e30)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w = (targets > 0).astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.partial(jax.jit, static_argnames=("model", "tx"))
def _step(params, opt, inputs, targets, rng, *, model, tx):
    loss, g = jax.value_and_grad(lambda p: _loss(model, p, inputs, targets, rng))(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss


def windows(data: TrainData, maxlen: int) -> list[np.ndarray]:
    """Every user's training sequence cut into windows of at most maxlen + 1 items, taken from
    the newest end and overlapping by one item, so every event after a user's first is a
    target exactly once."""
    out = []
    for u in range(1, data.n_users + 1):
        seq = data.sequence(u)
        end = len(seq)
        while end >= 2:
            out.append(seq[max(0, end - maxlen - 1) : end])
            end -= maxlen
    return out


def batches(
    wins: list[np.ndarray], batch: int, maxlen: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) [batch, L] per batch: windows sorted by length (ties at random),
    grouped, padded on the left to a multiple of BUCKET (at most maxlen); the batch order
    shuffled."""
    lengths = np.array([len(w) - 1 for w in wins])
    order = np.lexsort((rng.random(len(wins)), lengths))
    out = []
    for s in range(0, len(order), batch):
        group = order[s : s + batch]
        length = min(int(-(-lengths[group].max() // BUCKET) * BUCKET), maxlen)
        inp = np.zeros((batch, length), np.int32)
        tgt = np.zeros((batch, length), np.int32)
        for r, i in enumerate(group):
            w = wins[i]
            inp[r, length - len(w) + 1 :] = w[:-1]
            tgt[r, length - len(w) + 1 :] = w[1:]
        out.append((inp, tgt))
    return [out[i] for i in rng.permutation(len(out))]


@functools.partial(jax.jit, static_argnames=("model",))
def _last_logits(params, items, *, model: SASRec) -> jax.Array:
    hidden = model.apply({"params": params}, items, False)
    return model.apply({"params": params}, hidden[:, -1], method=SASRec.logits)


class SASRecScorer:
    """Scores of a request = the logits after its `maxlen` most recent history items."""

    def __init__(self, model: SASRec, params: Any, maxlen: int):
        self.model, self.params, self.maxlen = model, params, maxlen
        self.chosen: dict[str, Any] = {}

    def scores(self, raw: dict[str, Any]) -> np.ndarray:
        items = last_items(raw, self.maxlen)
        return np.asarray(_last_logits(self.params, items, model=self.model), np.float64)


def fit(
    data: TrainData,
    params: dict,
    seed: int = 0,
    validate: Callable[[Any], float] | None = None,
) -> SASRecScorer:
    p = {**DEFAULT, **params}
    maxlen = int(p["maxlen"])
    model = SASRec(
        data.n_items, maxlen, int(p["d_model"]), int(p["n_blocks"]), int(p["n_heads"]),
        float(p["dropout"]),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    key, init_key = jax.random.split(jax.random.PRNGKey(seed))
    w = model.init(init_key, jnp.ones((1, maxlen), jnp.int32), False)["params"]
    tx = optax.adam(float(p["learning_rate"]), b2=0.98)
    opt = tx.init(w)
    wins = windows(data, maxlen)
    picker = BestEpoch(validate)
    for epoch in range(1, int(p["epochs"]) + 1):
        for inp, tgt in batches(wins, int(p["batch_size"]), maxlen, rng):
            key, sub = jax.random.split(key)
            w, opt, _ = _step(w, opt, inp, tgt, sub, model=model, tx=tx)
        if epoch % int(p["eval_every"]) == 0 or epoch == int(p["epochs"]):
            picker.offer(SASRecScorer(model, w, maxlen), epoch)
    return picker.best
