"""Item embeddings for the tokenizer: content, aligned with collaborative signal, then fused.

Content: MiniLM sentence vectors of the item text where the source has text (MovieLens:
"title (year) | genres"), the world's own content features for `world:*`, none otherwise.

Alignment (the technical report's item-to-item contrastive step): a small projection of the
content, plus a free per-item vector that starts at zero (so items whose content says nothing
about who watches them can still move), trained with a symmetric InfoNCE loss on pairs of items
a user consumed within `window` positions of each other, in-batch negatives. Pairs come only
from training events (never a user's validation/test targets; disliked items are not consumed),
and the pairs of a held-out share of users measure co-occurrence neighbour recall: for a held-out
pair (a, b), is b among the `recall_k` nearest items of a by cosine? The fused embedding that the
quantiser sees is [sqrt(w) * content, sqrt(1 - w) * aligned], both unit-normalised,
w = `content_weight`.

On e-commerce sources (the funnel's flags present) the pairs are, by default (`pairs="auto"`),
co-cart / co-purchase pairs: products a user added to the cart or ordered within `window` of
each other among the user's carted products, whatever scenario each was shown in - so products
bought together across product cards, short videos and live streams end up close (OneMall's
tokenizer). The report then also gives the neighbour recall of held-out users' co-purchase
pairs (`neighbour_recall_copurchase_*`), whichever pairs were trained on, so the two choices
can be compared on the same pairs.
"""

from __future__ import annotations

import dataclasses
import functools
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
    # Which consumed items pair up: "positive" (strongly positive events), "purchase" (carted
    # or ordered products: co-cart / co-purchase), "auto" (purchase where the source logs carts)
    pairs: str = "auto"
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
        if self.pairs not in ("auto", "positive", "purchase"):
            raise ValueError(f"EmbedConfig.pairs: unknown {self.pairs!r}")
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


def has_funnel(source: Any) -> bool:
    """Whether a source logs the e-commerce funnel (add-to-cart, orders)."""
    if source.kind == "world":
        return hasattr(source, "shown_in")
    return bool((np.asarray(source.log.flags) & schema.CART).any())


def co_occurrence_pairs(
    source: Any, cfg: EmbedConfig, kind: str = "positive"
) -> tuple[np.ndarray, np.ndarray]:
    """Item pairs [P, 2] consumed within `window` positions by one user, from training events
    only, and the user [P] of each pair; `kind="purchase"`: carted or ordered products only."""
    if source.kind == "world":
        n = min(cfg.world_examples, len(source))
        h = hashing.hash_u64(cfg.seed, 77, np.arange(n))
        idx = np.asarray(h % np.uint64(len(source)), np.int64)
        raw = source.raw_batch(idx, max_events=64)
        keep = schema.is_positive(
            raw["hist_flags"], raw["hist_play_ms"], raw["hist_dur_ms"], schema.SchemaSpec()
        )
        if kind == "purchase":
            keep = (raw["hist_flags"] & schema.CART) != 0
        counts = np.diff(raw["hist_offsets"])
        seq = np.repeat(np.arange(n), counts)  # one request's history is one sequence
        user = np.repeat(np.asarray(raw["user_id"], np.int64), counts)
        items, seq, user = raw["hist_item"][keep], seq[keep], user[keep]
    else:
        log = source.log
        n_ev = np.diff(log.offsets)[1:]
        held = np.where(n_ev >= 3, 2, 0)  # a user's last two events are validation and test
        starts = log.offsets[1:-1]
        pos = schema.ranges(starts, n_ev - held)
        seq = np.repeat(np.arange(1, len(n_ev) + 1), n_ev - held)
        liked = (log.flags[pos] & schema.DISLIKE) == 0  # a disliked item was not consumed
        if kind == "purchase":
            liked = (log.flags[pos] & schema.CART) != 0
        items, seq = log.item[pos][liked], seq[liked]
        user = seq
    pairs, users = [], []
    for j in range(1, cfg.window + 1):
        same = (seq[j:] == seq[:-j]) & (items[:-j] != items[j:])
        pairs.append(np.stack([items[:-j][same], items[j:][same]], 1))
        users.append(user[j:][same])
    p, u = np.concatenate(pairs), np.concatenate(users)
    if len(p) > cfg.max_pairs:
        keep_rows = np.argsort(hashing.hash_u64(cfg.seed, 78, np.arange(len(p))))[: cfg.max_pairs]
        p, u = p[keep_rows], u[keep_rows]
    return p.astype(np.int32), u.astype(np.int64)


