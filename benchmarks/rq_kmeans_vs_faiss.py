"""Residual k-means: onerec_jax's balanced RQ-KMeans against faiss (what the peers use), one run.

Both quantise the same random Gaussian vectors (default 1M x 128-d, 3 levels x 1024 codes) on
the same machine, one after the other, with the same thread count; the script prints and writes
wall time, relative reconstruction error sum|x - x_hat|^2 / sum|x|^2 and per-level utilisation
of each. faiss runs `faiss.Kmeans` per level on the residuals (its default subsampling of 256
points per centroid, 20 iterations) and assigns every vector, as the peers' RQ-Kmeans scripts do.

    .venv/bin/pip install faiss-cpu==1.15.1   # or: pip install -e '.[bench]'
    .venv/bin/python benchmarks/rq_kmeans_vs_faiss.py [--n 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def run_faiss(x: np.ndarray, levels: int, k: int, iters: int, seed: int) -> dict:
    import faiss

    resid = x.copy()
    codes, books = [], []
    t0 = time.perf_counter()
    for level in range(levels):
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed + level, verbose=False)
        km.train(resid)
        _, a = km.index.search(resid, 1)
        a = a[:, 0]
        resid -= km.centroids[a]
        codes.append(a)
        books.append(km.centroids.copy())
    wall = time.perf_counter() - t0
    return {"wall_s": wall, **_metrics(x, np.stack(codes, 1), books)}


def run_ours(x: np.ndarray, levels: int, k: int, iters: int, seed: int, balanced: bool) -> dict:
    import jax

    from onerec_jax.tokenizer import rq_kmeans

    cfg = rq_kmeans.RQKMeansConfig(
        n_levels=levels, n_codes=k, n_iters=iters, balanced=balanced, seed=seed
    )
    # Compile outside the timed region on a small problem with the same K and d (XLA compiles
    # per shape; a real run compiles once, and the compile time is reported separately).
    t0 = time.perf_counter()
    rq_kmeans.fit(x[: 300 * k], cfg, progress=False)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q, codes = rq_kmeans.fit(x, cfg, progress=False)
    jax.block_until_ready(q.codebooks)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "warmup_s": compile_s, "config": cfg.__dict__}
    return {**out, **_metrics(x, codes, [np.asarray(c) for c in q.codebooks])}


def _metrics(x: np.ndarray, codes: np.ndarray, books: list[np.ndarray]) -> dict:
    from onerec_jax.tokenizer import rq_kmeans

    m = rq_kmeans.level_metrics(x, codes, books)
    return {
        "recon_error": m["recon_error"][-1],
        "recon_error_per_level": m["recon_error"],
        "utilisation": m["utilisation"],
        "max_load": m["max_load"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--faiss-iters", type=int, default=20)
    p.add_argument("--ours-iters", type=int, default=None, help="default: the config default")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()

    import faiss

    faiss.omp_set_num_threads(a.threads)
    x = np.random.default_rng(0).normal(size=(a.n, a.dim)).astype(np.float32)
    print(f"{a.n} x {a.dim} Gaussian, {a.levels} levels x {a.codes} codes, {a.threads} threads")
    from onerec_jax.tokenizer import rq_kmeans

    iters = a.ours_iters or rq_kmeans.RQKMeansConfig().n_iters
    res: dict = {"n": a.n, "dim": a.dim, "levels": a.levels, "codes": a.codes}
    res["machine"] = {"cpus": os.cpu_count(), "cpu": _cpu(), "platform": platform.platform()}
    res["faiss_version"] = faiss.__version__
    if not a.skip_faiss:
        res["faiss"] = run_faiss(x, a.levels, a.codes, a.faiss_iters, seed=1234)
        print("faiss      ", _line(res["faiss"]), flush=True)
    for name, balanced in (("ours_balanced", True), ("ours_plain", False)):
        res[name] = run_ours(x, a.levels, a.codes, iters, seed=0, balanced=balanced)
        print(f"{name:<11}", _line(res[name]), flush=True)
    if "faiss" in res:
        for name in ("ours_balanced", "ours_plain"):
            res[name]["time_ratio_vs_faiss"] = res[name]["wall_s"] / res["faiss"]["wall_s"]
            print(f"{name} / faiss wall time: {res[name]['time_ratio_vs_faiss']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _line(r: dict) -> str:
    util = "/".join(f"{u:.3f}" for u in r["utilisation"])
    load = "/".join(f"{u:.2f}" for u in r["max_load"])
    return (
        f"{r['wall_s']:7.1f} s  recon error {r['recon_error']:.4f}  utilisation {util}  "
        f"max load / ideal {load}"
    )


if __name__ == "__main__":
    main()
