"""Item embeddings for the tokenizer: content, aligned with collaborative signal, then fused.

Content: MiniLM sentence vectors of the item text where the source has text (MovieLens:
"title (year) | genres"), the world's own content features for `world:*`, none otherwise.

Alignment (the technical report's item-to-item contrastive step): a small projection of the
content, plus a free per-item vector that starts at zero (so items whose content says nothing
about who watches them can still move), trained with a symmetric InfoNCE loss on pairs of items
a user consumed within `window` positions of each other, in-batch negatives. Pairs come only
from training events (never a user's validation/test targets), and a held-out share of them
measures co-occurrence neighbour recall: for a held-out pair (a, b), is b among the `recall_k`
nearest items of a by cosine? The fused embedding that the quantiser sees is
[sqrt(w) * content, sqrt(1 - w) * aligned] with both unit-normalised, w = `content_weight`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from onerec_jax.data import hashing, schema


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    content: str = "auto"  # auto | minilm | world | none
    align: bool = True  # train the contrastive projection (else fused = content)
    align_dim: int = 64
    hidden: int = 256
    id_vectors: bool = True  # free per-item vectors beside the content projection
    temperature: float = 0.07
    steps: int = 1000
    batch_size: int = 1024
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    window: int = 3  # pair items within this many positions in a user's history
    max_pairs: int = 2_000_000
    world_examples: int = 20_000  # world: training requests whose histories give the pairs
    holdout: float = 0.1  # share of pairs kept out of training to measure neighbour recall
    recall_k: int = 10
    eval_pairs: int = 5000
    content_weight: float = 0.1  # measured: more weight on content lowers neighbour recall
    seed: int = 0

    def __post_init__(self) -> None:
        if self.content not in ("auto", "minilm", "world", "none"):
            raise ValueError(f"EmbedConfig.content: unknown {self.content!r}")
        if not 0.0 <= self.content_weight <= 1.0 or not 0.0 < self.holdout < 1.0:
            raise ValueError("EmbedConfig: content_weight in [0, 1] and holdout in (0, 1)")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def content_features(source: Any, mode: str = "auto", progress: bool = True) -> np.ndarray | None:
    """Unit content vectors [n_items + 1, d] (row 0 zeros), or None when there are none."""
    log = getattr(source, "log", None)
    text = getattr(log, "item_text", None)
    if mode == "auto":
        mode = "world" if source.kind == "world" else ("minilm" if text else "none")
    if mode == "none":
        return None
    if mode == "world":
        if source.kind != "world":
            raise ValueError("content='world' needs a world:PRESET source")
        x = _unit(source.item_content(np.arange(1, source.n_items + 1)))
    else:
        if not text:
            raise ValueError(f"content='minilm': source {source.kind} has no item text")
        from onerec_jax.tokenizer import minilm

        x = minilm.encode(list(text[1:]), progress=progress)
    return np.concatenate([np.zeros((1, x.shape[1]), np.float32), _unit(x)])


def co_occurrence_pairs(source: Any, cfg: EmbedConfig) -> np.ndarray:
    """Item pairs [P, 2] consumed within `window` positions by one user, training events only."""
    if source.kind == "world":
        n = min(cfg.world_examples, len(source))
        h = hashing.hash_u64(cfg.seed, 77, np.arange(n))
        idx = np.asarray(h % np.uint64(len(source)), np.int64)
        raw = source.raw_batch(idx, max_events=64)
        keep = schema.is_positive(
            raw["hist_flags"], raw["hist_play_ms"], raw["hist_dur_ms"], schema.SchemaSpec()
        )
        items = raw["hist_item"]
        seq = np.repeat(np.arange(n), np.diff(raw["hist_offsets"]))
        items, seq = items[keep], seq[keep]
    else:
        log = source.log
        n_ev = np.diff(log.offsets)[1:]
        held = np.where(n_ev >= 3, 2, 0)  # a user's last two events are validation and test
        starts = log.offsets[1:-1]
        pos = schema.ranges(starts, n_ev - held)
        items = log.item[pos]
        seq = np.repeat(np.arange(len(n_ev)), n_ev - held)
    pairs = []
    for j in range(1, cfg.window + 1):
        same = seq[j:] == seq[:-j]
        a, b = items[:-j][same], items[j:][same]
        pairs.append(np.stack([a, b], 1)[a != b])
    p = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    if len(p) > cfg.max_pairs:
        p = p[np.argsort(hashing.hash_u64(cfg.seed, 78, np.arange(len(p))))[: cfg.max_pairs]]
    return p.astype(np.int32)


class _Aligner(nn.Module):
    n_items: int
    dim: int
    hidden: int
    id_vectors: bool
    has_content: bool

    @nn.compact
    def __call__(self, content: jax.Array | None, items: jax.Array) -> jax.Array:
        z = jnp.zeros((items.shape[0], self.dim), jnp.float32)
        if self.has_content:
            h = nn.gelu(nn.Dense(self.hidden)(content[items]))
            z = nn.Dense(self.dim)(h)
        if self.id_vectors or not self.has_content:
            # Zero start with content (a residual on top of it); random start without.
            init = nn.initializers.zeros if self.has_content else nn.initializers.normal(0.1)
            z = z + nn.Embed(self.n_items + 1, self.dim, embedding_init=init)(items)
        # rsqrt(|z|^2 + eps), not z / max(|z|, eps): the norm's gradient at z = 0 (the padding
        # row) is NaN, and a NaN times a zero gather gradient still poisons every parameter.
        return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)


def neighbour_recall(emb: np.ndarray, pairs: np.ndarray, k: int) -> float:
    """Share of pairs (a, b) with b among the k nearest items of a (cosine, a excluded)."""
    if len(pairs) == 0:
        return float("nan")
    if not np.all(np.isfinite(emb)):
        raise ValueError("neighbour_recall: embeddings are not finite")
    e = jnp.asarray(_unit(emb))
    a, b = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

    @jax.jit
    def hits(a: jax.Array, b: jax.Array) -> jax.Array:
        s = e[a] @ e.T
        s = s.at[:, 0].set(-jnp.inf)  # padding row
        s = s.at[jnp.arange(a.shape[0]), a].set(-jnp.inf)
        target = s[jnp.arange(a.shape[0]), b]
        return jnp.sum(s > target[:, None], axis=1) < k

    out = [np.asarray(hits(a[i : i + 512], b[i : i + 512])) for i in range(0, len(pairs), 512)]
    return float(np.concatenate(out).mean())


def item_embeddings(
    source: Any, cfg: EmbedConfig, *, writer: Any = None, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fused embeddings [n_items + 1, d] (row 0 zeros) and a report of what was measured."""
    t0 = time.perf_counter()
    content = content_features(source, cfg.content, progress)
    report: dict[str, Any] = {
        "content": None if content is None else int(content.shape[1]),
        "content_s": round(time.perf_counter() - t0, 2),
    }
    if not cfg.align:
        if content is None:
            raise ValueError("no content features and align=False: nothing to embed")
        return content, report
    pairs = co_occurrence_pairs(source, cfg)
    if len(pairs) < 2:
        raise ValueError(f"{source.kind}: fewer than 2 co-occurring item pairs to align on")
    h = hashing.unit53(hashing.hash_u64(cfg.seed, 79, np.arange(len(pairs))))
    test, train = pairs[h < cfg.holdout][: cfg.eval_pairs], pairs[h >= cfg.holdout]
    report.update(pairs_train=len(train), pairs_heldout=len(test))

    model = _Aligner(source.n_items, cfg.align_dim, cfg.hidden, cfg.id_vectors, content is not None)
    c = None if content is None else jnp.asarray(content)
    key = jax.random.key(cfg.seed)
    params = model.init(key, c, jnp.zeros(2, jnp.int32))
    sched = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    opt = optax.adamw(sched, weight_decay=cfg.weight_decay)
    opt_state = opt.init(params)
    batch = min(cfg.batch_size, len(train))
    train_j = jnp.asarray(train)
    all_items = jnp.arange(source.n_items + 1)
    # A small catalogue is cheaper to project whole than two batches of rows.
    whole = source.n_items + 1 <= 2 * batch

    @jax.jit
    def step(params: Any, opt_state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        p = train_j[jax.random.randint(key, (batch,), 0, train_j.shape[0])]

        def loss_fn(params: Any) -> jax.Array:
            if whole:
                z = model.apply(params, c, all_items)
                za, zb = z[p[:, 0]], z[p[:, 1]]
            else:
                za = model.apply(params, c, p[:, 0])
                zb = model.apply(params, c, p[:, 1])
            logits = za @ zb.T / cfg.temperature
            # The same item twice in a batch is not a negative of itself.
            same = p[:, 1][None, :] == p[:, 1][:, None]
            logits = jnp.where(same & ~jnp.eye(batch, dtype=bool), -1e9, logits)
            labels = jnp.arange(batch)
            l1 = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            l2 = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
            return 0.5 * jnp.mean(l1 + l2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t1 = time.perf_counter()
    keys = jax.random.split(jax.random.fold_in(key, 1), cfg.steps)
    bar = tqdm(range(cfg.steps), desc="align", disable=not progress, leave=False)
    loss = jnp.zeros(())
    for i in bar:
        params, opt_state, loss = step(params, opt_state, keys[i])
        if i % 100 == 0 or i == cfg.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
            if writer is not None:
                writer.scalars(i, {"tokenizer/align_loss": float(loss)})
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"alignment diverged (loss {float(loss)}): lower learning_rate")
    aligned = np.array(model.apply(params, c, all_items))
    aligned[0] = 0.0
    w = cfg.content_weight if content is not None else 0.0
    fused = (
        aligned
        if content is None
        else np.concatenate([np.sqrt(w) * content, np.sqrt(1.0 - w) * aligned], axis=1)
    )
    k = cfg.recall_k
    report.update(
        align_s=round(time.perf_counter() - t1, 2),
        align_final_loss=float(loss),
        neighbour_recall_k=k,
        neighbour_recall_content=None if content is None else neighbour_recall(content, test, k),
        neighbour_recall_aligned=neighbour_recall(aligned, test, k),
        neighbour_recall_fused=neighbour_recall(fused, test, k),
    )
    return fused.astype(np.float32), report
