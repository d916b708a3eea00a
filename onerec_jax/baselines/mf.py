"""Matrix factorisation baselines: BPR-MF (JAX) and EASE (closed form).

BPR-MF (Rendle et al. 2009): score(u, i) = <p_u, q_i> + b_i, trained on (user, training item,
sampled item) triples with -log sigmoid(s(u, i) - s(u, j)) + reg * (|p_u|^2 + |q_i|^2 + |q_j|^2);
negatives drawn uniformly among the items the user has no training event with. A request is
scored with its user's factors, so it knows nothing of the request's latest events (its
nature, not a handicap we added). The epoch count is chosen on the validation split
(`validate`), evaluated every `eval_every` epochs.

EASE (Steck 2019): B = argmin |X - XB|^2 + lam |B|^2 with diag(B) = 0, in closed form; a
request's score is its history row times B, so it does read the latest events. Deterministic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp

from onerec_jax import ranking
from onerec_jax.baselines.data import BestEpoch, TrainData

BPR_GRID = {"dim": [64, 128, 256], "reg": [1e-4, 1e-3, 1e-2], "learning_rate": [1e-3, 3e-3]}
BPR_DEFAULT = {"dim": 128, "reg": 1e-3, "learning_rate": 1e-3, "epochs": 150, "eval_every": 10}
EASE_GRID = {"lam": [10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]}
EASE_DEFAULT = {"lam": 200.0}


class FactorScorer:
    """Scores from user and item factors (BPR-MF)."""

    def __init__(self, user_f: np.ndarray, item_f: np.ndarray, item_b: np.ndarray):
        self.user_f, self.item_f, self.item_b = user_f, item_f, item_b
        self.chosen: dict[str, Any] = {}

    def scores(self, raw: dict[str, Any]) -> np.ndarray:
        return self.user_f[raw["user_id"]] @ self.item_f.T + self.item_b[None, :]


def _bpr_loss(params: dict, u: jax.Array, i: jax.Array, j: jax.Array, reg: float) -> jax.Array:
    pu, qi, qj = params["user"][u], params["item"][i], params["item"][j]
    diff = jnp.sum(pu * (qi - qj), -1) + params["bias"][i] - params["bias"][j]
    l2 = jnp.sum(pu**2, -1) + jnp.sum(qi**2, -1) + jnp.sum(qj**2, -1)
    return jnp.mean(-jax.nn.log_sigmoid(diff) + reg * l2)


@functools.partial(jax.jit, static_argnames=("tx", "reg"))
def _bpr_step(params, opt, u, i, j, *, tx, reg):
    loss, g = jax.value_and_grad(_bpr_loss)(params, u, i, j, reg)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss


def _negatives(rng: np.random.Generator, matrix: sp.csr_matrix, u: np.ndarray) -> np.ndarray:
    """One item per row of `u` among the items that user has no training event with."""
    n = matrix.shape[1]
    j = rng.integers(1, n, len(u))
    for _ in range(20):  # a user of ML-100k holds at most 44 % of the items: this converges
        bad = np.asarray(matrix[u, j]).ravel() > 0
        if not bad.any():
            break
        j[bad] = rng.integers(1, n, int(bad.sum()))
    return j


def fit_bpr(
    data: TrainData,
    params: dict,
    seed: int = 0,
    validate: Callable[[Any], float] | None = None,
    batch: int = 1024,
) -> FactorScorer:
    p = {**BPR_DEFAULT, **params}
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    ku, ki = jax.random.split(key)
    n_u, n_i, d = data.n_users + 1, data.n_items + 1, int(p["dim"])
    w = {
        "user": 0.1 * jax.random.normal(ku, (n_u, d)),
        "item": 0.1 * jax.random.normal(ki, (n_i, d)),
        "bias": jnp.zeros(n_i),
    }
    tx = optax.adam(float(p["learning_rate"]))
    opt = tx.init(w)
    users = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    picker = BestEpoch(validate)
    for epoch in range(1, int(p["epochs"]) + 1):
        order = rng.permutation(len(users))
        for s in range(0, len(order) - batch + 1, batch):  # the ragged rest: the next epoch
            b = order[s : s + batch]
            j = _negatives(rng, data.matrix, users[b])
            w, opt, _ = _bpr_step(w, opt, users[b], data.item[b], j, tx=tx, reg=float(p["reg"]))
        if epoch % int(p["eval_every"]) == 0 or epoch == int(p["epochs"]):
            picker.offer(FactorScorer(*(np.asarray(w[k]) for k in ("user", "item", "bias"))), epoch)
    return picker.best


class EASE:
    """The closed-form item-item model (module docstring)."""

    def __init__(self, data: TrainData, lam: float = 200.0):
        x = (data.matrix > 0).astype(np.float64)
        g = (x.T @ x).toarray()
        g[np.diag_indices_from(g)] += lam
        inv = np.linalg.inv(g)
        b = -inv / np.diag(inv)[None, :]
        np.fill_diagonal(b, 0.0)
        self.b = b
        self.chosen: dict[str, Any] = {}

    def scores(self, raw: dict[str, Any]) -> np.ndarray:
        x = ranking.history_matrix(raw, self.b.shape[0]) > 0
        return np.asarray(x.astype(np.float64) @ self.b)


def fit_ease(data: TrainData, params: dict, seed: int = 0, validate: Any = None) -> EASE:
    del seed, validate
    return EASE(data, **{**EASE_DEFAULT, **params})
