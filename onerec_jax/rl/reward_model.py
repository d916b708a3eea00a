"""P-Score: a reward model of logged feedback, one tower per user context and candidate item.

The user tower is OneRec's user encoder (the same pathways and blocks as V1's, its own
weights), mean-pooled over the context's valid tokens; the item tower is an item-id embedding.
Their concatenation and product go through an MLP to one logit per label:

    play_frac   the played share of the video, min(play / duration, 1) (a soft label)
    like, follow, comment, share, dislike   the flags of the logged exposure

trained with binary cross-entropy on the target exposures of the training split.

On the e-commerce world (`tasks="mall"`) it is OneMall's multi-task ranking model: three chained
heads give P(click), P(cart | click) and P(order | cart), whose products P(cart) and P(order)
are fit on every exposure (ESMM's full-space training: no selection bias from fitting the
conditional rates on clicked items only); AUC is reported per task and per scenario, GMV is
price x P(order), and the fused score weighs P(click), P(cart), P(order) as the e-commerce
world's true reward does (MALL_REWARD_WEIGHTS). A product the request's scenario cannot show
scores 0, as it earns 0 in the world.

The fused
score is the labels' probabilities weighted as the world's true reward weighs the true
probabilities (REWARD_WEIGHTS), so on the world the two are on one scale and comparable.
`evaluate` reports per-label AUC and calibration (mean prediction / mean label) on held-out
requests and, on the world, the correlation of the fused score with the true expected reward
of the same (request, item) pairs: of the logged items, and of random catalogue items.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from onerec_jax.data import schema
from onerec_jax.feedback import LABELS, MALL_LABELS, MALL_WEIGHTS, WEIGHTS, labels, mall_labels
from onerec_jax.model.layers import Dense
from onerec_jax.model.user_encoder import EncoderConfig, UserEncoder

TASKS = {"video": (LABELS, WEIGHTS, labels), "mall": (MALL_LABELS, MALL_WEIGHTS, mall_labels)}


@dataclasses.dataclass(frozen=True)
class PScoreConfig:
    encoder: EncoderConfig
    hidden: int = 128
    tasks: str = "video"  # "video" (P-Score labels) | "mall" (click -> cart -> order)


def tasks_of(run: Any) -> str:
    """The label set a run's source logs: the e-commerce funnel (the e-commerce world, or a
    log with add-to-cart events) or the video labels."""
    from onerec_jax.tokenizer.embed import has_funnel

    return "mall" if has_funnel(run.source) else "video"


def _shown(source: Any, batch: dict, items: np.ndarray) -> np.ndarray | None:
    """Whether each item [B, N] can be shown in its request's scenario (the e-commerce world;
    the scenario from the request itself, so runs without `data.scenarios` are masked too);
    None where every item can be shown."""
    if not hasattr(source, "shown_in"):
        return None
    scen = source.request_scenario(batch["user_id"], batch["request_ts"])
    return source.shown_in(scen, np.maximum(items, 1))


def probabilities(logits: jax.Array, tasks: str) -> jax.Array:
    """Each label's probability: sigmoids, chained along the funnel for "mall"."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    return jnp.cumprod(p, axis=-1) if tasks == "mall" else p


