"""What a run is made of, built the same way by `onerec train` and `onerec eval`: the semantic-id
table, the model, the optimizer, and a fresh or restored training state."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from onerec_jax import sharding
from onerec_jax.atomic import write_atomic
from onerec_jax.data import schema
from onerec_jax.data.sources import open_source
from onerec_jax.model.v1 import OneRecV1
from onerec_jax.model.v2 import OneRecV2
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import schema_spec, zero_batch
from onerec_jax.train.checkpointing import Checkpoints
from onerec_jax.train.model_factory import build_model
from onerec_jax.train.run_config import check_split, load_run_config, source_seed

TABLE_RECORD = "table.json"  # the fingerprint of a run's semantic-id table (`record_table`)


def table_dir(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """The run's semantic-id table: `tokenizer_dir`, or WORKDIR/tokenizer."""
    return pathlib.Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else workdir / "tokenizer"


def load_table(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, build: bool) -> SemanticIds:
    """The run's table; with `build`, WORKDIR/tokenizer is built first when it is missing (a
    given `tokenizer_dir` is never built: a wrong path must fail, not start a tokenizer)."""
    path = table_dir(cfg, workdir)
    if build and not cfg.tokenizer_dir and not (path / "semantic_ids.npz").exists():
        from onerec_jax.tokenizer import build as build_lib  # faiss-free but slow to import

        tcfg = build_lib.get_config()
        tcfg.seed = source_seed(cfg)
        tcfg.rq.n_codes = cfg.tokenizer_codes
        build_lib.tokenize(cfg.source, path, tcfg, progress=True)
    return SemanticIds.load(path)


