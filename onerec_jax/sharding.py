"""Device mesh and the ONE table that maps logical axis names to mesh axes.

Every parameter and block-boundary activation in `onerec_jax.model` names its axes with the
logical names below (`nn.with_logical_partitioning` / `nn.with_logical_constraint`); this table
alone decides how they are laid out on a mesh such as {"data": 4, "fsdp": 2, "tensor": 1,
"expert": 1}. A logical name missing from the table is an error, never silently replicated.

Logical names (with the letter of the axis in shape-suffixed names such as x_BxLxD):
  batch   examples                 length  tokens of a sequence (pathway or semantic-id slots)
  embed   model width D            mlp     feed-forward width F
  heads   attention heads H        kv      per-head width K
  vocab   codes per level V        expert  experts E
  feature embedding tables of user/item features (rows)
  layers  the stacked layer axis of scanned blocks
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("feature", "tensor"),
    ("layers", None),  # the stacked axis of nn.scan'ed blocks
)
_KNOWN = {name for name, _ in LOGICAL_RULES}


def make_mesh(axes: Mapping[str, int] | None = None, devices: Any = None) -> Mesh:
    """A mesh with the four named axes; sizes from `axes` (missing ones are 1). The product
    must equal the number of devices used (default: all)."""
    axes = dict(axes or {"data": len(devices if devices is not None else jax.devices())})
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    shape = tuple(int(axes.get(a, 1)) for a in MESH_AXES)
    devs = np.asarray(jax.devices() if devices is None else devices)
    if int(np.prod(shape)) != devs.size:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {np.prod(shape)} "
            f"devices, have {devs.size}"
        )
    return Mesh(devs.reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_logical(tree: Any) -> None:
    """Raise if any leaf of a boxed (nn.LogicallyPartitioned) tree lacks logical names or uses a
    name that is not in LOGICAL_RULES."""

    def visit(path: tuple, leaf: Any) -> None:
        name = jax.tree_util.keystr(path)
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError(f"parameter {name} has no logical axis names")
        for axis in leaf.names:
            if axis is not None and axis not in _KNOWN:
                raise ValueError(f"parameter {name}: logical axis {axis!r} has no sharding rule")

    jax.tree_util.tree_map_with_path(
        visit, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def shardings(boxed: Any, mesh: Mesh) -> Any:
    """NamedShardings for a boxed tree (from `jax.eval_shape(model.init, ...)`)."""
    check_logical(boxed)
    specs = nn.get_partition_spec(boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
