"""Several processes, one run: `jax.distributed` started from the command line or the cluster.

A multi-host run is N copies of the same command, one per host (or per GPU), joined by JAX's
coordination service. `initialize` starts it:

  - explicitly: `--coordinator HOST:PORT --num-processes N --process-id I` (any cluster, and
    localhost with simulated CPU devices);
  - from the cluster: under `srun` of SLURM with more than one task, `mpirun` of Open MPI, or
    on a TPU pod slice (`TPU_WORKER_HOSTNAMES` / `MEGASCALE_COORDINATOR_ADDRESS` set, or
    `--distributed` given on a TPU VM, whose workers JAX finds from the metadata server),
    `jax.distributed.initialize()` reads the coordinator, the process count and this process's
    index from the environment;
  - otherwise nothing: one process owns every device, as on a laptop.

With several processes every one runs the same program on its own share of the data
(onerec_jax/data/pipeline.py shards by `jax.process_index()`); batches are global arrays built
from the shares; orbax saves and restores the sharded state from all processes; only the main
process (index 0) writes logs, config.json and summary.json. A process that dies stops sending
heartbeats and JAX's coordination service ends the others after `heartbeat_s` with an error
naming the dead task, so a run never hangs on a lost peer. On CPU the collectives between
processes go through gloo.
"""

from __future__ import annotations

import os

import jax

ENV_DISABLE = "ONEREC_DISTRIBUTED"  # "0": never start jax.distributed from the environment


def cluster_detected() -> str | None:
    """The kind of multi-process launch the environment shows, or None."""
    env = os.environ
    if env.get(ENV_DISABLE) == "0":
        return None
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return "slurm"  # inside `srun` of a job with several tasks
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
    preemption: bool = True,
    heartbeat_s: int = 100,
    init_timeout_s: int = 300,
) -> bool:
    """Start jax.distributed when a multi-process launch is asked for or detected; returns
    whether it started. Call before JAX computes anything (it fixes the set of devices).
    `preemption`: JAX's preemption service takes SIGTERM over (training agrees on a step to
    save at); a command that saves nothing (eval) leaves SIGTERM its default, fatal effect."""
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit) and any(x is None for x in explicit):
        raise ValueError(
            "give all of --coordinator HOST:PORT, --num-processes N and --process-id I "
            f"(got {coordinator!r}, {num_processes!r}, {process_id!r})"
        )
    if num_processes is not None and process_id is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process-id {process_id} is not in [0, --num-processes {num_processes})"
            )
        if num_processes == 1:
            return False
    elif not (force or cluster_detected()):
        return False
    # Collectives between CPU processes (tests on localhost; ignored by GPU and TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", preemption)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_s,
    )
    return True


def same_on_all(value: int) -> int:
    """Process 0's `value`, on every process."""
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def is_main() -> bool:
    """Whether this process writes the run's files (logs, config, summary)."""
    return jax.process_index() == 0


def barrier(name: str, timeout_s: int = 6 * 3600) -> None:
    """Wait until every process gets here (a no-op with one process). The coordination
    service's barrier, not a device collective: the others may wait long (process 0 building
    the tokenizer), and a first CPU collective gives up after 30 s."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def preemption_agreed(step: int, local_request: bool) -> bool:
    """Whether the run stops and saves after `step`. One process: its own SIGTERM flag. Several:
    JAX's preemption service, which catches SIGTERM on any process and picks the same step for
    all of them (a save is collective, so all must save the same step)."""
    if jax.process_count() == 1:
        return local_request
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)