def check_table(workdir: pathlib.Path, table: SemanticIds, path: pathlib.Path) -> None:
    """Refuse a table other than the one the run was trained with (its fingerprint is in
    WORKDIR/table.json, written by `record_table`; older runs have none and are not checked):
    a table of the same shape with other codes would be read silently as the wrong items."""
    record = workdir / TABLE_RECORD
    if not record.exists():
        return
    try:
        want = json.loads(record.read_text())
        want_sha, want_vocab = str(want["sha256"]), tuple(want["vocab"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record}: unreadable ({e}); restore it or use a new --workdir") from None
    if table.fingerprint() != want_sha:
        raise ValueError(
            f"{path}: not the semantic-id table this run was trained with (vocab "
            f"{table.vocab} sha256 {table.fingerprint()[:12]}; the run's: vocab {want_vocab} "
            f"sha256 {want_sha[:12]}, from {want.get('path')}, recorded in {record}); "
            "put that table back or start a new --workdir"
        )


def record_table(workdir: pathlib.Path, table: SemanticIds, path: pathlib.Path) -> None:
    """WORKDIR/table.json: the fingerprint of the run's table, written once (atomically)."""
    if not (workdir / TABLE_RECORD).exists():
        body = {"sha256": table.fingerprint(), "vocab": list(table.vocab)}
        body.update(n_items=table.n_items, path=str(path.resolve()))
        write_atomic(workdir / TABLE_RECORD, json.dumps(body, indent=2, sort_keys=True) + "\n")


def optimizer(
    cfg: ml_collections.ConfigDict,
) -> tuple[step_lib.OptimConfig, optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + cosine decay over the run's `steps` (onerec_jax/train/step.py)."""
    ocfg = step_lib.OptimConfig(total_steps=cfg.steps, **cfg.optim.to_dict())
    tx, schedule = step_lib.make_optimizer(ocfg)
    return ocfg, tx, schedule


def state_layout(
    cfg: ml_collections.ConfigDict,
    model: OneRecV1 | OneRecV2,
    tx: optax.GradientTransformation,
    n_levels: int,
    mesh: Mesh,
) -> tuple[Any, jax.Array, step_lib.TrainState, Any]:
    """How the training state lies on `mesh`, nothing allocated: (init function, its key, the
    abstract state, the state's shardings). Parameters by their logical names
    (onerec_jax/sharding.py), optimizer moments like their parameters, counters and MoE biases
    replicated."""
    zero = jax.tree.map(jnp.asarray, zero_batch(schema_spec(cfg), 2, n_levels))
    key = jax.random.key(cfg.seed)
    inputs = {k: v for k, v in zero.items() if k not in step_lib.NOT_MODEL_INPUTS}
    boxed = jax.eval_shape(model.init, key, inputs, zero["target_codes"])
    params = sharding.shardings(boxed["params"], mesh)
    rep = sharding.replicated(mesh)

    def init(k: jax.Array) -> step_lib.TrainState:
        return step_lib.init_state(model, tx, zero, k)

    abstract = jax.eval_shape(init, key)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, params, transform_non_params=lambda _: rep
    )
    moe_bias = jax.tree.map(lambda _: rep, abstract.moe_bias)
    shardings = step_lib.TrainState(step=rep, params=params, opt_state=opt, moe_bias=moe_bias)
    return init, key, abstract, shardings


def sharded_state(
    cfg: ml_collections.ConfigDict,
    model: OneRecV1 | OneRecV2,
    tx: optax.GradientTransformation,
    n_levels: int,
    mesh: Mesh,
) -> tuple[step_lib.TrainState, Any]:
    """The step-0 state (parameters initialised from `seed`, optimizer moments at zero)
    created already laid out on `mesh` (no device ever holds the whole state), and its
    shardings (`state_layout`). The values equal a one-device init's: JAX's counter-based RNG
    does not depend on the layout."""
    init, key, _, shardings = state_layout(cfg, model, tx, n_levels, mesh)
    with sharding.rules_on(mesh):
        state = jax.jit(init, out_shardings=shardings)(key)
    return state, shardings


def restore_target(
    cfg: ml_collections.ConfigDict,
    model: OneRecV1 | OneRecV2,
    tx: optax.GradientTransformation,
    n_levels: int,
    mesh: Mesh,
) -> tuple[Any, Any]:
    """What a checkpoint is restored onto, nothing allocated: the abstract state with each
    leaf's sharding on `mesh` (orbax reads every device's shard straight into place), and
    those shardings."""
    _, _, abstract, shardings = state_layout(cfg, model, tx, n_levels, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return target, shardings


@dataclasses.dataclass
class Run:
    """A run's parts, built from its config and workdir."""

    cfg: ml_collections.ConfigDict
    workdir: pathlib.Path
    source: Any  # the training split
    table: SemanticIds
    model: OneRecV1 | OneRecV2
    spec: schema.SchemaSpec


def training_source(cfg: ml_collections.ConfigDict, order_seed: int | None = None) -> Any:
    """The training split of a run's source; a logged source cut into sessions of at most
    `data.log_session_len` events (1: one example per event, its whole past as history).
    The world's requests come in the order of `order_seed` (default: the run's seed)."""
    return open_source(
        cfg.source,
        seed=source_seed(cfg),
        split="train",
        order_seed=cfg.seed if order_seed is None else order_seed,
        max_session_len=cfg.data.log_session_len,
    )


def open_run(
    cfg: ml_collections.ConfigDict, workdir: pathlib.Path, build_table: bool = False
) -> Run:
    """The training source, table and model of a run, checked against each other."""
    source = training_source(cfg)
    table = load_table(cfg, workdir, build_table)
    check_table(workdir, table, table_dir(cfg, workdir))
    if table.n_items != source.n_items:
        raise ValueError(
            f"tokenizer table {table_dir(cfg, workdir)} covers {table.n_items} items but "
            f"{cfg.source} has {source.n_items}"
        )
    model = build_model(cfg, source, table.vocab)
    return Run(cfg, workdir, source, table, model, schema_spec(cfg))


def run_mesh(cfg: ml_collections.ConfigDict, axes: Mapping[str, int] | None = None) -> Mesh:
    """The mesh a run is evaluated on, over all devices: `axes` ({"data": -1}, say), or the
    run's own `mesh` section. A run trained on 8 devices and read where there are 2 fails with
    a clear error naming both, not with a silently different layout: its `fsdp`/`tensor`
    split may be what makes it fit in memory, so choosing another mesh is the caller's call."""
    want = dict(axes) if axes is not None else cfg.mesh.to_dict()
    try:
        return sharding.make_mesh(want)
    except ValueError as e:
        if axes is not None:
            raise
        raise ValueError(
            f"the run's mesh {want} does not fit the {jax.device_count()} devices here ({e}); "
            "choose one that does, e.g. `onerec eval --mesh data=-1`"
        ) from None


def restore_latest(
    workdir: pathlib.Path, mesh: Mesh | None = None
) -> tuple[Run, step_lib.TrainState, int]:
    """A finished (or interrupted) run as `onerec eval` reads it: its config as saved, its
    parts, and the state of its newest checkpoint with that checkpoint's step, restored
    straight onto `mesh` (default: `run_mesh`, the run's own) in the layout of `state_layout`:
    orbax reads each device's shard into place and no state is initialised first, so a device
    never holds more than its share of the layout (the optimizer moments are restored too:
    the checkpoint is one item)."""
    cfg = load_run_config(workdir)
    check_split(cfg, workdir)
    run = open_run(cfg, workdir)
    mesh = run_mesh(cfg) if mesh is None else mesh
    _, tx, _ = optimizer(cfg)
    target, _ = restore_target(cfg, run.model, tx, run.table.n_levels, mesh)
    ckpt = Checkpoints(workdir / "checkpoints")
    try:
        # Past a corrupt newest checkpoint, with a warning; reading moves nothing.
        step, state = ckpt.restore_newest(lambda s: ckpt.restore_state(s, target), False)
        # (any process count: a run trained on N hosts evaluates on one)
        if state is None:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint to evaluate")
    finally:
        ckpt.close()
    return run, state, step
