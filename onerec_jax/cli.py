"""`onerec` command line: thin wrappers that parse arguments and call library functions."""

from __future__ import annotations

import argparse
import json
import pathlib
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


def _batches(args: argparse.Namespace) -> int:
    from onerec_jax.demo import run

    run(logdir=args.logdir, batches=args.batches, workers=args.workers)
    return 0


def _data_export(args: argparse.Namespace) -> int:
    import pathlib

    from onerec_jax.data import logs
    from onerec_jax.data.sources import open_source

    src = open_source(args.source)
    if src.kind != "log":
        raise ValueError(f"{args.source}: only logged sources are written as a user log")
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out}: exists (--overwrite replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    logs.write(out, src.log)
    log = src.log
    print(f"{out}: {log.n_events:,} events, {log.n_users:,} users, {log.n_items:,} items")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from scaling import demo

    return demo.run(args.sweep, args.out, bootstrap=args.bootstrap, runners=args.runners)


def _tokenize(args: argparse.Namespace) -> int:
    from onerec_jax import config
    from onerec_jax.tokenizer import build

    cfg = config.resolve(config.load(args.config, build.get_config), args.overrides)
    report = build.tokenize(
        args.source, args.out, cfg, overwrite=args.overwrite, progress=not args.quiet
    )
    if args.json:
        print(json.dumps(report, sort_keys=True, allow_nan=False))
    else:
        for k in (
            "n_items",
            "vocab",
            "utilisation",
            "recon_error",
            "collision_rate_before_dedup",
            "collision_rate_after_dedup",
        ):
            print(f"{k:28s} {json.dumps(report[k])}")
        print(f"table and report written to {args.out}")
    return 0


def _start_processes(args: argparse.Namespace, preemption: bool = True) -> None:
    """jax.distributed for a multi-process run (onerec_jax/distributed.py), before JAX starts."""
    from onerec_jax import distributed

    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        force=args.distributed,
        preemption=preemption,
        heartbeat_s=args.heartbeat_s,
    )


def _add_process_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process runs (one command per host; SLURM srun, Open MPI and TPU pods are detected)"
    )
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0 .. N-1")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="start jax.distributed from the cluster's environment (e.g. a Cloud TPU VM slice)",
    )
    g.add_argument(
        "--heartbeat-s",
        type=int,
        default=100,
        help="seconds without a heartbeat after which a peer counts as dead and the run stops",
    )


def _train(args: argparse.Namespace) -> int:
    from onerec_jax import config
    from onerec_jax.train import loop

    _start_processes(args)
    cfg = config.resolve(config.load(args.config), args.overrides)
    summary = loop.train(cfg, args.workdir)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from onerec_jax.evaluate import evaluate_run, write_eval
    from scaling.compile_plan import parse_mesh

    _start_processes(args, preemption=False)  # eval saves nothing: SIGTERM just stops it
    metrics = evaluate_run(
        args.workdir,
        args.split,
        beam=args.beam,
        batch=args.batch_size,
        max_requests=args.max_requests,
        mesh=parse_mesh(args.mesh) if args.mesh else None,  # None: the run's own mesh
        write=False,  # printed first: a workdir that cannot be written loses nothing
        scenario=args.scenario,
    )
    if args.json:
        print(json.dumps(metrics, sort_keys=True), flush=True)
    else:
        for k, v in metrics.items():
            if k == "scenarios":  # one line per scenario and metric
                for name, sm in v.items():
                    for mk, mv in sm.items():
                        print(f"{name + '.' + mk:20s} {mv}", flush=True)
            else:
                print(f"{k:12s} {json.dumps(v) if isinstance(v, dict) else v}", flush=True)
    write_eval(pathlib.Path(args.workdir).resolve(), metrics, args.max_requests)
    return 0


