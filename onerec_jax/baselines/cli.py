"""`onerec baseline NAME --source S`: a baseline tuned on validation, scored on test (tune.py);
registered by onerec_jax/cli.py."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _baseline(args: argparse.Namespace) -> int:
    from onerec_jax.baselines import tune

    sets = tune.parse_sets(args.set, args.name)
    logdir = f"{args.out}/logs" if args.out else None
    result = tune.run(
        args.name, args.source, tune=not args.no_tune, seeds=args.seeds, sets=sets, logdir=logdir
    )
    if args.out:
        tune.write(f"{args.out}/result.json", result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        m, sd = result["test_mean"], result["test_sd"]
        print(
            f"{args.name} on {args.source} (test, {result['seeds']} seed(s)): "
            + ", ".join(
                f"{k} {m[k]:.4f}" + (f" ± {sd[k]:.4f}" if result["seeds"] > 1 else "") for k in m
            )
            + f"; settings {json.dumps(result['params'], sort_keys=True)}"
        )
    return 0


def register(sub: Any) -> None:
    """Add `onerec baseline` to `onerec`'s subparsers."""
    from onerec_jax.baselines import ABOUT

    bp = sub.add_parser(
        "baseline",
        help="a sequential-recommendation baseline, tuned on validation, scored on test",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="baselines:\n" + "\n".join(f"  {k:10s} {v}" for k, v in ABOUT.items()),
    )
    bp.add_argument("name", choices=sorted(ABOUT))
    bp.add_argument("--source", required=True, help="movielens-100k or parquet:PATH")
    bp.add_argument("--seeds", type=int, default=3, help="test seeds of a seed-dependent fit")
    bp.add_argument(
        "--no-tune", action="store_true", help="skip the validation grid: defaults and --set"
    )
    bp.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="fix a setting"
    )
    bp.add_argument("--out", default=None, help="write DIR/result.json and TensorBoard logs")
    bp.add_argument("--json", action="store_true", help="print the whole result as JSON")
    bp.set_defaults(fn=_baseline)
