"""`onerec align`: policy optimisation of a pre-trained generator against a reward.

`align(acfg, init_dir, workdir)` restores the newest checkpoint of a pre-trained run (INIT) and
then, for each update:
  1. takes a batch of training requests (the run's own source, split and pipeline);
  2. rolls out G items (or sessions) per request from the old policy: the G best by
     trie-constrained beam search, or G draws (within the trie, or free, in which case the
     illegal ones are discarded and the legal ones get `format_advantage` on top);
  3. scores each rollout (`reward`: the world's expected reward of its item, the reward
     model's score, or the logged feedback; a session: the mean of its items) and normalises
     the rewards within each request's group;
  4. takes one AdamW step on ECPO / GBPO / GPPO (onerec_jax/rl/losses.py) of the rollouts'
     log-probabilities under the current policy, plus `ntp_weight` x the next-token loss of the
     logged targets (what keeps the policy a recommender of real sessions).
The old policy is the current one every `refresh` updates (1: on-policy rollouts, ratios of
1 at the update; its gradient is then the plain policy gradient, clipping acting from the
second update after a refresh).

The workdir is a run directory like `onerec train`'s: config.json (the pre-trained run's,
reading its tokenizer), align.json (this config and INIT), checkpoints (the policy and its
optimizer, the data position; resuming continues), TensorBoard logs and metrics.jsonl
(align/*), summary.json. So `onerec eval --workdir DIR` evaluates the aligned policy like any
run. At the end, the true reward of the top-K lists of INIT and of the aligned policy on the
same validation requests goes into summary.json.

With `reward_model` (a P-Score fit by `onerec reward-model`, onerec_jax/rl/reward_model.py) the
reward model scores the before/after lists too (`reward_model@K`, where reward hacking shows:
its score up, the true reward flat or down), and `reward=model` aligns against it instead of
the true reward.

DPO (`--method dpo`): the best and worst of the G rollouts by reward are a chosen /
rejected pair (for a random `dpo_share` of the requests), scored against the pre-trained policy
(kept frozen) with DPO, plus `ntp_weight` x NTP. RSFT (`--method rsft`): no rollouts; NTP on
the requests whose logged session played at least the (1 - rsft_keep) quantile of session play
time (estimated once on 2,048 training requests drawn with a fixed seed).

`advantage=duration` (policy-gradient methods, the world): OneRec-V2's duration-aware shaping
replaces group normalisation: each rollout's expected play time (and an expected dislike,
p >= 1/2) against the user's own plays of videos of similar length (shaping.py).

`reward=logged` needs no world and no reward model: a rollout that is one of the request's
logged target exposures earns that exposure's own feedback, fused with the reward model's
weights (`feedback.logged_reward`); any other rollout earns `logged_miss` (default 0:
nothing is known of it). It is the reward a logged source (MovieLens, a Parquet log) can give;
the before/after comparison then reads `logged_reward@K` (the same reward of the top-K lists
against the held-out targets) beside Recall and NDCG.

The MoE balancing biases stay as pre-trained.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from onerec_jax import feedback
from onerec_jax.atomic import write_atomic
from onerec_jax.data import pipeline
from onerec_jax.evaluate import evaluate_run, true_reward
from onerec_jax.generate import beam_search
from onerec_jax.monitor import MetricWriter, Progress, drop_events_after
from onerec_jax.rl import align_config, losses, reward_model, shaping
from onerec_jax.rl.rollout import rollout_logp, sample_rollouts
from onerec_jax.train import state as state_lib
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import AddCodes
from onerec_jax.train.checkpointing import Checkpoints
from onerec_jax.train.loop import Preemption
from onerec_jax.train.loss import loss_fn
from onerec_jax.train.run_config import has_checkpoint
from onerec_jax.train.run_log import append_metrics, truncate_metrics
from onerec_jax.train.step import NOT_MODEL_INPUTS, TrainState
from onerec_jax.train.workdir_lock import workdir_lock

# Fields that may differ when a run is resumed (the rest must match align.json).
RESUMABLE = ("steps", "log_every", "eval_requests", "eval_beam")


def _loss_kwargs(acfg: ml_collections.ConfigDict) -> dict[str, float]:
    if acfg.method == "ecpo":
        return {"eps": acfg.eps, "delta": acfg.delta}
    if acfg.method == "gppo":
        return {"eps_low": acfg.eps_low, "eps_high": acfg.eps_high}
    return {}


def make_update(model: Any, tx: optax.GradientTransformation, acfg: ml_collections.ConfigDict):
    """The jitted update (state, batch, extra) -> (state, metrics). `extra` holds what the
    method reads: the policy-gradient methods `codes` [B, G, M, Q], `logp_old` [B, G], `adv`,
    `mask`; DPO `codes` [B, 2, M, Q] (chosen, rejected), `ref` [B, 2] (their log-probabilities
    under the pre-trained policy) and `mask` [B]; RSFT `keep` [B] (the requests trained on)."""
    kind, kw, ntp_weight = acfg.method, _loss_kwargs(acfg), acfg.ntp_weight

    def update(state: TrainState, batch: dict, extra: dict):
        inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}

        def objective(params):
            variables = {"params": params, "moe_bias": state.moe_bias}
            nll, _ = model.apply(variables, inputs, batch["target_codes"])
            valid = batch["target_mask"] & jnp.all(batch["target_codes"] >= 0, axis=-1)
            if kind == "rsft":  # only the kept requests' sessions, NTP alone
                ntp, _ = loss_fn(nll, valid & extra["keep"][:, None], model.cfg.loss)
                return ntp, {"ntp_loss": ntp}
            ntp, _ = loss_fn(nll, valid, model.cfg.loss)
            logp = rollout_logp(model, variables, inputs, extra["codes"])
            if kind == "dpo":
                ref = extra["ref"]
                term = losses.dpo_loss(
                    logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], acfg.dpo_beta, extra["mask"]
                )
                margin = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
                return term + ntp_weight * ntp, {
                    "dpo_loss": term,
                    "ntp_loss": ntp,
                    "margin": losses.masked_mean(margin, extra["mask"]),
                }
            logp_old = extra["logp_old"]
            pg = losses.LOSSES[kind](logp, logp_old, extra["adv"], extra["mask"], **kw)
            ratio = losses.masked_mean(jnp.exp(logp - logp_old), extra["mask"])
            return pg + ntp_weight * ntp, {"pg_loss": pg, "ntp_loss": ntp, "ratio": ratio}

        (total, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(state.step + 1, params, opt_state, state.moe_bias)
        return new, {**metrics, "loss": total, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(update, donate_argnums=0)


def rollouts(run, variables, inputs, trie, acfg, key) -> tuple[np.ndarray, np.ndarray]:
    """(codes [B, G, M, Q], items [B, G, M]) from the old policy; item 0 where a rollout names
    no item (fewer than G items in a beam, or an illegal free sample)."""
    model, g = run.model, acfg.group
    if acfg.rollout == "beam":
        out = beam_search(model, variables, inputs, trie, g)
        if "session_codes" in out:
            codes, items = np.asarray(out["session_codes"]), np.asarray(out["sessions"])
        else:
            codes, items = np.asarray(out["codes"])[:, :, None], np.asarray(out["items"])[..., None]
        return codes, np.where(np.isfinite(np.asarray(out["logprob"]))[..., None], items, 0)
    codes = np.asarray(
        sample_rollouts(
            model, variables, inputs, g, key, trie if acfg.trie else None, acfg.temperature
        )
    )
    return codes, run.table.find(codes)


def optimizer(
    cfg: ml_collections.ConfigDict, acfg: ml_collections.ConfigDict
) -> optax.GradientTransformation:
    """The pre-trained run's optimizer chain (clipping, AdamW with its moment dtype: the same
    state tree, so `onerec eval` restores the aligned run like any run) with the alignment's
    learning rate: constant after a linear warmup whose first update is already lr / warmup
    (a schedule of the count alone, so a resumed run, even one extended, steps as an
    uninterrupted one)."""
    ocfg = step_lib.OptimConfig(
        learning_rate=acfg.learning_rate,
        warmup_steps=acfg.warmup_steps,
        total_steps=acfg.steps,
        weight_decay=acfg.weight_decay,
        clip_norm=cfg.optim.clip_norm,
        moment_dtype=cfg.optim.moment_dtype,
    )
    lr, warm = acfg.learning_rate, max(acfg.warmup_steps, 1)

    def schedule(count: jax.Array) -> jax.Array:
        return lr * jnp.minimum(1.0, (count + 1) / warm)

    return optax.chain(optax.clip_by_global_norm(ocfg.clip_norm), step_lib.adamw(ocfg, schedule))


def _prepare(acfg: ml_collections.ConfigDict, init_dir: pathlib.Path, workdir: pathlib.Path):
    """Check everything, then write config.json / align.json; a run with a checkpoint must
    match them (a start that failed before its first checkpoint may be redone with another
    config: nothing of it is kept)."""
    align_config.check(acfg)
    if jax.process_count() > 1:
        raise ValueError("onerec align runs in one process for now (it has no mesh support)")
    run, state, init_step = state_lib.restore_latest(init_dir)
    if acfg.method != "rsft" and acfg.reward == "true" and run.source.kind != "world":
        raise ValueError(
            f"{init_dir}: reward 'true' needs a world source (the world knows each item's "
            f"expected reward); this run's source is {run.cfg.source}"
        )
    if acfg.objective == "gmv" and not hasattr(run.source, "price"):
        raise ValueError(
            f"{init_dir}: objective 'gmv' needs the e-commerce world (prices and orders); "
            f"this run's source is {run.cfg.source}"
        )
    if acfg.advantage == "duration" and hasattr(run.source, "shown_in"):
        raise ValueError(
            f"{init_dir}: advantage 'duration' shapes by play time, which the e-commerce world "
            f"({run.cfg.source}) does not have; use advantage 'group'"
        )
    cfg = ml_collections.ConfigDict(run.cfg.to_dict())
    cfg.tokenizer_dir = str(state_lib.table_dir(run.cfg, init_dir).resolve())
    cfg.steps = acfg.steps
    cfg.optim.learning_rate, cfg.optim.warmup_steps = acfg.learning_rate, acfg.warmup_steps
    cfg.optim.weight_decay = acfg.weight_decay
    record = {"init": str(init_dir), "init_step": init_step, "align": acfg.to_dict()}
    saved = workdir / "align.json"
    started = has_checkpoint(workdir)
    if saved.exists() and started:
        old = json.loads(saved.read_text())
        mine = {k: v for k, v in record["align"].items() if k not in RESUMABLE}
        # a field added since that run was made: it ran with the field's default
        theirs = {**align_config.get_config().to_dict(), **old.get("align", {})}
        theirs = {k: v for k, v in theirs.items() if k not in RESUMABLE}
        if old.get("init") != record["init"] or mine != theirs:
            raise ValueError(
                f"{saved}: this workdir holds an alignment run of another config or init; "
                "use a new --workdir (only steps, log_every and the eval fields may change)"
            )
        if old.get("init_step") != init_step:
            raise ValueError(
                f"{saved}: the run started from step {old.get('init_step')} of {init_dir}, "
                f"whose newest checkpoint is now step {init_step}; use a new --workdir"
            )
    elif (workdir / "config.json").exists() and not saved.exists():
        raise ValueError(f"{workdir}: holds a run that is not an alignment run; pick another")
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    write_atomic(saved, json.dumps(record, indent=2, sort_keys=True))
    return run, state, cfg


def align(
    acfg: ml_collections.ConfigDict, init_dir: str | os.PathLike, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Run (or resume) an alignment run; returns the summary written to WORKDIR/summary.json.
    One runner per workdir (WORKDIR/.lock); SIGTERM or Ctrl-C stops at the next refresh of
    the old policy with a save (status "preempted"; the same command resumes)."""
    init_dir = pathlib.Path(init_dir).resolve()
    workdir = pathlib.Path(workdir).resolve()
    align_config.check(acfg)  # before the workdir (and its lock file) is made
    state_lib.load_run_config(init_dir)  # an init that is no run: refused before it too
    with workdir_lock(workdir), Preemption() as preemption:
        return _align(acfg, init_dir, workdir, preemption)


