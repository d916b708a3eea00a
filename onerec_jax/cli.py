"""`onerec` command line: thin wrappers that parse arguments and call library functions."""

from __future__ import annotations

import argparse
import json
import sys


def _data_stats(args: argparse.Namespace) -> int:
    from onerec_jax.data.stats import source_stats

    stats = source_stats(args.source, seed=args.seed, max_examples=args.max_examples)
    if args.json:
        print(json.dumps(stats, sort_keys=True, allow_nan=False))
    else:
        for k, v in stats.items():
            print(f"{k:24s} {json.dumps(v, sort_keys=True)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from onerec_jax.demo import run

    run(logdir=args.logdir, batches=args.batches, workers=args.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect data sources").add_subparsers(
        dest="data_cmd", required=True
    )
    stats = data.add_parser("stats", help="summary statistics of a source")
    stats.add_argument(
        "--source",
        required=True,
        help="movielens-100k | world:PRESET (tiny|small|large) | parquet:PATH",
    )
    stats.add_argument("--seed", type=int, default=0, help="world seed (ignored by logged sources)")
    stats.add_argument(
        "--max-examples", type=int, default=2000, help="examples sampled for pathway statistics"
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(fn=_data_stats)

    demo = sub.add_parser("demo", help="build the world and MovieLens pipelines, show batches")
    demo.add_argument("--logdir", default="runs/demo", help="TensorBoard log folder")
    demo.add_argument("--batches", type=int, default=40, help="batches timed per pipeline")
    demo.add_argument("--workers", type=int, default=2, help="grain worker processes")
    demo.set_defaults(fn=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, IndexError) as e:
        # One clear line for bad input, not a traceback.
        print(f"onerec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
