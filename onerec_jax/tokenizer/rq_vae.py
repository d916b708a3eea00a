"""RQ-VAE (Flax), the learned alternative to RQ-KMeans, kept for comparison.

An MLP encoder maps an item embedding to a latent; Q codebooks quantise it residually (nearest
code per level); an MLP decoder reconstructs the embedding from the sum of the chosen codes.
Loss = reconstruction MSE + codebook loss |sg(r) - e|^2 + beta * commitment |r - sg(e)|^2 per
level, with the straight-through estimator through the quantiser. Codebooks start from k-means
of the initial encoder's latents (residual per level), the usual remedy for dead codes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from onerec_jax.tokenizer import rq_kmeans


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
    n_levels: int = 3
    n_codes: int = 256
    latent_dim: int = 32
    hidden: tuple[int, ...] = (256, 128)
    beta: float = 0.25  # commitment weight
    steps: int = 3000
    batch_size: int = 1024
    learning_rate: float = 1e-3
    kmeans_init: bool = True
    seed: int = 0


class RQVAE(nn.Module):
    dim: int
    cfg: RQVAEConfig

    def setup(self) -> None:
        c = self.cfg
        self.enc = [nn.Dense(h) for h in c.hidden] + [nn.Dense(c.latent_dim)]
        self.dec = [nn.Dense(h) for h in reversed(c.hidden)] + [nn.Dense(self.dim)]
        self.codebooks = self.param(
            "codebooks", nn.initializers.normal(0.1), (c.n_levels, c.n_codes, c.latent_dim)
        )

    def encode(self, x: jax.Array) -> jax.Array:
        for layer in self.enc[:-1]:
            x = nn.relu(layer(x))
        return self.enc[-1](x)

    def decode(self, z: jax.Array) -> jax.Array:
        for layer in self.dec[:-1]:
            z = nn.relu(layer(z))
        return self.dec[-1](z)

    def quantise(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Quantised latent, codes [B, Q] and the summed codebook + commitment loss."""

        def level(r: jax.Array, book: jax.Array) -> tuple[jax.Array, tuple]:
            d = jnp.sum(r * r, 1, keepdims=True) - 2 * r @ book.T + jnp.sum(book * book, 1)[None]
            a = jnp.argmin(d, axis=1)
            e = book[a]
            sg = jax.lax.stop_gradient
            loss = jnp.mean(jnp.sum((sg(r) - e) ** 2, 1))
            loss = loss + self.cfg.beta * jnp.mean(jnp.sum((r - sg(e)) ** 2, 1))
            return r - e, (a, e, loss)

        _, (codes, chosen, losses) = jax.lax.scan(level, z, self.codebooks)
        zq = jnp.sum(chosen, axis=0)
        zq = z + jax.lax.stop_gradient(zq - z)  # straight-through
        return zq, codes.T.astype(jnp.int32), jnp.sum(losses)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        zq, codes, q_loss = self.quantise(self.encode(x))
        return self.decode(zq), codes, q_loss


def fit(
    x: np.ndarray, cfg: RQVAEConfig, *, writer: Any = None, progress: bool = True
) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """Train on rows of x [n, d]; returns params, codes [n, Q] and metrics (as RQ-KMeans')."""
    x = jnp.asarray(x, jnp.float32)
    n, dim = x.shape
    model = RQVAE(dim, cfg)
    key = jax.random.key(cfg.seed)
    params = model.init(key, x[:2])
    if cfg.kmeans_init:
        z = model.apply(params, x, method=RQVAE.encode)
        km = rq_kmeans.RQKMeansConfig(
            n_levels=cfg.n_levels,
            n_codes=min(cfg.n_codes, n),
            n_iters=10,
            balanced=False,
            seed=cfg.seed,
        )
        q, _ = rq_kmeans.fit(z, km, progress=False)
        books = jnp.stack(q.codebooks)
        if books.shape[1] == cfg.n_codes:
            params = jax.tree_util.tree_map(lambda a: a, params)
            params["params"]["codebooks"] = books
    opt = optax.adam(cfg.learning_rate)
    opt_state = opt.init(params)
    batch = min(cfg.batch_size, n)

    @jax.jit
    def step(params: Any, opt_state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        xb = x[jax.random.randint(key, (batch,), 0, n)]

        def loss_fn(p: Any) -> jax.Array:
            x_hat, _, q_loss = model.apply(p, xb)
            return jnp.mean(jnp.sum((x_hat - xb) ** 2, 1)) + q_loss

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    keys = jax.random.split(jax.random.fold_in(key, 1), cfg.steps)
    bar = tqdm(range(cfg.steps), desc="rq-vae", disable=not progress, leave=False)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, keys[i])
        if i % 200 == 0 or i == cfg.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if writer is not None:
                writer.scalars(i, {"tokenizer/rq_vae_loss": float(loss)})

    @jax.jit
    def run(xb: jax.Array) -> tuple[jax.Array, jax.Array]:
        x_hat, codes, _ = model.apply(params, xb)
        return x_hat, codes

    outs = [run(x[i : i + 8192]) for i in range(0, n, 8192)]
    x_hat = np.concatenate([np.asarray(o[0]) for o in outs])
    codes = np.concatenate([np.asarray(o[1]) for o in outs])
    xs = np.asarray(x, np.float64)
    total = float(np.sum(xs * xs))
    lm = rq_kmeans.code_usage(codes, cfg.n_codes)
    metrics = {
        "utilisation": lm["utilisation"],
        "perplexity": lm["perplexity"],
        "max_load": lm["max_load"],
        "recon_error": float(np.sum((xs - x_hat) ** 2) / total) if total > 0 else 0.0,
    }
    return params, codes, metrics
