"""The grain input pipeline: any source -> model-ready batches.

    MapDataset.range(len) -> shuffle (logged sources) -> repeat -> batch indices (global batch)
      -> this process's rows -> build the batch (pathways strictly before the target,
      pad/truncate) -> IterDataset -> multiprocessing workers

Process p of n takes rows [p*B, (p+1)*B) of every global batch of n*B examples, so the global
array the n processes assemble (jax.make_array_from_process_local_data) holds the same rows in
the same order as one process reading n*B: a multi-host run trains on exactly the batches of a
single-host run (row order matters where experts have a capacity, which drops later tokens).

Batching happens on the indices, before the build, so a batch is a fixed set of examples whatever
the number of workers: each worker builds whole batches and grain interleaves them in order, so
workers=0 and workers=N yield identical batches. The world's example indices are already random
draws (example i is a hash of i), so it is not shuffled; its split is effectively infinite.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import threading
import time
from typing import Any

import grain
import numpy as np

from onerec_jax.data import schema
from onerec_jax.data.sources import Source


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How examples are read.

    Attributes:
      batch_size: examples per batch on this process.
      seed: shuffle seed (logged sources).
      shuffle: shuffle logged sources each epoch (the world never needs it).
      num_epochs: passes over the split; None repeats forever.
      workers: grain worker processes (0: build in the calling process).
      worker_buffer: batches each worker keeps ready.
      drop_remainder: drop a last, smaller batch of an epoch (keeps shapes static for jit).
    """

    batch_size: int = 256
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    workers: int = 0
    worker_buffer: int = 2
    drop_remainder: bool = True


def _index_array(indices: list[int]) -> np.ndarray:
    return np.asarray(indices, np.int64)


class ShardRows(grain.transforms.Map):
    """Global batch indices [n*B] -> this shard's contiguous rows [B]."""

    def __init__(self, shard_index: int, shard_count: int):
        self.shard_index, self.shard_count = shard_index, shard_count

    def map(self, indices: np.ndarray) -> np.ndarray:
        # A last, partial batch splits evenly too: every epoch holds a multiple of n examples.
        return indices.reshape(self.shard_count, -1)[self.shard_index]


class BuildBatch(grain.transforms.Map):
    """indices [B] -> batch dict; picklable so spawned workers can rebuild it."""

    def __init__(self, source: Source, spec: schema.SchemaSpec):
        self.source, self.spec = source, spec

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        raw = self.source.raw_batch(np.asarray(indices), self.spec.history_window, self.spec)
        return schema.build_batch(raw, self.spec)


def make_dataset(
    source: Source,
    spec: schema.SchemaSpec,
    config: PipelineConfig,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
    transform: grain.transforms.Map | None = None,
) -> grain.IterDataset:
    """The batched, sharded, checkpointable dataset of one split.

    Args:
      shard_index, shard_count: this process's shard; default jax.process_index()/process_count(),
        so each host of a multi-host run reads its own rows of every global batch.
      transform: applied to each built batch (in the workers), e.g. adding semantic-id codes.
    """
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither (JAX process default)")
    if shard_index is None or shard_count is None:
        import jax  # only here: the data package itself does not need JAX

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if len(source) == 0:
        raise ValueError(f"source {getattr(source, 'kind', '?')}/{source.split} has no examples")
    ds = grain.MapDataset.range(len(source))
    if config.shuffle and source.kind != "world":
        ds = ds.shuffle(seed=config.seed)
    # Every shard must get the same number of examples per epoch, or hosts of a multi-host run
    # would take different numbers of steps and hang in a collective: drop the epoch's remainder.
    ds = ds[: len(ds) - len(ds) % shard_count]
    if len(ds) == 0:
        raise ValueError(f"{len(source)} examples cannot be split over {shard_count} shards")
    ds = ds.repeat(config.num_epochs)
    global_batch = config.batch_size * shard_count
    ds = ds.batch(global_batch, drop_remainder=config.drop_remainder, batch_fn=_index_array)
    if shard_count > 1:
        ds = ds.map(ShardRows(shard_index, shard_count))
    ds = ds.map(BuildBatch(source, spec))
    if transform is not None:
        ds = ds.map(transform)
    # Threads would only contend for the GIL with the numpy build; workers give the parallelism.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    if config.workers > 0:
        from absl import flags

        # grain's workers read absl flags; a library caller may never have parsed any.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.workers, per_worker_buffer_size=config.worker_buffer
            ),
            worker_init_fn=exit_with_parent,
        )
    return it


def exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In each grain worker: exit once the process that started it is gone. A trainer killed
    by SIGKILL cannot stop its workers, which would otherwise live on (holding their memory,
    ~250 MB each). A daemon thread polls the parent's pid (prctl's parent-death signal would
    follow the parent *thread*, and grain may start workers from a helper thread). Ctrl-C is
    left to the trainer."""
    parent = os.getppid()
    # Ctrl-C reaches the whole process group: the trainer stops with a save, for which it
    # still needs its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def settle(seconds: float = 0.3) -> None:
    """Call before exiting a program that used workers, once its iterators are out of scope.

    grain unlinks the workers' shared-memory batches from a background thread when they are
    garbage-collected; exiting before it runs makes Python's resource tracker report them as
    leaked. Collecting and then giving the thread a moment avoids that.
    """
    gc.collect()
    time.sleep(seconds)


def batch_shapes(
    spec: schema.SchemaSpec, batch_size: int
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Field -> (shape, dtype) of a batch, for building models without reading data."""
    return {k: ((batch_size, *s), dt) for k, (s, dt) in spec.shapes().items()}
