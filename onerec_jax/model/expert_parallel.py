"""Expert parallelism with explicit token dispatch: `shard_map` and two all-to-alls.

When a mesh is in effect (onerec_jax/sharding.py; its `expert` axis of size P, 1 included),
the dropless MoE layers dispatch this way instead of leaving XLA's partitioner to place them:

  1. each device routes its own tokens (the batch is split over data x fsdp x expert: the
     router's top-k runs on the device's T_local tokens, not on gathered scores) and writes
     every valid (token, expert) slot into a send buffer [P, S, D], row block j for the
     device of expert shard j, S = T_local * k rows per destination (so nothing is ever
     dropped, whatever the routing), with the slot's expert index within shard j;
  2. all_to_all over `expert`: each device receives the slots routed to its E / P experts;
  3. the local experts run as one grouped matmul (`jax.lax.ragged_dot`) over the received rows
     sorted by expert, empty rows sorted last and outside every group;
  4. all_to_all back, and each slot's output is read from where it was sent.

Every token meets the same expert weights as on one device, so the results equal the dropless
single-device layer up to float32 summation order (tested on {data 2, expert 4}). The price of
dropless dispatch with static shapes: send buffers hold P * T_local * k rows, P times the slots
(a ragged all-to-all would send only the filled rows). Inside the shard_map the expert weights
are whole along `embed` and `mlp` (gathered over fsdp when a layer runs, as FSDP does, and not
split over `tensor`: the tensor devices of an expert shard repeat its expert matmuls).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from onerec_jax import sharding
from onerec_jax.model.layers import grouped_swiglu

AXIS = "expert"


def expert_shards(n_experts: int, tokens: int) -> int:
    """P, the size of the mesh's `expert` axis (1 included), when per-device dispatch applies:
    a mesh is set (sharding.rules_on), no axis is already manual (inside another shard_map,
    e.g. beam search per data shard), P divides the experts and the batch axes divide the
    tokens (a 2-request init batch may not). 0 otherwise: XLA's partitioner then places the
    whole layer (which, even on a pure data mesh, gathers every token's router scores for the
    top-k and sorts all slots globally: why the per-device path is taken for P = 1 too)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return 0
    p = mesh.shape.get(AXIS, 1)
    shards = math.prod(mesh.shape.get(a, 1) for a in sharding.BATCH_AXES)
    return p if n_experts % p == 0 and tokens % shards == 0 else 0


def _per_device(router, x_TxD, w_router, bias_E, valid_T, w_gate, w_up, w_down):
    experts_TxK, gates_TxK, probs_TxE = router(x_TxD, w_router, bias_E)
    t, k = experts_TxK.shape
    d = x_TxD.shape[-1]
    p = jax.lax.axis_size(AXIS)
    e_local = w_gate.shape[0]
    s = t * k  # rows per destination: every slot could go to one shard
    dest = (experts_TxK // e_local).reshape(s)
    local_id = (experts_TxK % e_local).reshape(s)
    valid = jnp.broadcast_to(valid_T[:, None], (t, k)).reshape(s)
    # Row of each slot in its destination's block: valid slots in order, invalid ones to the
    # spare row s (dropped by the scatter).
    onehot = jax.nn.one_hot(dest, p, dtype=jnp.int32) * valid[:, None]
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    pos = jnp.where(valid, pos, s)
    x_slots = jnp.repeat(x_TxD, k, axis=0)
    send_x = jnp.zeros((p, s, d), x_TxD.dtype).at[dest, pos].set(x_slots, mode="drop")
    send_id = jnp.full((p, s), e_local, jnp.int32).at[dest, pos].set(local_id, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, AXIS, 0, 0, tiled=True)
    recv_id = jax.lax.all_to_all(send_id, AXIS, 0, 0, tiled=True)
    ids = recv_id.reshape(p * s)  # e_local marks an empty row: outside every group, masked
    y = grouped_swiglu(recv_x.reshape(p * s, d), ids, w_gate, w_up, w_down)
    y = jnp.where((ids < e_local)[:, None], y, 0.0)
    back = jax.lax.all_to_all(y.reshape(p, s, d), AXIS, 0, 0, tiled=True)
    y_slots = back[dest, jnp.minimum(pos, s - 1)]
    y_slots = jnp.where(valid[:, None], y_slots, 0.0)
    return experts_TxK, gates_TxK, probs_TxE, y_slots.reshape(t, k, d), valid.reshape(t, k)


def dropless_all_to_all(router, x_TxD, w_router, bias_E, valid_T, w_gate, w_up, w_down):
    """Route each device's tokens with `router(x, w_router, bias) -> (experts [T, k], gates
    [T, k], probs [T, E])` and dispatch them to the expert shards by all-to-all (module
    docstring); returns those three and the expert outputs [T, k, D] and kept slots [T, k]
    (= valid), all split over the batch axes. Call under a mesh for which `expert_shards`
    is not 0."""
    batch, whole = PartitionSpec(sharding.BATCH_AXES), PartitionSpec()
    experts = PartitionSpec(AXIS)
    fn = jax.shard_map(
        functools.partial(_per_device, router),
        in_specs=(batch, whole, whole, batch, experts, experts, experts),
        out_specs=(batch,) * 5,
    )
    return fn(x_TxD, w_router, bias_E, valid_T, w_gate, w_up, w_down)