def _pair_key(p: np.ndarray, n_items: int) -> np.ndarray:
    lo, hi = np.minimum(p[:, 0], p[:, 1]), np.maximum(p[:, 0], p[:, 1])
    return lo.astype(np.int64) * (n_items + 1) + hi


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


@functools.partial(jax.jit, static_argnames=("k",))
def _hits(e: jax.Array, a: jax.Array, b: jax.Array, k: int) -> jax.Array:
    """Whether b is among the k nearest rows of e to a (cosine; a itself and padding excluded)."""
    rows = jnp.arange(a.shape[0])
    s = (e[a] @ e.T).at[:, 0].set(-jnp.inf).at[rows, a].set(-jnp.inf)
    return jnp.sum(s > s[rows, b][:, None], axis=1) < k


def neighbour_recall(emb: np.ndarray, pairs: np.ndarray, k: int) -> float | None:
    """Share of pairs (a, b) with b among the k nearest items of a (cosine, a excluded)."""
    if len(pairs) == 0:
        return None  # JSON null: nothing held out to measure on
    if not np.all(np.isfinite(emb)):
        raise ValueError("neighbour_recall: embeddings are not finite")
    e = jnp.asarray(_unit(emb))
    a, b = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])
    out = [
        np.asarray(_hits(e, a[i : i + 512], b[i : i + 512], k)) for i in range(0, len(pairs), 512)
    ]
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
    funnel = has_funnel(source)
    kind = cfg.pairs if cfg.pairs != "auto" else ("purchase" if funnel else "positive")
    report["pairs"] = kind
    pairs, users = co_occurrence_pairs(source, cfg, kind)
    # Hold out whole users: their pairs measure whether items that new users consume together
    # end up close. Many of those item pairs were also seen in training (popular combinations
    # recur); `unseen` restricts to pairs that never co-occur in training, which only
    # generalisation through the content and through shared neighbours can place.
    h = hashing.unit53(hashing.hash_u64(cfg.seed, 79, users))
    train, test = pairs[h >= cfg.holdout], pairs[h < cfg.holdout]
    if len(train) < 2:
        raise ValueError(
            f"{source.kind}: {len(train)} training item pairs after holding out "
            f"{cfg.holdout:.0%} of users; alignment needs more co-occurrences "
            "(or set embed.align=False)"
        )
    # A spread-out evaluation subset (all windows, all held-out users), not the first rows.
    pick = np.argsort(hashing.hash_u64(cfg.seed, 80, np.arange(len(test))))[: cfg.eval_pairs]
    test = test[np.sort(pick)]
    unseen = test[~np.isin(_pair_key(test, source.n_items), _pair_key(train, source.n_items))]
    report.update(pairs_train=len(train), pairs_heldout=len(test), pairs_unseen=len(unseen))

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
            # The same item twice in a batch is not a negative of itself: mask repeated b's in
            # the a -> b direction and repeated a's in the b -> a direction.
            eye = jnp.eye(batch, dtype=bool)
            same_b = (p[:, 1][None, :] == p[:, 1][:, None]) & ~eye
            same_a = (p[:, 0][None, :] == p[:, 0][:, None]) & ~eye
            labels = jnp.arange(batch)
            l1 = optax.softmax_cross_entropy_with_integer_labels(
                jnp.where(same_b, -1e9, logits), labels
            )
            l2 = optax.softmax_cross_entropy_with_integer_labels(
                jnp.where(same_a, -1e9, logits.T), labels
            )
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
        neighbour_recall_unseen_content=(
            None if content is None else neighbour_recall(content, unseen, k)
        ),
        neighbour_recall_unseen_aligned=neighbour_recall(aligned, unseen, k),
        neighbour_recall_unseen_fused=neighbour_recall(fused, unseen, k),
    )
    if funnel:  # held-out users' co-purchase pairs, whichever pairs were trained on
        bought, who = co_occurrence_pairs(source, cfg, "purchase")
        held = bought[hashing.unit53(hashing.hash_u64(cfg.seed, 79, who)) < cfg.holdout]
        pick = np.argsort(hashing.hash_u64(cfg.seed, 81, np.arange(len(held))))
        held = held[np.sort(pick[: cfg.eval_pairs])]
        report["pairs_copurchase_heldout"] = len(held)
        for name, e in (("content", content), ("aligned", aligned), ("fused", fused)):
            value = None if e is None else neighbour_recall(e, held, k)
            report[f"neighbour_recall_copurchase_{name}"] = value
    return fused.astype(np.float32), report
