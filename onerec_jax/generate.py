"""Trie-constrained beam search over semantic ids: every returned tuple is a real item.

Works for V1 and V2 alike through their `encode` / `init_cache` / `step` methods. The user
context is encoded once per request and each decoder layer's cross-attention K/V are computed
from it once per user (`init_cache`; V2's context K/V come straight out of `encode`); the
user's W beams are folded into the query axis, so nothing user-sized is ever copied per beam.
Each generated code costs one decoder position (`step`, self-attention KV cache). At level l
all W beams of all B users are scored in one call, the codes the trie does not allow after
each beam's prefix are masked, and one top-k over W * V_l per user keeps the W best
extensions: no Python loop over beams. (A point-wise model's first code is scored on one row
per user, since every beam starts from BOS, and the top-k over V_0 branches the W beams.) The
self-attention cache rows follow their beams through that top-k. MoE layers route dropless
in `step` whatever their training dispatch: capacity shared by the B x W rows of a step would
make a user's results depend on its batch mates (tested: each user's beams are the same alone
as batched).

Point-wise models generate one item (Q codes) per beam. Session-wise models (2502.18965)
generate `max_targets` items per beam, the trie restarting at the root after each item; the
loop over items is a `lax.scan` and the Q (<= 4) levels inside it are unrolled at trace time,
because each level's trie arrays have their own shapes. Items of one session are not forced to
be distinct.

On a device mesh (`beam_search_on_mesh`) the requests are split over the mesh's batch axes
(onerec_jax/sharding.py) and the parameters keep their training layout. Each `data` shard
runs its own search (`shard_map`), so a request's W beams and their caches stay on its
devices; the searches give one device's items (tested on 4 simulated devices,
tests/test_mesh_eval.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from onerec_jax import sharding
from onerec_jax.model.v1 import OneRecV1
from onerec_jax.model.v2 import OneRecV2
from onerec_jax.tokenizer.semantic_ids import Trie


def search(
    model: OneRecV1 | OneRecV2,
    variables: Any,
    inputs: dict[str, jax.Array],
    trie: Trie,
    beam: int,
) -> dict[str, jax.Array]:
    """Top `beam` results per request, best first (`beam_search` is this function jitted;
    `_gathered` traces it unjitted, under other logical-axis rules than a jit cache of it
    would see).

    Returns `items` [B, W] (0 where fewer than W items exist), `logprob` [B, W] (sum over the
    generated codes; -inf for those) and `codes` [B, W, Q]. Session-wise models also return
    `sessions` [B, W, m] and `session_codes` [B, W, m, Q]; their `items`/`codes` are the first
    item of each session.
    """
    cfg = model.cfg
    q = len(cfg.vocab)
    if tuple(trie.vocab) != tuple(cfg.vocab):
        raise ValueError(f"trie vocab {trie.vocab} != model vocab {cfg.vocab}")
    n_items = cfg.max_targets if cfg.session_wise else 1
    mem, mem_mask = model.apply(variables, inputs, method="encode")
    b, w = mem_mask.shape[0], beam

    def start(rows_per_user: int) -> dict[str, Any]:
        """The state before the first code: BOS in `rows_per_user` rows per user, of which
        only the first is alive (score 0, the others -inf), so the first top-k does not pick
        the same code several times."""
        n = b * rows_per_user
        alive = jnp.arange(rows_per_user)[None, :] == 0
        return {
            "cache": model.apply(variables, mem, mem_mask, n, method="init_cache"),
            "token": jnp.full((n,), cfg.n_tokens - 1, jnp.int32),  # BOS
            "score": jnp.broadcast_to(jnp.where(alive, 0.0, -jnp.inf), (b, rows_per_user)),
            "codes": jnp.zeros((b, rows_per_user, n_items, q), jnp.int32),
            "items": jnp.zeros((b, rows_per_user, n_items), jnp.int32),
        }

    def advance(
        carry: dict[str, Any], nodes: jax.Array, level: int, pos: jax.Array | int
    ) -> tuple[dict[str, Any], jax.Array]:
        """One code for every beam: the carry's R rows per user (R = 1 before a point-wise
        model's first code, else W) become the W best extensions per user."""
        r = carry["score"].shape[1]
        logits, cache = model.apply(variables, carry["cache"], carry["token"], pos, method="step")
        lo, v = int(cfg.offsets[level]), cfg.vocab[level]
        logp = jax.nn.log_softmax(logits[:, lo : lo + v], axis=-1)
        logp = jnp.where(trie.valid_mask(level, nodes), logp, -jnp.inf)
        total = (carry["score"].reshape(b * r, 1) + logp).reshape(b, r * v)
        if r * v < w:  # fewer extensions than beams: the rest are dead (-inf) beams
            total = jnp.pad(total, ((0, 0), (0, w - r * v)), constant_values=-jnp.inf)
        top, flat = jax.lax.top_k(total, w)  # [B, W]
        parent = jnp.minimum(flat // v, r - 1)
        code = (flat % v).astype(jnp.int32)
        rows = (jnp.arange(b)[:, None] * r + parent).reshape(-1)
        nodes = trie.step(level, nodes[rows], code.reshape(-1))
        nodes = jnp.where(jnp.isfinite(top.reshape(-1)), nodes, -1)
        carry = {
            # Self-attention cache rows follow their beams; per-user K/V stay put.
            "cache": cache.take_rows(rows),
            "token": code.reshape(-1) + lo,
            "score": top,
            "codes": jnp.take_along_axis(carry["codes"], parent[..., None, None], axis=1),
            "items": jnp.take_along_axis(carry["items"], parent[..., None], axis=1),
        }
        carry["codes"] = carry["codes"].at[:, :, pos // q, level].set(code)
        return carry, nodes

    def one_item(carry: dict[str, Any], j: jax.Array | int) -> tuple[dict[str, Any], None]:
        nodes = jnp.where(jnp.isfinite(carry["score"].reshape(-1)), 0, -1)  # back to the root
        for level in range(q):  # Q <= 4 levels, unrolled (see module docstring)
            carry, nodes = advance(carry, nodes, level, j * q + level)
        item = trie.item_of(nodes).reshape(b, w)
        carry["items"] = carry["items"].at[:, :, j].set(item)
        return carry, None

    if n_items == 1:
        # Point-wise: every beam of a user starts from the same BOS, so the first code is
        # scored on one row per user (not W identical ones) and the W beams branch from it.
        carry, _ = one_item(start(1), 0)
    else:  # session-wise: the scan's carry keeps W rows per user throughout
        carry, _ = jax.lax.scan(one_item, start(w), jnp.arange(n_items))
    out = {
        "items": carry["items"][:, :, 0],
        "logprob": carry["score"],
        "codes": carry["codes"][:, :, 0],
    }
    if cfg.session_wise:
        out["sessions"] = carry["items"]
        out["session_codes"] = carry["codes"]
    return out


beam_search = jax.jit(search, static_argnames=("model", "beam"))


def on_mesh(tree: Any, where: NamedSharding) -> Any:
    """A tree of host arrays (or arrays already laid out as `where`) as global arrays laid out
    as `where`. Every process holds the whole host array and JAX asks each one only for the
    slices its own devices hold, so this works with several processes too."""

    def one(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == where:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, where, lambda idx: host[idx])

    return jax.tree.map(one, tree)


# Inside the per-`data`-shard search below, `data` is a manual axis: the model's batch
# constraints may name only the batch axes left to XLA.
_IN_SHARD_RULES = tuple(
    (name, tuple(a for a in target if a != "data") if target == sharding.BATCH_AXES else target)
    for name, target in sharding.RULES
)


@functools.cache
def _gathered(mesh: Mesh) -> Any:
    """`beam_search` of a batch split over the mesh's batch axes, as one independent search
    per `data` shard (`shard_map`). The beam bookkeeping gathers rows by index (cache rows
    follow their beams, trie nodes their parents); over one flat batch split across devices
    XLA cannot tell that a beam's parent lives on its own device, and all-gathers the whole
    self-attention cache at every level. Per shard, those gathers stay on the shard's
    devices. Parameters are replicated over `data` (sharding.RULES), so a shard reads them
    where they are; their `fsdp` / `tensor` / `expert` splits, and the part of the batch on
    `fsdp` and `expert`, are left to XLA's partitioner. The results come back replicated on
    every device, so that each process can read them whole (a process cannot read shards
    that live on another process's devices)."""
    batch, whole = PartitionSpec("data"), PartitionSpec()

    def per_data_shard(
        model: OneRecV1 | OneRecV2, variables: Any, inputs: Any, trie: Trie, beam: int
    ) -> dict[str, jax.Array]:
        def one(variables: Any, inputs: Any, trie: Trie) -> dict[str, jax.Array]:
            with nn.logical_axis_rules(_IN_SHARD_RULES):
                return search(model, variables, inputs, trie, beam)

        # check_vma off: the model's layer scans (nn.scan) start carries from constants that
        # the step turns into per-shard values, a carry type change that shard_map's
        # varying-axes check rejects; nothing in the search reduces over `data`, so the
        # check would have nothing to catch.
        per_shard = jax.shard_map(
            one,
            mesh=mesh,
            in_specs=(whole, batch, whole),
            out_specs=batch,
            axis_names={"data"},
            check_vma=False,
        )
        return per_shard(variables, inputs, trie)

    rep = sharding.replicated(mesh)
    return jax.jit(per_data_shard, static_argnames=("model", "beam"), out_shardings=rep)


def beam_search_on_mesh(
    model: OneRecV1 | OneRecV2,
    variables: Any,
    inputs: Mapping[str, np.ndarray],
    trie: Trie,
    beam: int,
    mesh: Mesh,
) -> dict[str, np.ndarray]:
    """`beam_search` of host `inputs` [B, ...] with the requests split over the batch axes of
    `mesh` (`variables` laid out on it, as `onerec_jax.train.state.restore_latest` gives
    them); the results come back as host arrays [B, ...] in every process.

    B need not divide over the batch shards: the batch is padded with copies of its last
    request, whose results are dropped (a request's beams do not depend on its batch mates:
    MoE layers decode dropless)."""
    b = len(next(iter(inputs.values())))
    pad = -b % sharding.batch_shards(mesh)
    host = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in inputs.items()}
    split = on_mesh(host, sharding.batch_sharding(mesh))
    trie = on_mesh(trie, sharding.replicated(mesh))
    with sharding.rules_on(mesh):
        out = _gathered(mesh)(model, variables, split, trie, beam)
    return {k: np.asarray(v)[:b] for k, v in out.items()}