def _align(
    acfg: ml_collections.ConfigDict,
    init_dir: pathlib.Path,
    workdir: pathlib.Path,
    preemption: Preemption,
) -> dict[str, Any]:
    run, init_state, cfg = _prepare(acfg, init_dir, workdir)
    tx = optimizer(cfg, acfg)
    rm_score = reward_model.scorer_for(acfg.reward_model, run, acfg.objective)
    model, trie = run.model, run.table.trie()
    ds = pipeline.make_dataset(
        run.source,
        run.spec,
        pipeline.PipelineConfig(batch_size=acfg.batch_size, seed=acfg.seed),
        transform=AddCodes(run.table.codes),
    )
    data = iter(ds)
    ckpt = Checkpoints(workdir / "checkpoints", keep=acfg.keep_checkpoints)
    params = init_state.params
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), init_state.moe_bias)
    # DPO's reference is the pre-trained policy, kept whole; the pre-trained optimizer
    # moments are not needed (copies: the update donates the state).
    ref_vars = None
    if acfg.method == "dpo":
        ref_vars = jax.tree.map(jnp.copy, {"params": params, "moe_bias": init_state.moe_bias})
    threshold = shaping.rsft_threshold(run, acfg.rsft_keep) if acfg.method == "rsft" else 0.0
    del init_state, params
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    # The newest checkpoint that restores (a corrupt one moved aside, with a warning).
    start, restored = ckpt.restore_newest(lambda s: ckpt.restore(s, target, data))
    if restored is not None:
        state = restored[0]
    truncate_metrics(workdir / "metrics.jsonl", start)  # rows a killed run wrote after it
    drop_events_after(workdir / "logs", start)
    update = make_update(model, tx, acfg)
    logp_of = jax.jit(rollout_logp, static_argnums=0)
    writer = MetricWriter(workdir / "logs")
    bar = Progress(start, acfg.steps)
    free = acfg.rollout == "sample" and not acfg.trie
    sums: dict[str, float] = {}
    rows_in_window = 0
    old_vars = None
    t0 = time.perf_counter()
    status = "finished"
    try:
        for step in range(start, acfg.steps):
            host = next(data)
            batch = jax.tree.map(jnp.asarray, host)
            inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
            # `start` is a multiple of refresh (align_config); RSFT has no rollouts to make.
            if step % acfg.refresh == 0 and acfg.method != "rsft":
                old_vars = {"params": state.params, "moe_bias": state.moe_bias}
                old_vars = jax.tree.map(jnp.copy, old_vars)  # the update donates the state
            key = jax.random.fold_in(jax.random.key(acfg.seed), step)
            row: dict[str, float] = {}
            if acfg.method == "rsft":
                keep = shaping.session_play_s(host) >= threshold
                state, metrics = update(state, batch, {"keep": jnp.asarray(keep)})
                row["kept"] = float(keep.mean())
            else:
                codes, items = rollouts(run, old_vars, inputs, trie, acfg, key)
                legal = np.all(items > 0, axis=-1)  # [B, G]
                b, g, m = items.shape
                flat = items.reshape(b, g * m)
                if acfg.reward == "model":
                    r = rm_score(host, flat).reshape(b, g, m)
                elif acfg.reward == "logged":
                    r = feedback.logged_reward(host, flat, acfg.logged_miss)
                    r = r.reshape(b, g, m)
                else:
                    r = true_reward(run.source, host, flat, acfg.objective).reshape(b, g, m)
                reward = np.where(legal, np.nanmean(np.where(legal[..., None], r, 0.0), -1), 0.0)
                codes_j = jnp.asarray(np.maximum(codes, 0), jnp.int32)
                if acfg.method == "dpo":
                    rng = np.random.default_rng([acfg.seed, step])
                    pair, ok = shaping.preference_pairs(reward, legal, acfg.dpo_share, rng)
                    codes_j = jnp.take_along_axis(codes_j, jnp.asarray(pair)[..., None, None], 1)
                    ref = logp_of(model, ref_vars, inputs, codes_j)
                    extra = {"codes": codes_j, "ref": ref, "mask": jnp.asarray(ok)}
                    row["pairs"] = float(ok.mean())
                else:
                    if acfg.advantage == "duration":
                        adv = shaping.world_duration_advantage(
                            run.source, host, items, acfg.history_sessions
                        )
                        adv = jnp.where(jnp.asarray(legal), jnp.asarray(adv), 0.0)
                    else:
                        adv = losses.group_advantages(jnp.asarray(reward), jnp.asarray(legal))
                    if free:
                        adv = adv + acfg.format_advantage * jnp.asarray(legal, jnp.float32)
                    logp_old = logp_of(model, old_vars, inputs, codes_j)
                    extra = {"codes": codes_j, "logp_old": logp_old, "adv": adv}
                    extra["mask"] = jnp.asarray(legal)
                state, metrics = update(state, batch, extra)
                row["reward"] = float(reward[legal].mean()) if legal.any() else float("nan")
                row["legal_rate"] = float(legal.mean())
            done = step + 1
            row.update({k: float(v) for k, v in metrics.items()})
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"{workdir}: alignment loss is {row['loss']} at {done}")
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
            rows_in_window += 1
            if done % acfg.log_every == 0 or done == acfg.steps:
                mean = {f"align/{k}": v / rows_in_window for k, v in sums.items()}
                writer.scalars(done, mean)
                append_metrics(workdir / "metrics.jsonl", {"step": done, **mean})
                sums, rows_in_window = {}, 0
            # Stop only where the old policy is refreshed: a resumed run starts with a fresh
            # one, as this run would have at that step (read the flag once per step).
            stop = preemption.requested and done % acfg.refresh == 0
            if done % acfg.checkpoint_every == 0 or done == acfg.steps or stop:
                ckpt.save(done, state, data, {"step": done})
            if stop and done < acfg.steps:
                status = "preempted"
                preemption.acted = True
                break
            bar.update(done, row["loss"])
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    summary: dict[str, Any] = {
        "status": status,
        "method": acfg.method,
        "init": str(init_dir),
        "steps": int(state.step),
        "wall_s_this_run": time.perf_counter() - t0,
    }
    if acfg.eval_requests and status == "finished":
        kw = {"beam": acfg.eval_beam, "max_requests": acfg.eval_requests, "write": False}
        kw["scorer"] = rm_score
        summary["before"] = evaluate_run(init_dir, "validation", **kw)
        summary["after"] = evaluate_run(workdir, "validation", **kw)
    write_atomic(workdir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return summary