def _fit(args: argparse.Namespace) -> int:
    from scaling import fit

    rows = fit.load_table(args.table)
    if args.law == "isoflop":  # a sweep's table may hold grid points too: they have no budget
        rows = [r for r in rows if r.get("budget") is not None]
        if not rows:
            raise ValueError(f"{args.table}: no row has a `budget` (no iso-FLOP points)")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if args.by and args.by not in r:
            raise ValueError(f"{args.table}: a row has no column {args.by!r} to group by")
        groups.setdefault(str(r[args.by]) if args.by else "all", []).append(r)
    out = {}
    for name, group in sorted(groups.items()):
        source = f"{args.table} ({args.by}={name})" if args.by else str(args.table)
        common = {"n_column": args.n_column, "loss_column": args.loss_column, "source": source}
        if args.law == "isoflop":
            out[name] = fit.isoflop(group, **common)
        else:
            out[name] = fit.fit(group, args.law, bootstrap=args.bootstrap, **common)
    result = out if args.by else out["all"]
    if args.json:
        print(json.dumps(result, sort_keys=True, allow_nan=False))
        return 0
    for name, r in out.items():
        if "params" in r:
            print(f"{name}: {fit.describe(r)}")
        else:
            print(f"{name}: isoflop {json.dumps(r, sort_keys=True)}")
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

    exp = data.add_parser(
        "export",
        help="write a logged source as a user log (Parquet, or CSV by suffix): "
        "`--source parquet:PATH` (csv:PATH) reads it back",
    )
    exp.add_argument("--source", required=True, help="movielens-100k | parquet:PATH")
    exp.add_argument("--out", required=True, help="the file to write (.parquet or .csv)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp.set_defaults(fn=_data_export)

    bat = data.add_parser("batches", help="build the world and MovieLens pipelines, show batches")
    bat.add_argument("--logdir", default="runs/batches", help="TensorBoard log folder")
    bat.add_argument("--batches", type=int, default=40, help="batches timed per pipeline")
    bat.add_argument("--workers", type=int, default=2, help="grain worker processes")
    bat.set_defaults(fn=_batches)

    demo = sub.add_parser(
        "demo", help="a micro scaling study: sweep V1 and V2, fit L(N), plot (scaling/demo.py)"
    )
    demo.add_argument("--sweep", default="experiments/sweeps/demo.py", help="the sweep file")
    demo.add_argument("--out", default="runs/demo", help="the sweep directory")
    demo.add_argument("--bootstrap", type=int, default=200, help="refits for the 95%% intervals")
    demo.add_argument("--runners", type=int, default=2, help="sweep runners sharing the points")
    demo.set_defaults(fn=_demo)

    tok = sub.add_parser(
        "tokenize",
        help="item embeddings -> balanced RQ-KMeans -> semantic-id table",
        epilog="Any config field can be set with --config.FIELD=VALUE, e.g. --config.rq.n_codes=64",
    )
    tok.add_argument("--source", required=True, help="movielens-100k | world:PRESET | parquet:PATH")
    tok.add_argument("--out", required=True, help="output directory for the table and report")
    tok.add_argument("--config", default=None, help="a Python file with get_config()")
    tok.add_argument("--overwrite", action="store_true", help="replace an existing table")
    tok.add_argument("--json", action="store_true", help="print the report as one JSON object")
    tok.add_argument("--quiet", action="store_true", help="no progress bars")
    tok.set_defaults(fn=_tokenize)

    tr = sub.add_parser(
        "train",
        help="train (or resume) a model in WORKDIR",
        epilog="Any config field can be set with --config.FIELD=VALUE",
    )
    tr.add_argument(
        "--config",
        required=True,
        help="a Python file with get_config() (experiments/*.py) or a packaged config name "
        "(default, v1_ml100k, v1_world_small, v1_vs_v2)",
    )
    tr.add_argument("--workdir", required=True, help="checkpoints, logs and summary go here")
    _add_process_flags(tr)
    tr.set_defaults(fn=_train)

    from onerec_jax.rl import cli as rl_cli

    rl_cli.register(sub)

    from onerec_jax.baselines import cli as baseline_cli

    baseline_cli.register(sub)

    evp = sub.add_parser("eval", help="Recall/NDCG@K of a run's newest checkpoint")
    evp.add_argument("--workdir", required=True)
    evp.add_argument("--split", choices=("validation", "test"), default="test")
    evp.add_argument("--beam", type=int, default=128, help="beam width of the search")
    evp.add_argument("--batch-size", type=int, default=64, help="requests per beam search")
    evp.add_argument("--max-requests", type=int, default=None, help="evaluate only the first N")
    evp.add_argument(
        "--mesh",
        default="",
        help="device mesh of the search, e.g. data=4 or data=-1 (-1: the rest); default the "
        "run's own (its config's mesh section)",
    )
    evp.add_argument(
        "--scenario",
        default="",
        choices=("", "card", "video", "live"),
        help="e-commerce world: evaluate on this scenario's requests only",
    )
    evp.add_argument("--json", action="store_true", help="print one JSON object")
    _add_process_flags(evp)
    evp.set_defaults(fn=_eval)

    from scaling import plan_cli

    plan_cli.register(sub)

    ft = sub.add_parser("fit", help="fit a scaling law to a JSONL results table (scaling/fit.py)")
    ft.add_argument("--table", required=True, help="JSONL, one row per run")
    ft.add_argument("--law", required=True, choices=("power-n", "power-c", "chinchilla", "isoflop"))
    ft.add_argument("--by", default=None, help="fit each value of this column apart (family)")
    ft.add_argument("--n-column", default="n_active", help="the parameter count N")
    ft.add_argument("--loss-column", default="loss", help="the loss to fit")
    ft.add_argument("--bootstrap", type=int, default=200, help="refits for the 95%% intervals")
    ft.add_argument("--json", action="store_true", help="print one JSON object")
    ft.set_defaults(fn=_fit)

    from scaling import plot, sweep_cli

    sweep_cli.register(sub)
    plot.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `onerec` command itself
        from onerec_jax import hugepages

        hugepages.reexec()
    from onerec_jax.config import ConfigError, split_overrides

    try:
        rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"onerec: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    if overrides and args.command not in ("tokenize", "train", "align"):
        print(f"onerec: error: {args.command} takes no --config.* overrides", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (ValueError, OSError, IndexError, FloatingPointError) as e:
        # One clear line for bad input or a failed write (disk full, read-only).
        print(f"onerec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops training with a save)
        print("onerec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
