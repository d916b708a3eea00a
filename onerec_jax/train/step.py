"""The pure train step: `train_step(state, batch, rng, capacity=None) -> (state, metrics)`.

AdamW with linear warmup + cosine decay and global-norm clipping; float32 parameters with an
optional bf16 compute dtype (the model's `dtype`); gradient accumulation over `grad_accum`
micro-batches with `lax.scan`, each weighted by its number of valid target items so the update
equals the full-batch one. MoE loss-free balancing updates the per-expert bias from the
measured load after the gradient step, outside the gradient.

`batch` holds the schema fields (onerec_jax/data/schema.py) plus `target_codes` [B, M, Q] int32
(the tokenizer's codes of target_item; -1 rows for padding).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from onerec_jax import sharding
from onerec_jax.model import moe as moe_lib
from onerec_jax.train.loss import loss_fn

NOT_MODEL_INPUTS = ("user_id", "request_ts", "target_codes")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3  # peak, after warmup
    warmup_steps: int = 100
    total_steps: int = 10_000  # cosine decays to `final_fraction` * peak at this step
    final_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # global gradient norm
    grad_accum: int = 1  # micro-batches per step
    aux_loss_weight: float = 0.01  # used when the MoE balances with the auxiliary loss
    moment_dtype: str = "float32"  # AdamW moments between steps: "float32" | "bfloat16"


# Weight decay applies to the matmul weights only. Norm scales, biases, embedding tables, learned
# positions and QFormer queries are not decayed (the usual practice: decaying a norm scale or an
# embedding row pulls it towards 0, which is not a regulariser but a bias towards dead features).
DECAYED_PARAMS = frozenset(
    {"kernel", "query", "key", "value", "out", "w_gate", "w_up", "w_down", "router"}
)
NOT_DECAYED_PARAMS = frozenset(
    {"scale", "bias", "embedding", "positions", "dec_positions", "queries"}
)


def decay_mask(params: Any) -> Any:
    """True for the leaves that AdamW decays (see DECAYED_PARAMS); an unknown name is an error,
    so a new parameter kind cannot silently change the optimiser."""

    def leaf(path: tuple, _: Any) -> bool:
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if name in DECAYED_PARAMS:
            return True
        if name in NOT_DECAYED_PARAMS:
            return False
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ValueError(f"parameter {where}: no weight-decay rule for {name!r} (train/step.py)")

    return jax.tree_util.tree_map_with_path(leaf, params)


MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def stored_in(dtype: jnp.dtype, adam: optax.GradientTransformation) -> optax.GradientTransformation:
    """`adam` (optax.scale_by_adam) with its moments stored in `dtype` between steps.

    Both moments are widened to float32 before the update and rounded once after it, so the
    step is computed in float32 and only the storage is narrow (optax's `mu_dtype` narrows the
    first moment alone; a second moment only initialised narrow would be scaled by b2 in the
    narrow dtype, rounding once more per step). The state
    keeps scale_by_adam's type and its params-shaped `mu` / `nu`, so `optax.tree_map_params`
    (the sharding of onerec_jax/train/state.py) and checkpoints see the same tree.

    Rounding bounds b2: bf16 keeps 8 significant bits (relative spacing 2^-8, about 0.004). With
    b2 = 0.95 a step moves nu by ~5 % at steady state, far above it; with b2 = 0.999 the ~0.1 %
    move would round away and nu would stall."""

    def cast(state: Any, to: jnp.dtype) -> Any:
        return state._replace(mu=optax.tree.cast(state.mu, to), nu=optax.tree.cast(state.nu, to))

    def init(params: Any) -> Any:
        return cast(adam.init(params), dtype)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = adam.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def adamw(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax.adamw, its moments stored in `cfg.moment_dtype`."""
    if cfg.moment_dtype not in MOMENT_DTYPES:
        raise ValueError(
            f"config field optim.moment_dtype: {cfg.moment_dtype!r} is not one of "
            f"{tuple(MOMENT_DTYPES)}"
        )
    if cfg.moment_dtype == "float32":
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    if 1 - cfg.b2 < 0.02:  # see `stored_in`: below ~2 % a step rounds away in bf16
        raise ValueError(
            f"config field optim.moment_dtype: bfloat16 moments need optim.b2 <= 0.98 (got "
            f"{cfg.b2}): bf16 rounds away second-moment steps smaller than ~0.4 %"
        )
    # optax.adamw's own chain with the Adam scaling swapped: the same state tree.
    adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2)
    return optax.chain(
        stored_in(MOMENT_DTYPES[cfg.moment_dtype], adam),
        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        max(cfg.warmup_steps, 1),
        max(cfg.total_steps, cfg.warmup_steps + 1),
        cfg.learning_rate * cfg.final_fraction,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        adamw(cfg, schedule),
    )
    return tx, schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    moe_bias: Any  # the "moe_bias" collection ({} for dense models)


