"""The training loop: resumable, preemptible, and honest about failures.

`train(cfg, workdir)`:
  - loads (or builds, into WORKDIR/tokenizer) the semantic-id table and checks its vocabulary
    against the config's model;
  - restores the newest checkpoint in WORKDIR/checkpoints if there is one (params, optimizer,
    MoE biases and the grain iterator state, saved together by orbax), so a restarted run simply
    continues;
  - dispatches step N before reading step N-1's metrics (the host never waits on the device
    except at logs and saves); a NaN/Inf loss stops the run with an error that names the step
    and the last good checkpoint, and no checkpoint is written after it;
  - SIGTERM (preemption) saves the current step and returns cleanly;
  - measures the teacher-forced loss of the state after step s on the first `eval_requests`
    requests of the validation split every `eval_every` steps and at the end (eval/loss, with its
    standard error over requests, eval/loss_se);
  - warns when the sample budget (steps x batch_size) exceeds the distinct requests of the
    training split, i.e. when the run repeats data;
  - writes TensorBoard scalars (train/, eval/, perf/, moe/), metrics.jsonl, and summary.json
    (parameters total/active/non-embedding, analytic FLOPs per sample and in total, samples
    and tokens seen across restarts, final train and validation loss).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import signal
import sys
import time
import warnings
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from onerec_jax import flops
from onerec_jax.data import pipeline, schema
from onerec_jax.data.sources import distinct_requests, open_source, repeat_warning
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.user_encoder import EncoderConfig
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Config
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import step as step_lib
from onerec_jax.train.logging import MetricWriter


class AddCodes(grain.transforms.Map):
    """Adds `target_codes` [B, M, Q] (the table's codes of target_item; -1 rows for padding)."""

    def __init__(self, codes: np.ndarray):
        self.codes = codes

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["target_codes"] = self.codes[batch["target_item"]]
        return batch


def source_seed(cfg: ml_collections.ConfigDict) -> int:
    """The seed of the run's data source (the world itself): `world_seed`, or `seed` when it is
    -1. Fixing `world_seed` lets runs of different seeds share one world and one tokenizer
    table while their init and example order differ."""
    ws = cfg.get("world_seed", -1)
    return int(cfg.seed if ws < 0 else ws)


def _table(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> SemanticIds:
    path = pathlib.Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else workdir / "tokenizer"
    if cfg.tokenizer_dir or (path / "semantic_ids.npz").exists():
        return SemanticIds.load(path)
    from onerec_jax.tokenizer import build

    tcfg = build.get_config()
    tcfg.seed = source_seed(cfg)
    tcfg.rq.n_codes = cfg.tokenizer_codes
    build.tokenize(cfg.source, path, tcfg, progress=True)
    return SemanticIds.load(path)


def build_model(
    cfg: ml_collections.ConfigDict, source: Any, vocab: tuple[int, ...]
) -> OneRecV1 | OneRecV2:
    """The model a config names (`model.family` v1 | v2) for a source's catalogue and a table's
    vocabulary."""
    m = cfg.model
    if m.family not in ("v1", "v2"):
        raise ValueError(f"model.family must be 'v1' or 'v2', got {m.family!r}")
    v2 = m.family == "v2"
    enc = EncoderConfig(
        # V2's context processor may be narrower than its decoder.
        d_model=(m.context_dim or m.d_model) if v2 else m.d_model,
        n_layers=m.enc_layers,
        n_heads=(m.context_heads or m.n_heads) if v2 else m.n_heads,
        d_ff=(m.context_ff or m.d_ff) if v2 else m.d_ff,
        n_queries=m.n_queries,
        qformer_blocks=m.qformer_blocks,
        ffn=m.ffn,
        author_dim=m.author_dim,
        feature_dim=m.feature_dim,
        n_items=source.n_items,
        n_authors=source.n_authors,
        n_tags=source.n_tags,
        short_len=cfg.data.short_len,
        pos_len=cfg.data.pos_len,
        life_len=cfg.data.life_len,
    )
    moe = None
    if m.moe_experts:
        moe = MoEConfig(
            n_experts=m.moe_experts,
            top_k=m.moe_top_k,
            d_ff=m.moe_d_ff or m.d_ff,
            n_shared=m.moe_shared,
            dispatch=m.moe_dispatch,
        )
    dtype = jnp.bfloat16 if cfg.bf16 else jnp.float32
    if v2:
        v2cfg = V2Config(
            context=enc,
            n_layers=m.dec_layers,
            d_model=m.d_model,
            n_heads=m.n_heads,
            d_ff=m.d_ff,
            ffn=m.ffn,
            moe=moe,
            first_dense=m.first_dense,
            vocab=tuple(vocab),
            max_targets=cfg.data.max_targets,
            loss=m.loss,
            l_kv=m.l_kv,
            s_kv=m.s_kv,
            g_kv=m.g_kv,
        )
        return OneRecV2(v2cfg, dtype=dtype)
    v1 = V1Config(
        encoder=enc,
        dec_layers=m.dec_layers,
        n_heads=m.n_heads,
        d_ff=m.d_ff,
        ffn=m.ffn,
        moe=moe,
        vocab=tuple(vocab),
        max_targets=cfg.data.max_targets,
        session_wise=m.session_wise,
        loss=m.loss,
    )
    return OneRecV1(v1, dtype=dtype)


def schema_spec(cfg: ml_collections.ConfigDict) -> schema.SchemaSpec:
    d = cfg.data
    return schema.SchemaSpec(
        short_len=d.short_len, pos_len=d.pos_len, life_len=d.life_len, max_targets=d.max_targets
    )


def zero_batch(spec: schema.SchemaSpec, b: int, q: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((b, *shape), dt) for k, (shape, dt) in spec.shapes().items()}
    out["target_codes"] = np.zeros((b, spec.max_targets, q), np.int32)
    return out


def validation_batches(
    cfg: ml_collections.ConfigDict, spec: schema.SchemaSpec, codes: np.ndarray
) -> tuple[list[dict[str, jax.Array]], int]:
    """The first `eval_requests` requests of the validation split (all of a smaller split), in
    batches of batch_size; the last batch is padded with requests whose targets are masked, so
    every batch has one compiled shape and the padding carries no loss."""
    src = open_source(cfg.source, seed=source_seed(cfg), split="validation")
    b = cfg.batch_size
    n = min(cfg.eval_requests, distinct_requests(src))
    add_codes, out = AddCodes(codes), []
    for start in range(0, n, b):
        idx = np.arange(start, min(start + b, n))
        pad = b - len(idx)
        idx = np.concatenate([idx, np.full(pad, idx[-1])])
        batch = schema.build_batch(src.raw_batch(idx, spec.history_window, spec), spec)
        if pad:
            # Item 0 gives -1 codes, so the padding is no target for the loss nor the MoE.
            batch["target_mask"][b - pad :] = False
            batch["target_item"][b - pad :] = 0
        out.append(jax.tree.map(jnp.asarray, add_codes.map(batch)))
    return out, n


def mean_and_stderr(loss_sums: np.ndarray, items: np.ndarray) -> tuple[float, float]:
    """Item-weighted mean loss over requests and its standard error.

    The mean is a ratio sum(l_r) / sum(n_r) of per-request loss sums and valid-item counts;
    its standard error is the delta-method one, sqrt(sum((l_r - mean * n_r)^2) * R / (R - 1))
    / sum(n_r) over the R requests that have a valid item.
    """
    keep = items > 0
    sums, n = loss_sums[keep].astype(np.float64), items[keep].astype(np.float64)
    if not len(n):
        return float("nan"), float("nan")
    mean = sums.sum() / n.sum()
    r = len(n)
    if r < 2:
        return float(mean), float("nan")
    se = np.sqrt(np.sum((sums - mean * n) ** 2) * r / (r - 1)) / n.sum()
    return float(mean), float(se)


# Config fields added after runs already existed, with the values that reproduce what those
# runs did. A run's config.json that lacks one is read as if it held this value, so older
# workdirs still evaluate and resume.
ADDED_FIELDS: dict[str, Any] = {
    "rung": "",
    "world_seed": -1,
    "eval_every": 0,
    "model.family": "v1",
    "model.ffn": "swiglu",
    "model.qformer_blocks": 1,
    "model.moe_d_ff": 0,
    "model.moe_shared": 0,
    "model.moe_dispatch": "dropless",
    "model.first_dense": 0,
    "model.context_dim": 0,
    "model.context_heads": 0,
    "model.context_ff": 0,
    "model.l_kv": 1,
    "model.s_kv": 1,
    "model.g_kv": 0,
}


def upgrade_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with every field of `ADDED_FIELDS` it lacks filled in, and renamed
    fields under their new names."""
    out = json.loads(json.dumps(saved))
    # eval_batches (batches of batch_size validation requests) became eval_requests.
    if "eval_requests" not in out:
        out["eval_requests"] = out.pop("eval_batches", 0) * out.get("batch_size", 0)
    # World runs from before the per-user time cut (they have no world_seed, added with it)
    # drew every split from the same requests; `check_split` refuses them.
    if "world_split" not in out:
        old_world = str(out.get("source", "")).startswith("world:") and "world_seed" not in saved
        out["world_split"] = "hash" if old_world else "time_cut"
    for dotted, value in ADDED_FIELDS.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node.setdefault(leaf, value)
    return out


def check_split(cfg: Any, workdir: str | os.PathLike) -> None:
    """Refuse a run trained on the world's old splits: its validation and test requests overlap
    its training requests, so nothing measured on them is held out."""
    if cfg.get("world_split", "time_cut") != "time_cut":
        raise ValueError(
            f"{workdir}: this run was trained on the world's old hash-stream splits, whose "
            "validation/test requests overlap the training requests, so its held-out numbers "
            "are not held out; train it again in a new --workdir"
        )


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run was started with (WORKDIR/config.json), upgraded to current fields."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir}: no run here (config.json missing)")
    return ml_collections.ConfigDict(upgrade_config(json.loads(path.read_text())))


def _check_workdir_config(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    path = workdir / "config.json"
    text = cfg.to_json(indent=2, sort_keys=True) + "\n"
    if path.exists():
        old = upgrade_config(json.loads(path.read_text()))
        check_split(old, workdir)
        new = json.loads(text)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        # Only the step budget may change between a run and its resumption.
        changed = [k for k in changed if k != "steps"]
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {changed}); "
                "use a new --workdir or the same config"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training; returns the summary written to WORKDIR/summary.json."""
    workdir = pathlib.Path(workdir).resolve()  # orbax needs absolute paths
    if cfg.get("rung"):
        from scaling import ladder

        cfg = ladder.apply_rung(ml_collections.ConfigDict(cfg.to_dict()), cfg.rung)
    check_split(cfg, workdir)
    _check_workdir_config(cfg, workdir)
    source = open_source(cfg.source, seed=source_seed(cfg), split="train", order_seed=cfg.seed)
    table = _table(cfg, workdir)
    if table.n_items != source.n_items:
        raise ValueError(
            f"tokenizer table covers {table.n_items} items but {cfg.source} has {source.n_items}"
        )
    model = build_model(cfg, source, table.vocab)
    spec = schema_spec(cfg)
    repeats = repeat_warning(source, cfg.steps * cfg.batch_size)
    if repeats:
        warnings.warn(f"{workdir}: {repeats}", stacklevel=2)
    ocfg = step_lib.OptimConfig(
        learning_rate=cfg.optim.learning_rate,
        warmup_steps=cfg.optim.warmup_steps,
        total_steps=cfg.steps,
        weight_decay=cfg.optim.weight_decay,
        clip_norm=cfg.optim.clip_norm,
        grad_accum=cfg.optim.grad_accum,
    )
    tx, schedule = step_lib.make_optimizer(ocfg)
    q = table.n_levels
    state = step_lib.init_state(
        model, tx, jax.tree.map(jnp.asarray, zero_batch(spec, 2, q)), jax.random.key(cfg.seed)
    )
    counts = flops.counts(model)
    val, n_eval = validation_batches(cfg, spec, table.codes) if cfg.eval_requests else ([], 0)
    eval_fn = jax.jit(functools.partial(step_lib.eval_loss, model=model))

    def run_eval(state: Any) -> tuple[float, float]:
        """Validation loss of `state` and its standard error over requests."""
        out = [eval_fn(state, vb) for vb in val]
        sums = np.concatenate([np.asarray(m["loss_sum"]) for m in out])
        items = np.concatenate([np.asarray(m["items"]) for m in out])
        return mean_and_stderr(sums, items)

    ds = pipeline.make_dataset(
        source,
        spec,
        pipeline.PipelineConfig(batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers),
        transform=AddCodes(table.codes),
    )
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    mngr = ocp.CheckpointManager(
        workdir / "checkpoints", item_names=("state", "data", "meta"), options=options
    )
    it = iter(ds)
    start = mngr.latest_step() or 0
    # Run-level counters that must survive restarts (what summary.json reports).
    # wall_s: training wall time of the sessions up to the checkpoint; train_loss: the last
    # step's, so re-running a finished run reports what it did, not an empty session.
    meta: dict[str, Any] = {
        "items_seen": 0.0,
        "eval_loss": None,
        "eval_loss_se": None,
        "train_loss": None,
        "wall_s": 0.0,
    }
    if start:
        restored = mngr.restore(
            start,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state),
                data=grain.checkpoint.CheckpointRestore(it),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        meta.update(restored["meta"])
    metrics_path = workdir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)
    fn = step_lib.jit_train_step(model, tx, schedule, ocfg)

    stop = {"signal": None}
    old_handler = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    kill_at = int(os.environ.get("ONEREC_TEST_SIGKILL_AT_STEP", "0"))  # crash tests only
    writer = MetricWriter(workdir / "tb")
    if start == 0:
        writer.hparams(cfg.to_dict() | {"params": counts.params_total})
    last_loss = float("nan") if meta["train_loss"] is None else meta["train_loss"]
    pending: tuple[int, Any, tuple[float, float] | None] | None = None
    t0, wall_before = time.perf_counter(), float(meta["wall_s"])
    # Throughput counts steady-state training only: the clock starts once the first step's
    # metrics are back (compilation done) and evaluation and checkpoint time is taken out.
    clock = {"t": 0.0, "step": -1, "paused": 0.0}
    status = "finished"

    def save(step: int, state: Any) -> None:
        t = time.perf_counter()
        meta["wall_s"] = wall_before + t - t0
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(it),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
            force=True,
        )
        mngr.wait_until_finished()
        clock["paused"] += time.perf_counter() - t

    def evaluate(state: Any) -> tuple[float, float]:
        jax.block_until_ready(state)  # the step just dispatched is training time, not eval
        t = time.perf_counter()
        loss, se = run_eval(state)
        meta["eval_loss"], meta["eval_loss_se"] = loss, se
        clock["paused"] += time.perf_counter() - t
        return loss, se

    def flush(step: int, metrics: Any, ev: tuple[float, float] | None) -> None:
        """Check and log step `step`'s metrics; `ev` is the validation loss of the state after
        that same step (None when the step had no eval)."""
        nonlocal last_loss
        m = {k: np.asarray(v) for k, v in metrics.items()}
        loss = float(m["train/loss"])
        if not math.isfinite(loss):
            good = mngr.latest_step()
            raise FloatingPointError(
                f"train loss is {loss} at step {step}; stopping. Last good checkpoint: "
                f"{'none' if good is None else f'step {good}'} in {workdir / 'checkpoints'}"
            )
        meta["items_seen"] += float(m["train/items"])
        last_loss = meta["train_loss"] = loss
        if clock["step"] < 0:
            clock.update(t=time.perf_counter(), step=step, paused=0.0)
        if step % cfg.log_every == 0 or step == cfg.steps or ev is not None:
            scalars = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
            steps = step - clock["step"]
            if steps > 0:
                dt = time.perf_counter() - clock["t"] - clock["paused"]
                steps_per_s = steps / max(dt, 1e-9)
                scalars["perf/steps_per_s"] = steps_per_s
                scalars["perf/requests_per_s"] = steps_per_s * cfg.batch_size
                # Model FLOP/s by the analytic count (onerec_jax/flops.py).
                gflop = cfg.batch_size * counts.flops_train / 1e9
                scalars["perf/gflops_per_s"] = steps_per_s * gflop
            if ev is not None:
                scalars["eval/loss"], scalars["eval/loss_se"] = ev
            writer.scalars(step, scalars)
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")

    bar = progress_bar(start, cfg.steps)
    try:
        for step in range(start, cfg.steps):
            batch = jax.tree.map(jnp.asarray, next(it))
            new_state, metrics = fn(
                state, batch, jax.random.fold_in(jax.random.key(cfg.seed), step)
            )
            state = new_state
            done = step + 1
            # The validation loss of step `done` is that of the state after `done` steps:
            # measured now, before the next step replaces it.
            due = cfg.eval_every and done % cfg.eval_every == 0
            ev = evaluate(state) if val and (due or done == cfg.steps) else None
            if pending is not None:
                flush(*pending)  # step N-1's metrics, while step N runs
            pending = (done, metrics, ev)
            if kill_at and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                flush(*pending)  # never checkpoint a state whose loss was not finite
                pending = None
                save(done, state)
            if stop["signal"] is not None:
                if pending is not None:
                    flush(*pending)
                    pending = None
                save(done, state)
                status = "preempted"
                break
            bar.update(done, last_loss)
        if pending is not None:
            flush(*pending)
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, old_handler)
        writer.close()
        with contextlib.suppress(Exception):
            mngr.close()
    steps_done = int(state.step)
    summary = {
        "status": status,
        "step": steps_done,
        "rung": cfg.get("rung", ""),
        **counts.params(),
        "flops_per_sample": counts.flops_train,  # analytic, forward + backward, one request
        "flops_forward_per_sample": counts.flops_forward,
        "six_nd_per_sample": counts.six_nd,
        "samples_seen": steps_done * cfg.batch_size,  # requests, padding targets included
        "flops_seen": steps_done * cfg.batch_size * counts.flops_train,
        "items_seen": meta["items_seen"],  # valid target items
        "tokens_seen": meta["items_seen"] * q,  # semantic-id tokens with a loss
        "final_train_loss": last_loss,
        "final_eval_loss": meta["eval_loss"],  # first eval_requests validation requests
        # its standard error over requests (null when fewer than 2 requests had a target)
        "final_eval_loss_se": _finite_or_none(meta["eval_loss_se"]),
        "eval_requests": n_eval,  # requests behind final_eval_loss
        "distinct_train_requests": distinct_requests(source),
        # passes over the training split's distinct requests; > 1 means data repeated
        "data_passes": steps_done * cfg.batch_size / distinct_requests(source),
        "vocab": list(table.vocab),
        "wall_s_this_run": round(time.perf_counter() - t0, 2),
        # training wall time of every session up to the last checkpoint (a finished run's
        # whole training time, unchanged by running it again)
        "wall_s_total": round(meta["wall_s"], 2),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class _Progress:
    """A bar on a terminal; on a file (CI, batch-job logs) a plain line every ~5 % of the run
    instead of a stream of carriage-return frames."""

    def __init__(self, start: int, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)
        self.bar = tqdm(initial=start, total=total, desc="train") if self.tty else None

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif done % self.every == 0 or done == self.total:
            print(f"train: step {done}/{self.total} loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(start: int, total: int) -> _Progress:
    return _Progress(start, total)


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drop lines logged after the checkpoint a resumed run starts from (a killed run may have
    written them), so metrics.jsonl reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
