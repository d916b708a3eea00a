"""The training loop: resumable, preemptible, and honest about failures.

`train(cfg, workdir)` takes a resolved config (onerec_jax/config.py) and:
  - loads (or builds, into WORKDIR/tokenizer) the semantic-id table and checks it against the
    source (onerec_jax/train/state.py);
  - restores the newest checkpoint in WORKDIR/checkpoints if there is one (params, optimizer,
    MoE biases, the grain iterator and the run's counters, saved together: checkpointing.py),
    so a restarted run simply continues;
  - dispatches step N before reading step N-1's metrics (the host never waits on the device
    except at logs and saves); a NaN/Inf loss stops the run with an error that names the step
    and the last good checkpoint, and no checkpoint is written after it (run_log.py);
  - SIGTERM (preemption) saves the current step and returns cleanly (with several processes,
    on a step JAX's preemption service makes every process agree on: distributed.py);
  - with several processes (onerec_jax/distributed.py), each reads its share of every batch
    and only the main process writes config.json, the tokenizer, logs and summary.json;
  - measures the teacher-forced loss of the state after step s on the first `eval_requests`
    validation requests every `eval_every` steps and at the end (eval/loss, with its standard
    error over requests, eval/loss_se: validation.py);
  - warns when the sample budget (steps x batch_size) exceeds the distinct requests of the
    training split, i.e. when the run repeats data;
  - writes TensorBoard scalars (train/, eval/, perf/, moe/), metrics.jsonl and summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import sys
import threading
import time
import warnings
from typing import Any

import jax
import ml_collections

from onerec_jax import config, distributed, flops, sharding
from onerec_jax.data import pipeline
from onerec_jax.data.sources import distinct_requests, repeat_warning
from onerec_jax.monitor import Progress
from onerec_jax.train import state as state_lib
from onerec_jax.train import step as step_lib
from onerec_jax.train.batches import AddCodes
from onerec_jax.train.checkpointing import Checkpoints
from onerec_jax.train.run_config import check_split, check_workdir_config
from onerec_jax.train.run_log import Counters, RunLog
from onerec_jax.train.summary import write_summary
from onerec_jax.train.validation import Validation
from onerec_jax.train.workdir_lock import workdir_lock


class Preemption:
    """While active, SIGTERM (preemption) and SIGINT (Ctrl-C) set `requested` instead of
    stopping the process: the loop saves the step it is on and returns "preempted" (resumable,
    exit 0). A second Ctrl-C interrupts at once. A signal the loop did not act on (`acted`: it
    came after the last step read the flag, e.g. during the final save) is passed on, on exit,
    to a caller's own Python handler (the sweep runner's, which then stops); under the default
    handlers the run, finished and saved, simply returns."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.requested = self.acted = False
        self.signals, self.received = signals, 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested, self.received = True, signum
        if signum == signal.SIGINT:  # a second Ctrl-C goes to the old handler: interrupts
            signal.signal(signal.SIGINT, self._old[signal.SIGINT])
            print("onerec: Ctrl-C: saving after this step (Ctrl-C again aborts)", file=sys.stderr)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signals: main thread only
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        old = self._old.get(self.received)
        if self.requested and not self.acted and callable(old):
            if old is not signal.default_int_handler:  # Python's own Ctrl-C: nothing to pass
                signal.raise_signal(self.received)


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training; returns the summary written to WORKDIR/summary.json. A
    SIGTERM or Ctrl-C at any point stops at the next step with a save (`Preemption`)."""
    # Several processes: JAX's preemption service owns SIGTERM (it must see it to make the
    # processes agree on a step), so no Python handler replaces its own.
    config.check_resolved(cfg)
    config.validate(cfg)  # the CLI's resolve() did; a Python caller's config may not have
    workdir = pathlib.Path(workdir).resolve()  # orbax needs absolute paths
    single = jax.process_count() == 1
    # One runner per workdir (the main process holds WORKDIR/.lock; a dead one's is free).
    lock = workdir_lock(workdir) if distributed.is_main() else contextlib.nullcontext()
    with lock, Preemption() if single else contextlib.nullcontext(Preemption()) as preemption:
        return _train(cfg, workdir, preemption)


def _train(
    cfg: ml_collections.ConfigDict, workdir: pathlib.Path, preemption: Preemption
) -> dict[str, Any]:
    if cfg.tokenizer_dir:  # stored resolved: the run must not depend on where it is started
        cfg = cfg.copy_and_resolve_references()
        cfg.tokenizer_dir = str(pathlib.Path(cfg.tokenizer_dir).resolve())
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    main, n_processes = distributed.is_main(), jax.process_count()
    if cfg.batch_size % n_processes:
        raise ValueError(
            f"batch_size {cfg.batch_size} does not split over the run's {n_processes} processes"
        )
    micro_batch = cfg.batch_size // cfg.optim.grad_accum
    if micro_batch % sharding.batch_shards(mesh):
        raise ValueError(
            f"micro-batch {micro_batch} (batch_size / optim.grad_accum) does not split over the "
            f"mesh's batch axes (data x fsdp x expert = {sharding.batch_shards(mesh)})"
        )
    if cfg.batch_size % cfg.optim.grad_accum:
        raise ValueError(
            f"batch_size {cfg.batch_size} does not split into optim.grad_accum "
            f"{cfg.optim.grad_accum} micro-batches"
        )
    if cfg.pack_targets and (n_processes > 1 or sharding.batch_shards(mesh) > 1):
        # The capacity is a static shape taken from the whole batch: one process, one shard.
        raise ValueError(
            f"config field pack_targets: {cfg.pack_targets} needs a single batch shard on one "
            f"process (this run: {n_processes} process(es), {sharding.batch_shards(mesh)} "
            "batch shards); set pack_targets=0"
        )
    sharding.check_process_rows(mesh, cfg.batch_size)
    check_split(cfg, workdir)
    check_workdir_config(cfg, workdir, write=main)
    if main:  # the others read the table once it is on the (shared) disk
        state_lib.load_table(cfg, workdir, build=True)
    distributed.barrier("onerec: config and tokenizer written")
    run = state_lib.open_run(cfg, workdir)
    if main:  # its fingerprint, checked by every later start and eval (state.check_table)
        state_lib.record_table(workdir, run.table, state_lib.table_dir(cfg, workdir))
    n_distinct = distinct_requests(run.source)
    repeats = repeat_warning(run.source, cfg.steps * cfg.batch_size)
    if repeats and main:
        warnings.warn(f"{workdir}: {repeats}", stacklevel=2)
    ocfg, tx, schedule = state_lib.optimizer(cfg)
    counts = flops.counts(run.model)
    validation = Validation(cfg, run.spec, run.table.codes, run.model, mesh)
    ds = pipeline.make_dataset(
        run.source,
        run.spec,
        # This process's rows of every batch (the pipeline shards by jax.process_index()).
        pipeline.PipelineConfig(
            batch_size=cfg.batch_size // n_processes, seed=cfg.seed, workers=cfg.workers
        ),
        transform=AddCodes(run.table.codes),
    )
    data = iter(ds)
    ckpt = Checkpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    counters = Counters()
    levels = run.table.n_levels
    start, restored = 0, None
    if ckpt.latest_step() is not None or n_processes > 1:
        # Restored straight onto the mesh: no fresh state is initialised first.
        target, shardings = state_lib.restore_target(cfg, run.model, tx, levels, mesh)
        if n_processes == 1:  # past a corrupt newest checkpoint (moved aside, with a warning)
            start, restored = ckpt.restore_newest(
                lambda s: ckpt.restore(s, target, data), check_processes=True
            )
        else:
            # Every process resumes from process 0's newest step (a shared filesystem's
            # caches may show the processes different newest checkpoints).
            start = distributed.same_on_all(ckpt.latest_step() or 0)
            restored = ckpt.restore(start, target, data) if start else None
    if restored is not None:
        state, meta = restored
        counters = Counters.from_meta(meta)
    else:
        state, shardings = state_lib.sharded_state(cfg, run.model, tx, levels, mesh)
    log = RunLog(cfg, workdir, start, counters, counts.flops_train, ckpt.latest_step, write=main)
    if start == 0 and main:
        log.writer.hparams(cfg.to_dict() | {"params": counts.params_total})
    step_fn = step_lib.jit_train_step(run.model, tx, schedule, ocfg, mesh, shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    kill_at = int(os.environ.get("ONEREC_TEST_SIGKILL_AT_STEP", "0"))  # crash tests only
    t0, wall_before = time.perf_counter(), counters.wall_s
    status = "finished"
    # pending: (step, its metrics, its validation loss or None), recorded one step late
    pending: tuple[int, Any, tuple[float, float] | None] | None = None
    bar = Progress(start, cfg.steps, enabled=main)
    capacities: set[int | None] = set()  # packed step sizes compiled so far (pack_targets)
    try:
        for step in range(start, cfg.steps):
            host = next(data)
            capacity = None
            if cfg.pack_targets:  # decoder positions to compute (a bucket per shape)
                capacity = step_lib.token_capacity(
                    host["target_codes"], cfg.optim.grad_accum, cfg.pack_targets
                )
            # A global array from every process's rows of the batch.
            batch = jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(batch_sharding, x), host
            )
            rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
            t = time.perf_counter()
            state, metrics = step_fn(state, batch, rng, capacity)
            if capacity not in capacities:  # compiled for this shape during the call
                capacities.add(capacity)
                log.throughput.pause(time.perf_counter() - t)
            done = step + 1
            # The validation loss of step `done` is that of the state after `done` steps:
            # measured now, before the next step replaces it.
            ev = None
            due = cfg.eval_every and done % cfg.eval_every == 0
            if validation.enabled and (due or done == cfg.steps):
                jax.block_until_ready(state)  # the step just dispatched is training time
                t = time.perf_counter()
                ev = validation(state)
                counters.eval_loss, counters.eval_loss_se = ev
                log.throughput.pause(time.perf_counter() - t)
            if pending is not None:
                log.record(*pending)  # step N-1's metrics, while step N runs
            pending = (done, metrics, ev)
            if kill_at and done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            # Read the flag once: a SIGTERM between two reads would stop without a save.
            preempted = distributed.preemption_agreed(done, preemption.requested)
            checkpoint_due = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if checkpoint_due or preempted:
                log.record(*pending)  # never checkpoint a state whose loss was not finite
                pending = None
                t = time.perf_counter()
                counters.wall_s = wall_before + t - t0
                ckpt.save(done, state, data, dataclasses.asdict(counters))
                log.throughput.pause(time.perf_counter() - t)
            if preempted and done < cfg.steps:
                # (on the last step the run finished: the signal goes on to a caller's handler)
                status = "preempted"
                preemption.acted = True
                break
            loss = counters.train_loss
            bar.update(done, float("nan") if loss is None else loss)
        if pending is not None:
            log.record(*pending)
    finally:
        bar.close()
        log.close()
        ckpt.close()
    return write_summary(
        run,
        status=status,
        steps_done=int(state.step),
        counts=counts,
        counters=counters,
        eval_requests=validation.n_requests,
        distinct_train_requests=n_distinct,
        wall_s_this_run=time.perf_counter() - t0,
        mesh=dict(mesh.shape),
        params_sharded_fraction=sharding.sharded_fraction(state.params),
        processes=n_processes,
        write=main,
    )