def init_state(model: Any, tx: optax.GradientTransformation, batch: dict, key: jax.Array):
    """A fresh state (unboxed float32 parameters) for `model` on inputs shaped like `batch`."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    # Jitted: op-by-op initialisation of a model this size takes seconds of dispatch.
    boxed = jax.jit(model.init)(key, inputs, batch["target_codes"])
    # Every parameter must name its axes by the rules table, or no mesh could lay it out.
    sharding.check_logical(boxed["params"])
    variables = nn.unbox(boxed)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        moe_bias=variables.get("moe_bias", {}),
    )


def token_capacity(target_codes: np.ndarray, grad_accum: int = 1, buckets: int = 4) -> int | None:
    """The decoder positions a train step of this batch must compute (`OneRecV1.__call__`'s
    `capacity`): the real target tokens of its fullest micro-batch, rounded up to a multiple of
    1/`buckets` of a micro-batch's positions, so that at most `buckets` shapes are compiled.
    None when that is every position (nothing to skip). Host-side (numpy): the capacity is a
    shape, static in the jitted step."""
    codes = np.asarray(target_codes)
    b, m, q = codes.shape
    valid = np.all(codes >= 0, axis=-1).reshape(grad_accum, -1).sum(axis=1)
    positions = b // grad_accum * m * q
    step = -(-positions // buckets)
    capacity = max(int(-(-int(valid.max()) * q // step) * step), step)
    return None if capacity >= positions else capacity


def _micro_loss(params, moe_bias, model, batch, aux_weight, capacity=None):
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    nll, stats = model.apply(
        {"params": params, "moe_bias": moe_bias}, inputs, batch["target_codes"], capacity
    )
    valid = batch["target_mask"] & jnp.all(batch["target_codes"] >= 0, axis=-1)
    loss, metrics = loss_fn(nll, valid, model.cfg.loss)
    if capacity is not None:
        # A capacity below the real tokens would drop loss terms silently: NaN instead, which
        # the loop stops on (`token_capacity` never gives one).
        tokens = jnp.sum(jnp.all(batch["target_codes"] >= 0, axis=-1)) * nll.shape[-1]
        loss = metrics["loss"] = jnp.where(tokens > capacity, jnp.nan, loss)
    total = loss
    moe_cfg = getattr(model.cfg, "moe", None)
    if stats is not None:
        metrics["moe_load"] = stats["load"]  # [layers, E]
        metrics["moe_dropped"] = jnp.mean(stats["dropped"])
        metrics["moe_aux_loss"] = jnp.mean(stats["aux_loss"])
        if moe_cfg is not None and moe_cfg.balance == "aux_loss":
            total = total + aux_weight * metrics["moe_aux_loss"]
    # Weighted by valid items so micro-batch gradients add up to the full-batch gradient.
    return total * metrics["items"], metrics


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    capacity: int | None = None,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: OptimConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. `capacity` (static; `token_capacity` of this batch, or None): the decoder's
    dense FFNs and head run on that many positions per micro-batch, the padding left out."""
    del rng  # the models have no dropout yet; kept in the signature for the loop's contract
    a = cfg.grad_accum
    b = batch["target_codes"].shape[0]
    if b % a:
        raise ValueError(f"batch size {b} is not divisible by grad_accum {a}")
    micro = jax.tree.map(lambda x: x.reshape((a, b // a, *x.shape[1:])), batch)
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def body(carry, mb):
        (g_sum,) = carry
        (_, m), g = grad_fn(state.params, state.moe_bias, model, mb, cfg.aux_loss_weight, capacity)
        return (jax.tree.map(jnp.add, g_sum, g),), m

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (g_sum,), ms = jax.lax.scan(body, (zeros,), micro)
    items = jnp.sum(ms["items"])
    grads = jax.tree.map(lambda g: g / jnp.maximum(items, 1.0), g_sum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    w = ms["items"] / jnp.maximum(items, 1.0)
    metrics = {
        "train/loss": jnp.sum(ms["loss"] * w),
        "train/items": items,
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step),
    }
    per_level = jnp.sum(ms["nll_per_level"] * w[:, None], axis=0)
    for i in range(per_level.shape[0]):
        metrics[f"train/nll_level{i}"] = per_level[i]
    moe_bias = state.moe_bias
    if "moe_load" in ms:
        # The MoE measures over valid tokens only (padding does not route); weighting each
        # micro-batch by its valid items (tokens are items x Q) gives the full batch's numbers,
        # a micro-batch of padding alone counting for nothing.
        load = jnp.sum(ms["moe_load"] * w[:, None, None], axis=0)  # [layers, E]
        metrics["moe/max_load"] = jnp.max(load) * load.shape[-1]
        metrics["moe/dropped"] = jnp.sum(ms["moe_dropped"] * w)
        metrics["moe/aux_loss"] = jnp.sum(ms["moe_aux_loss"] * w)
        if model.cfg.moe.balance == "loss_free":
            rate = model.cfg.moe.bias_rate
            moe_bias = _update_biases(moe_bias, load, rate)
    state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, moe_bias=moe_bias
    )
    return state, metrics


def dropless(model: Any) -> Any:
    """The same model (same parameters) with its MoE routed dropless: evaluation must not drop
    tokens, or a request's loss would depend on the other requests of its batch."""
    moe = getattr(model.cfg, "moe", None)
    if moe is None or moe.dispatch == "dropless":
        return model
    cfg = dataclasses.replace(model.cfg, moe=dataclasses.replace(moe, dispatch="dropless"))
    return type(model)(cfg, dtype=model.dtype)


def eval_loss(
    state: TrainState, batch: dict[str, jax.Array], *, model: Any
) -> dict[str, jax.Array]:
    """Teacher-forced loss of a batch (no update), per request: `loss_sum` [B] (the summed
    per-item loss of its valid target items) and `items` [B] (their number), so the caller can
    form the item-weighted mean and its standard error over requests. The MoE is routed
    dropless (`dropless`), so each request's loss is its own."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    model = dropless(model)
    nll, _ = model.apply(
        {"params": state.params, "moe_bias": state.moe_bias}, inputs, batch["target_codes"]
    )
    valid = batch["target_mask"] & jnp.all(batch["target_codes"] >= 0, axis=-1)
    nll_BxM = jnp.sum(nll, -1) if model.cfg.loss == "sum" else jnp.mean(nll, -1)
    w_BxM = valid.astype(jnp.float32)
    return {"loss_sum": jnp.sum(nll_BxM * w_BxM, -1), "items": jnp.sum(w_BxM, -1)}


def _update_biases(tree: Any, load_LxE: jax.Array, rate: float) -> Any:
    """Apply the loss-free update to the (single, layer-stacked) bias leaf of the collection."""
    leaves, treedef = jax.tree.flatten(tree)
    if len(leaves) != 1:
        raise ValueError(f"expected one stacked MoE bias, found {len(leaves)} leaves")
    return jax.tree.unflatten(treedef, [moe_lib.update_bias(leaves[0], load_LxE, rate)])


def jit_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: OptimConfig,
    mesh: Any = None,
    state_shardings: Any = None,
):
    """train_step jitted with the state donated (its buffers are reused for the new state) and
    its `capacity` (4th argument, optional) static.

    With a mesh: the state keeps `state_shardings`, the batch is split over the mesh's batch
    axes, and the model runs under the logical-axis rules (onerec_jax/sharding.py)."""
    fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule, cfg=cfg)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0, static_argnums=3)
    rep = sharding.replicated(mesh)
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
        static_argnums=3,
    )
    return _UnderRules(jitted, mesh)


class _UnderRules:
    """A jitted function traced (on its first call, or when lowered) under the mesh and the
    logical-axis rules, so the model's activation constraints take effect."""

    def __init__(self, jitted: Any, mesh: Any):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any) -> Any:
        with sharding.rules_on(self.mesh):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with sharding.rules_on(self.mesh):
            return self.jitted.lower(*args)