class PScore(nn.Module):
    cfg: PScoreConfig

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], items_BxN: jax.Array) -> jax.Array:
        """Label logits [B, N, 6] of recommending items [B, N] to the batch's requests."""
        c = self.cfg
        mem, mask = UserEncoder(c.encoder, name="user")(batch)
        w = mask.astype(jnp.float32)[..., None]
        user_BxD = jnp.sum(mem * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
        item = nn.Embed(c.encoder.n_items + 1, c.encoder.d_model, name="item_embed")
        v_BxNxD = item(items_BxN)
        u_BxNxD = jnp.broadcast_to(user_BxD[:, None, :], v_BxNxD.shape)
        h = jnp.concatenate([u_BxNxD, v_BxNxD, u_BxNxD * v_BxNxD], -1)
        for i in range(2):  # two hidden layers, not a loop over tokens
            h = nn.gelu(Dense(c.hidden, ("embed", "mlp"), use_bias=True, name=f"mlp_{i}")(h))
        n_labels = len(TASKS[c.tasks][0])
        return Dense(n_labels, ("mlp", None), use_bias=True, name="out")(h)


def fused(logits: jax.Array, tasks: str = "video") -> jax.Array:
    """The P-Score: the labels' probabilities weighted as the world's reward weighs them."""
    w = jnp.asarray(TASKS[tasks][1]).reshape((1,) * (logits.ndim - 1) + (-1,))
    return jnp.sum(probabilities(logits, tasks) * w, -1)


def _chained_bce(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Binary cross-entropy of the chained probabilities p_j = prod_{i <= j} sigmoid(l_i),
    in log space: log p_j = sum log_sigmoid(l_i); log(1 - p_j) = log(-expm1(log p_j)). log p
    is floored at -1e-7 in value only (straight through), so a saturated wrong prediction
    (p ~ 1, label 0) keeps a gradient instead of a flat clamp."""
    log_p = jnp.cumsum(jax.nn.log_sigmoid(logits), axis=-1)
    floored = log_p - jax.lax.stop_gradient(log_p - jnp.minimum(log_p, -1e-7))
    log_q = jnp.log(-jnp.expm1(floored))
    return -(y * log_p + (1.0 - y) * log_q)


def loss(
    params: Any, model: PScore, batch: dict, y_BxMx6: jax.Array, known_BxMx6: jax.Array
) -> jax.Array:
    """Mean binary cross-entropy over the valid target exposures' known labels."""
    inputs = {k: v for k, v in batch.items() if not k.startswith("target_")}
    logits = model.apply({"params": params}, inputs, batch["target_item"]).astype(jnp.float32)
    if model.cfg.tasks == "mall":
        bce = _chained_bce(logits, y_BxMx6)
    else:
        bce = optax.sigmoid_binary_cross_entropy(logits, y_BxMx6)
    w = (batch["target_mask"][..., None] & known_BxMx6).astype(jnp.float32)
    return jnp.sum(bce * w) / jnp.maximum(jnp.sum(w), 1.0)


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC by ranks (ties share their mean rank); NaN when one class is absent."""
    y = np.asarray(y, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), np.float64)
    s = np.asarray(scores)[order]
    i = 0
    while i < len(s):  # tie groups (host-side evaluation, not a hot path)
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def encoder_of(run: Any) -> EncoderConfig:
    """The pre-trained run's encoder sizes (V1's encoder, V2's context pathways)."""
    c = run.model.cfg
    return c.encoder if hasattr(c, "encoder") else c.context


def data_of(run: Any) -> dict[str, Any]:
    """What a reward model must share with a run it scores: the source, the world's seed, the
    catalogue and the context's sizes (not remat / unroll, which a run may change)."""
    from onerec_jax.train.run_config import source_seed

    enc = dataclasses.replace(encoder_of(run), remat="none", unroll=False)
    return {
        "source": str(run.cfg.source),
        "source_seed": source_seed(run.cfg),
        "n_items": int(run.source.n_items),
        "encoder": dataclasses.asdict(enc),
    }


def _inputs(batch: dict) -> dict:
    """The user tower's inputs of a batch (no targets, no raw ids)."""
    skip = ("user_id", "request_ts")
    return {k: v for k, v in batch.items() if not k.startswith("target_") and k not in skip}


def make_scorer(model: PScore, objective: str = "reward"):
    """Jitted (params, batch, items [B, N]) -> [B, N]: the fused P-Score ("reward") or, of a
    ranking model of the e-commerce world, P(order) ("gmv": the caller multiplies by price)."""

    @jax.jit
    def score(params: Any, batch: dict, items: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, _inputs(batch), items)
        if objective == "gmv":
            return probabilities(logits, model.cfg.tasks)[..., MALL_LABELS.index("order")]
        return fused(logits, model.cfg.tasks)

    return score


def train(
    run: Any, steps: int, batch_size: int, learning_rate: float, seed: int, progress: Any = None
) -> tuple[PScore, Any, list[float]]:
    """Fit a P-Score on the run's training split; returns (model, params, losses per step)."""
    from onerec_jax.data import pipeline

    tasks = tasks_of(run)
    model = PScore(PScoreConfig(encoder_of(run), tasks=tasks))
    ds = pipeline.make_dataset(
        run.source, run.spec, pipeline.PipelineConfig(batch_size=batch_size, seed=seed)
    )
    data = iter(ds)
    first = next(data)
    x = {k: jnp.asarray(v) for k, v in _inputs(first).items()}
    params = jax.jit(model.init)(jax.random.key(seed), x, jnp.asarray(first["target_item"]))
    params = nn.unbox(params)["params"]
    tx = optax.adamw(learning_rate, weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, y, known):
        value, grads = jax.value_and_grad(loss)(params, model, batch, y, known)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    history = []
    host = first
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in host.items() if k not in ("user_id", "request_ts")}
        y, known = TASKS[tasks][2](host)
        params, opt, value = step(params, opt, batch, jnp.asarray(y), jnp.asarray(known))
        history.append(float(value))
        if progress is not None:
            progress(i + 1, history[-1])
        host = next(data)
    return model, params, history


def evaluate(run: Any, model: PScore, params: Any, n_requests: int, seed: int = 0) -> dict:
    """Per-label AUC and calibration on the validation split's first `n_requests` requests'
    logged target exposures; on the world, the Pearson correlation of the fused score with the
    true expected reward for those items and for random catalogue items."""
    from onerec_jax.data.sources import open_source
    from onerec_jax.evaluate import true_reward
    from onerec_jax.train.run_config import source_seed

    src = open_source(run.cfg.source, seed=source_seed(run.cfg), split="validation")
    n = min(n_requests, len(src)) if src.kind != "world" else n_requests
    ragged = src.raw_batch(np.arange(n), run.spec.history_window, run.spec)
    raw = schema.build_batch(ragged, run.spec)
    score = make_scorer(model)
    x = {k: jnp.asarray(v) for k, v in _inputs(raw).items()}
    logits = model.apply({"params": params}, x, jnp.asarray(raw["target_item"]))
    tasks = model.cfg.tasks
    names, _, labels_of = TASKS[tasks]
    valid = raw["target_mask"]
    y_all, known_all = labels_of(raw)
    y, known = y_all[valid], known_all[valid]
    p = np.asarray(probabilities(logits, tasks))[valid]
    out: dict[str, Any] = {"requests": int(n), "exposures": int(valid.sum())}
    # A label the source does not log (MovieLens: play time, follow, comment, share) has no
    # AUC or calibration: it is named in `labels_without_signal`, not reported as NaN (which
    # is not JSON).
    out["labels_without_signal"] = []
    for j, name in enumerate(names):
        k = known[:, j]
        target = y[k, j] >= 0.5 if name == "play_frac" else y[k, j] > 0
        a = auc(p[k, j], target)
        if not np.isfinite(a):
            out["labels_without_signal"].append(name)
            continue
        out[f"auc/{name}"] = a
        out[f"calibration/{name}"] = float(p[k, j].mean() / y[k, j].mean())
    if "scenario" in ragged:  # e-commerce: every task's AUC in every scenario
        scen = np.broadcast_to(np.asarray(ragged["scenario"])[:, None], valid.shape)[valid]
        # The ceiling: the world's exact probabilities of the same exposures, ranked alike.
        e = src.true_engagement(
            raw["user_id"], raw["request_ts"], np.maximum(raw["target_item"], 1)
        )
        for j, name in enumerate(names):
            out[f"auc_true_probability/{name}"] = auc(e[name][valid], y[:, j] > 0)
        for i, sname in enumerate(schema.SCENARIOS, start=1):
            for j, name in enumerate(names):
                a = auc(p[scen == i, j], y[scen == i, j] > 0)
                if np.isfinite(a):
                    out[f"auc/{name}/{sname}"] = a
    if src.kind == "world":
        items = np.where(valid, raw["target_item"], 0)
        s_logged = np.asarray(score(params, x, jnp.asarray(np.maximum(items, 1))))
        t_logged = true_reward(src, raw, items)
        rnd = np.random.default_rng(seed).integers(1, src.n_items + 1, (n, 8))
        s_rnd = np.asarray(score(params, x, jnp.asarray(rnd)))
        shown = _shown(src, raw, rnd)  # the score the reward uses: 0 where it cannot be shown
        s_rnd = s_rnd if shown is None else np.where(shown, s_rnd, 0.0)
        t_rnd = true_reward(src, raw, rnd)
        out["corr_true_reward/logged"] = float(np.corrcoef(s_logged[valid], t_logged[valid])[0, 1])
        out["corr_true_reward/random"] = float(np.corrcoef(s_rnd.ravel(), t_rnd.ravel())[0, 1])
    return out


def save(directory: Any, model: PScore, params: Any, meta: dict) -> None:
    """params.msgpack and reward_model.json (its config and `meta`), each written whole."""
    import json
    import pathlib

    from flax import serialization

    from onerec_jax.atomic import write_atomic

    d = pathlib.Path(directory)
    cfg = {
        "encoder": dataclasses.asdict(model.cfg.encoder),
        "hidden": model.cfg.hidden,
        "tasks": model.cfg.tasks,
    }
    write_atomic(d / "params.msgpack", serialization.to_bytes(params))
    write_atomic(d / "reward_model.json", json.dumps({"config": cfg, **meta}, indent=2))


def load(directory: Any) -> tuple[PScore, Any, dict]:
    """(model, params, its reward_model.json) of a directory written by `save`."""
    import json
    import pathlib

    from flax import serialization

    d = pathlib.Path(directory)
    meta_path = d / "reward_model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{d}: no reward model here (reward_model.json missing)")
    meta = json.loads(meta_path.read_text())
    enc = meta["config"]["encoder"]
    tasks = meta["config"].get("tasks", "video")  # models saved before the field: video
    model = PScore(PScoreConfig(EncoderConfig(**enc), meta["config"]["hidden"], tasks))
    ids = jnp.zeros((1, 1), jnp.int32)
    spec = schema.SchemaSpec(
        short_len=enc["short_len"],
        pos_len=enc["pos_len"],
        life_len=enc["life_len"],
        scenarios=enc.get("n_scenarios", 0) > 0,
        **{f"{b}_len": enc.get(f"{b}_len", 0) for b in schema.BEHAVIOURS},
    )
    x = _inputs({k: np.zeros((1, *shape), dt) for k, (shape, dt) in spec.shapes().items()})
    target = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, ids))["params"]
    try:
        params = serialization.from_bytes(target, (d / "params.msgpack").read_bytes())
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(
            f"{d / 'params.msgpack'}: not this reward model's parameters ({e})"
        ) from None
    shapes = jax.tree.map(lambda a, t: a.shape == t.shape, params, target)
    if not all(jax.tree.leaves(shapes)):
        raise ValueError(f"{d / 'params.msgpack'}: parameter shapes differ from its config")
    return model, jax.device_put(params), meta


