"""The device mesh and the ONE table that maps logical axis names to mesh axes.

Every parameter in `onerec_jax.model` names its axes with logical names
(`nn.with_logical_partitioning`), and block-boundary activations name theirs with the
`activation_*` names (`nn.with_logical_constraint`), so parameter and activation layouts are
chosen separately. `RULES` alone decides how both are laid out on a mesh with the axes
`MESH_AXES` ({"data": 4, "fsdp": 2, "tensor": 1, "expert": 1}, say):

  data    batch only (pure data parallelism: parameters replicated over it)
  fsdp    batch, and the model width of every weight (fully-sharded data parallelism: each
          device holds 1/fsdp of the parameters and optimizer moments; XLA gathers a layer's
          weights when it runs)
  tensor  heads, FFN width, the vocabulary of the output head and the rows of the feature
          tables (tensor parallelism)
  expert  routed experts (expert parallelism), and batch (an expert device trains on its own
          share of the requests)

A logical name missing from the table, or two logical axes of one array that land on the same
mesh axis, is an error (`check_logical`), never a silently replicated dimension.

Logical names (with the letter of the axis in shape-suffixed names such as x_BxLxD):
  batch   examples B               length  tokens of a sequence L/T/S
  embed   model width D            mlp     feed-forward width F
  heads   attention heads H        kv      per-head width K
  vocab   codes per level V        expert  experts E
  feature rows of the feature embedding tables
  layers  the stacked layer axis of scanned blocks
  activation_batch / activation_length / activation_embed: the same axes of activations
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes a batch is split over

# logical name -> mesh axis (or tuple of axes, or None for replicated)
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("feature", "tensor"),
    ("layers", None),  # the stacked axis of nn.scan'ed blocks
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
)
_MAPPING = dict(RULES)


def _mesh_axes(logical: str | None) -> tuple[str, ...]:
    target = _MAPPING[logical] if logical is not None else None
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def mesh_shape(axes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Sizes of the four mesh axes from `axes` (missing ones are 1; one axis may be -1, "the
    devices left", and when `data` and one other axis are -1, the other one takes them);
    their product must be `n_devices`."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    shape = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    rest = [a for a, n in shape.items() if n == -1]
    if len(rest) == 2 and shape["data"] == -1:
        # `data` takes the rest by default; another axis asked for it instead.
        shape["data"], rest = 1, [a for a in rest if a != "data"]
    if len(rest) > 1 or any(n == 0 or n < -1 for n in shape.values()):
        raise ValueError(f"mesh {shape}: sizes must be >= 1, and at most one may be -1")
    fixed = int(np.prod([n for n in shape.values() if n != -1]))
    if rest:
        if n_devices % fixed:
            raise ValueError(f"mesh {shape}: {n_devices} devices are not a multiple of {fixed}")
        shape[rest[0]] = n_devices // fixed
    need = int(np.prod(list(shape.values())))
    if need != n_devices:
        raise ValueError(f"mesh {shape} needs {need} devices, have {n_devices}")
    return shape


# How devices (numbered process by process) fill the mesh: `tensor` innermost, so a tensor
# group is neighbouring devices (one host's: tensor parallelism talks the most), and the batch
# axes outermost, so each process's devices hold one contiguous block of every batch, the rows
# the input pipeline gives it (`check_process_rows`).
_DEVICE_ORDER = ("data", "fsdp", "expert", "tensor")


def make_mesh(axes: Mapping[str, int] | None = None, devices: Any = None) -> Mesh:
    """A mesh with the four named axes over `devices` (default: all); see `mesh_shape`."""
    devs = np.asarray(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(axes or {"data": -1}), devs.size)
    grid = devs.reshape(tuple(shape[a] for a in _DEVICE_ORDER))
    grid = grid.transpose([_DEVICE_ORDER.index(a) for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_process_rows(mesh: Mesh, batch: int) -> None:
    """Raise unless this process's devices hold exactly rows [p*B/n, (p+1)*B/n) of a global
    batch of B rows, the rows process p of n reads (onerec_jax/data/pipeline.py). It fails
    when a batch shard spans processes (a `tensor` axis larger than one process's devices):
    each process would then hand JAX rows that belong elsewhere and train on a wrong batch."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return
    held: set[int] = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((batch,)).values():
        held.update(range(*index[0].indices(batch)))
    if held != set(range(p * batch // n, (p + 1) * batch // n)):
        raise ValueError(
            f"mesh {dict(mesh.shape)}: a batch shard spans processes, so process {p}'s devices "
            f"do not hold its own 1/{n} of the batch; keep `tensor` within one process's "
            f"{jax.local_device_count()} devices"
        )


def check_logical(tree: Any) -> None:
    """Raise if a leaf of a boxed (nn.LogicallyPartitioned) tree lacks logical names, uses a
    name that is not in RULES, or maps two of its axes onto one mesh axis."""

    def visit(path: tuple, leaf: Any) -> None:
        name = jax.tree_util.keystr(path)
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError(f"parameter {name} has no logical axis names")
        used: dict[str, str] = {}
        for axis in leaf.names:
            if axis is not None and axis not in _MAPPING:
                raise ValueError(f"parameter {name}: logical axis {axis!r} has no sharding rule")
            for mesh_axis in _mesh_axes(axis):
                if mesh_axis in used:
                    raise ValueError(
                        f"parameter {name}: logical axes {used[mesh_axis]!r} and {axis!r} both "
                        f"map to mesh axis {mesh_axis!r}; one of them would not be sharded"
                    )
                used[mesh_axis] = axis

    jax.tree_util.tree_map_with_path(
        visit, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def _divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes dropped from any dimension they do not divide (a 33-row
    feature table on tensor = 2 stays whole along its rows; the other dimensions still split)."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept: list[str] = []
        for a in axes:
            if shape[i] % (int(np.prod([mesh.shape[k] for k in kept])) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def shardings(boxed: Any, mesh: Mesh) -> Any:
    """NamedShardings for a boxed tree (from `jax.eval_shape(model.init, ...)`), laid out by
    RULES; a dimension that a mesh axis does not divide is not split over that axis."""
    check_logical(boxed)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)

    def one(leaf: Any) -> NamedSharding:
        spec = nn.logical_to_mesh_axes(leaf.names, RULES)
        return NamedSharding(mesh, _divisible(spec, leaf.value.shape, mesh))

    return jax.tree.map(one, boxed, is_leaf=is_box)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples (the leading axis) split over the batch axes of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the batch size must be a multiple of it."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


@contextlib.contextmanager
def rules_on(mesh: Mesh) -> Iterator[None]:
    """The mesh and the rules in effect: `nn.with_logical_constraint` in the model then lays
    activations out by RULES (outside it, the constraints do nothing)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def sharded_fraction(tree: Any) -> float:
    """The share of the elements of a tree of arrays that live split over >1 device (the rest
    are replicated): a check that parameters meant to be sharded really are."""
    total = sharded = 0
    for leaf in jax.tree.leaves(tree):
        total += leaf.size
        if not leaf.sharding.is_fully_replicated:
            sharded += leaf.size
    return sharded / max(total, 1)
