"""`onerec align` and `onerec reward-model`: the alignment commands (registered by
onerec_jax/cli.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from onerec_jax.rl.align_config import METHODS


def _align(args: argparse.Namespace) -> int:
    from onerec_jax import config
    from onerec_jax.rl import align, align_config

    cfg = config.load(args.config, default=align_config.get_config)
    cfg = config.resolve(cfg, [*args.overrides, f"method={args.method}"])
    summary = align.align(cfg, args.init, args.workdir)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _reward_model(args: argparse.Namespace) -> int:
    import pathlib

    from onerec_jax.monitor import Progress
    from onerec_jax.rl import reward_model as rm
    from onerec_jax.train.run_config import load_run_config
    from onerec_jax.train.state import open_run

    for flag in ("steps", "batch_size", "eval_requests"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    out = pathlib.Path(args.out)
    if (out / "reward_model.json").exists() and not args.overwrite:
        raise FileExistsError(f"{out}: holds a reward model already (--overwrite replaces it)")
    run = open_run(load_run_config(args.init), pathlib.Path(args.init))
    bar = Progress(0, args.steps)
    try:
        model, params, losses = rm.train(
            run, args.steps, args.batch_size, args.lr, args.seed, bar.update
        )
    finally:
        bar.close()
    metrics = rm.evaluate(run, model, params, args.eval_requests, args.seed)
    meta = {"init": str(pathlib.Path(args.init).resolve()), "steps": args.steps}
    meta["data"] = rm.data_of(run)
    meta.update(final_train_loss=sum(losses[-10:]) / len(losses[-10:]), eval=metrics)
    rm.save(out, model, params, meta)
    print(json.dumps(meta, sort_keys=True))
    return 0


def register(sub: Any) -> None:
    """Add the alignment subcommands to `onerec`'s subparsers."""
    al = sub.add_parser(
        "align",
        help="align a pre-trained run with a reward (policy optimisation), resumable",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n"
        + "\n".join(f"  {k:6s} {v}" for k, v in METHODS.items())
        + "\n\nAny field of onerec_jax/rl/align_config.py can be set with --config.FIELD=VALUE",
    )
    al.add_argument("--method", required=True, choices=sorted(METHODS))
    al.add_argument("--init", required=True, help="the pre-trained run's workdir")
    al.add_argument("--workdir", required=True, help="checkpoints, logs and summary go here")
    al.add_argument(
        "--config", default=None, help="a Python file with get_config() (align_config's fields)"
    )
    al.set_defaults(fn=_align)

    rmp = sub.add_parser(
        "reward-model", help="fit a P-Score reward model on a run's logged feedback, evaluate it"
    )
    rmp.add_argument("--init", required=True, help="a run's workdir: its source and context")
    rmp.add_argument("--out", required=True, help="where the reward model is written")
    rmp.add_argument("--steps", type=int, default=300)
    rmp.add_argument("--batch-size", type=int, default=32)
    rmp.add_argument("--lr", type=float, default=1e-3)
    rmp.add_argument("--seed", type=int, default=0)
    rmp.add_argument("--eval-requests", type=int, default=1024, help="validation requests")
    rmp.add_argument("--overwrite", action="store_true", help="replace an existing model")
    rmp.set_defaults(fn=_reward_model)