def scorer_for(directory: str, run: Any, objective: str = "reward"):
    """`(host batch, items [B, N]) -> score [B, N]` (NaN for item 0) of the reward model in
    `directory`, or None for ""; refused if it was fit on another catalogue or context. The
    score is the fused P-Score ("reward") or the expected GMV, price x P(order) ("gmv": a
    ranking model of the e-commerce world, whose catalogue gives the prices)."""
    if not directory:
        return None
    model, params, meta = load(directory)
    if objective == "gmv" and (model.cfg.tasks != "mall" or not hasattr(run.source, "price")):
        raise ValueError(
            f"{directory}: objective 'gmv' needs a ranking model of the e-commerce world "
            f"(click -> cart -> order heads) and a source with prices; this one has tasks "
            f"{model.cfg.tasks!r} on {run.cfg.source}"
        )
    saved = dict(meta.get("data") or {})
    if "encoder" in saved:  # fields added since it was saved: their defaults, as it ran
        saved["encoder"] = dataclasses.asdict(EncoderConfig(**saved["encoder"]))
    if saved != data_of(run):
        raise ValueError(
            f"{directory}: this reward model was fit on another catalogue or context "
            "than the run being aligned; fit one on it (onerec reward-model --init INIT)"
        )
    score = make_scorer(model, objective)

    def rm_score(host: dict, items: np.ndarray) -> np.ndarray:
        batch = {k: jnp.asarray(v) for k, v in host.items() if not k.startswith("target_")}
        s = np.asarray(score(params, batch, jnp.asarray(np.maximum(items, 1))), np.float64)
        if objective == "gmv":
            s = s * run.source.price[np.maximum(items, 1)]
        shown = _shown(run.source, host, items)  # what a scenario cannot show earns 0
        s = s if shown is None else np.where(shown, s, 0.0)
        return np.where(items > 0, s, np.nan)

    return rm_score
