"""summary.json: what a run did, across every restart of it."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from onerec_jax.atomic import write_atomic
from onerec_jax.flops import Counts
from onerec_jax.train.run_log import Counters
from onerec_jax.train.state import Run


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def write_summary(
    run: Run,
    *,
    status: str,
    steps_done: int,
    counts: Counts,
    counters: Counters,
    eval_requests: int,
    distinct_train_requests: int,
    wall_s_this_run: float,
    mesh: dict[str, int],
    params_sharded_fraction: float,
    processes: int = 1,
    write: bool = True,
) -> dict[str, Any]:
    """Write WORKDIR/summary.json (when `write`: the main process) and return it: parameters,
    analytic FLOPs per sample and in total, samples and tokens seen, final train and
    validation loss, wall time."""
    cfg = run.cfg
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
        "items_seen": counters.items_seen,  # valid target items
        "tokens_seen": counters.items_seen * run.table.n_levels,  # semantic-id tokens with a loss
        "final_train_loss": _finite_or_none(counters.train_loss),  # null: no step logged
        # on the first eval_requests validation requests
        "final_eval_loss": _finite_or_none(counters.eval_loss),
        # its standard error over requests (null when fewer than 2 requests had a target)
        "final_eval_loss_se": _finite_or_none(counters.eval_loss_se),
        "eval_requests": eval_requests,  # requests behind final_eval_loss
        "distinct_train_requests": distinct_train_requests,
        # passes over the training split's distinct requests; > 1 means data repeated
        "data_passes": steps_done * cfg.batch_size / distinct_train_requests,
        "vocab": list(run.table.vocab),
        "mesh": mesh,  # the device mesh of this session (onerec_jax/sharding.py)
        # share of the parameter elements split over devices (the rest replicated)
        "params_sharded_fraction": params_sharded_fraction,
        "processes": processes,  # JAX processes of this session (hosts of a multi-host run)
        "wall_s_this_run": round(wall_s_this_run, 2),
        # training wall time of every session up to the last checkpoint (a finished run's
        # whole training time, unchanged by running it again)
        "wall_s_total": round(counters.wall_s, 2),
    }
    if not write:
        return summary
    path = pathlib.Path(run.workdir) / "summary.json"
    text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n"
    try:  # the old summary or the new one, never a half-written file
        write_atomic(path, text)
    except OSError as e:
        raise OSError(f"{path}: could not write the summary ({e.strerror or e})") from None
    return summary
