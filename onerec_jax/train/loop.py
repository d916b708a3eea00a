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
import time
import warnings
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from onerec_jax import flops
from onerec_jax.data import pipeline
from onerec_jax.data.sources import distinct_requests, open_source, repeat_warning
from onerec_jax.model import rungs
from onerec_jax.model.moe import MoEConfig
from onerec_jax.model.user_encoder import EncoderConfig
from onerec_jax.model.v1 import OneRecV1, V1Config
from onerec_jax.model.v2 import OneRecV2, V2Config
from onerec_jax.tokenizer.semantic_ids import SemanticIds
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import (
    AddCodes,
    mean_and_stderr,
    schema_spec,
    validation_batches,
    zero_batch,
)
from onerec_jax.train.logging import MetricWriter, Progress
from onerec_jax.train.run_config import (
    check_split,
    check_workdir_config,
    load_run_config,
    source_seed,
)

# Re-exported: `onerec eval`, the experiments and the tests read runs through the loop module.
__all__ = [
    "build_model",
    "check_split",
    "load_run_config",
    "mean_and_stderr",
    "schema_spec",
    "source_seed",
    "train",
    "zero_batch",
]


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


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training; returns the summary written to WORKDIR/summary.json."""
    workdir = pathlib.Path(workdir).resolve()  # orbax needs absolute paths
    if cfg.get("rung"):
        cfg = rungs.apply_rung(ml_collections.ConfigDict(cfg.to_dict()), cfg.rung)
    check_split(cfg, workdir)
    check_workdir_config(cfg, workdir)
    source = open_source(cfg.source, seed=source_seed(cfg), split="train", order_seed=cfg.seed)
    table = _table(cfg, workdir)
    if table.n_items != source.n_items:
        raise ValueError(
            f"tokenizer table covers {table.n_items} items but {cfg.source} has {source.n_items}"
        )
    model = build_model(cfg, source, table.vocab)
    spec = schema_spec(cfg)
    n_distinct = distinct_requests(source)
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

    bar = Progress(start, cfg.steps)
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
        "distinct_train_requests": n_distinct,
        # passes over the training split's distinct requests; > 1 means data repeated
        "data_passes": steps_done * cfg.batch_size / n_distinct,
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


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drop lines logged after the checkpoint a resumed run starts from (a killed run may have
    written them), so metrics.jsonl reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
