"""onerec_jax against the Hugging Face peer on this machine, side by side in one run.

Two comparisons (the setups the project's peer figures were first measured with):
  train  one AdamW train step at the TIGER shape: T5ForConditionalGeneration (4 + 4 layers,
         d_model 128, 6 heads x 64, FFN 1024, vocab 1024; 64 input tokens, 3 codes + eos) vs
         our V1 (4 + 4 layers, d_model 128, FFN 1024 GELU, a 64-token user context) and V2
         (8 lazy decoder layers, the same context). f32, batch 256, dropout 0.
  beam   trie-constrained beam search, 16 users, a random 10,000-item trie over 3 x 256 codes:
         T5 `generate(num_beams=W, prefix_allowed_tokens_fn=...)` vs our `beam_search`, beam 32
         and 128 (V1 and V2), and V2 at beam 512 (ours only: latency per user).

Each side runs in its own long-lived process: the peer in `.venv-peers` (torch CPU +
transformers, installed by `make bench-peers`; the project's own install never has torch), ours
in the project's venv. Processes of one comparison take turns: `--rounds` blocks of `--reps`
timed calls each, the order rotating every round, so drift of a shared machine hits both sides.
Setup and compile are timed apart and never in the figures. Ratios are of median times.
Writes benchmarks/results/peers.json (machine, versions, the command, min/median/max).

    make bench-peers                  # installs .venv-peers, then runs this
    .venv/bin/python benchmarks/peers.py --peer-python .venv-peers/bin/python [--only train]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys

import numpy as np

from onerec_jax import hugepages

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent

# The TIGER-size T5 of the peers' measurements, and the matching request shape.
T5 = {
    "vocab_size": 1024,
    "d_model": 128,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_heads": 6,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
SHAPE = {
    "t5": T5,
    "batch": 256,
    "context_tokens": 64,
    "levels": 3,
    "codes": 256,
    # Ours: the same width, depth and FFN; heads of head width 32 (our attention's inner width
    # is d_model, T5's is 6 x 64 = 384); 64 context tokens = 1 static + 20 short + 27 positive
    # + 16 QFormer queries over 16 lifelong events.
    "source": "world:small",
    "d_model": 128,
    "d_ff": 1024,
    "heads": 4,
    "enc_layers": 4,
    "dec_layers": 4,
    "v2_layers": 8,
    "short_len": 20,
    "pos_len": 27,
    "life_len": 16,
    "n_queries": 16,
    "author_dim": 64,
    "feature_dim": 32,
    "unroll_layers": True,  # our config's speed option (onerec_jax/configs/default.py)
    # beam search
    "users": 16,
    "trie_items": 10_000,
    "trie_seed": 0,
}
GOALS = {"train": 2.0, "beam": 20.0}  # the project's goals: ours / the peer's throughput


def t5_train_flops(t5: dict, enc_len: int, dec_len: int) -> float:
    """Matmul FLOPs of one T5 train step per sample (forward x 3), counted by hand: the
    projections, attention scores and values, FFN and the LM head; embeddings are lookups."""
    d, inner, ff, v = t5["d_model"], t5["d_kv"] * t5["num_heads"], t5["d_ff"], t5["vocab_size"]
    macs = t5["num_layers"] * enc_len * (4 * d * inner + 2 * d * ff + 2 * enc_len * inner)
    per_dec = (
        dec_len * (4 * d * inner + 2 * d * inner + 2 * d * ff)  # self q,k,v,o; cross q,o; FFN
        + enc_len * 2 * d * inner  # cross-attention keys/values of the encoder tokens
        + dec_len * 2 * (dec_len + enc_len) * inner  # scores and values
    )
    macs += t5["num_decoder_layers"] * per_dec + dec_len * d * v
    return 3 * 2 * macs


class Worker:
    """One side's process, driven by JSON lines."""

    def __init__(self, argv: list[str], label: str) -> None:
        self.label = label
        # Both sides get what `onerec` gives itself: glibc's malloc on transparent huge pages
        # (onerec_jax/hugepages.py; measured, it barely moves torch's step).
        env = hugepages.environ(dict(os.environ, PYTHONUNBUFFERED="1"))
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label}: the worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def stats(times: list[float]) -> dict:
    return {
        "min_s": float(np.min(times)),
        "median_s": float(np.median(times)),
        "max_s": float(np.max(times)),
        "n": len(times),
        "times_s": times,
    }


def compare(sides: dict[str, tuple[list[str], dict]], rounds: int, reps: int) -> dict:
    """Set every side up, then `rounds` rounds of `reps` timed calls per side, the order
    rotating each round. Returns each side's setup reply and timing stats."""
    workers = {}
    out: dict[str, dict] = {}
    try:
        for name, (argv, setup) in sides.items():
            workers[name] = Worker(argv, name)
            out[name] = {"setup": workers[name].ask({"op": "setup", **setup})}
            print(f"  {name}: set up in {out[name]['setup']['setup_s']:.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name] += workers[name].ask({"op": "run", "reps": reps})["times"]
            line = "  ".join(f"{n} {np.median(times[n]) * 1e3:8.1f} ms" for n in names)
            print(f"  round {r + 1}/{rounds}: {line}", flush=True)
        for name in names:
            out[name] |= stats(times[name])
    finally:
        for w in workers.values():
            w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--only", choices=("train", "beam"), nargs="+", default=["train", "beam"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--beams", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--v2-beam", type=int, default=512, help="V2-only latency row; 0: none")
    ap.add_argument("--rolled", action="store_true", help="our stacks rolled")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    a = ap.parse_args()
    if not pathlib.Path(a.peer_python).exists():
        raise SystemExit(f"{a.peer_python}: no peer interpreter; `make bench-peers` installs it")
    # Both sides use every core: torch's intra-op threads = the cores, XLA:CPU's default.
    peer = [a.peer_python, str(HERE / "peer_torch.py"), str(os.cpu_count())]
    if a.rolled:
        SHAPE["unroll_layers"] = False
    ours = [sys.executable, str(HERE / "peer_ours.py")]
    result: dict = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": _cpu_model(),
        },
        "shape": SHAPE,
        "glibc_tunables": hugepages.environ().get("GLIBC_TUNABLES", ""),
        "goals": GOALS,
        "rows": [],
    }
    if "train" in a.only:
        print("train step, TIGER shape, f32, batch 256", flush=True)
        setup = {"task": "train", **SHAPE}
        sides = {
            "hf_t5": (peer, setup),
            "v1": (ours, {**setup, "family": "v1"}),
            "v2": (ours, {**setup, "family": "v2"}),
        }
        r = compare(sides, a.rounds, a.reps)
        peer_flops = t5_train_flops(T5, SHAPE["context_tokens"], SHAPE["levels"] + 1)
        r["hf_t5"]["setup"]["flops_train_per_sample"] = peer_flops
        for side in r.values():
            side["samples_per_s"] = SHAPE["batch"] / side["median_s"]
            side["gflops_per_s"] = (
                side["setup"]["flops_train_per_sample"] / 1e9 * (SHAPE["batch"] / side["median_s"])
            )
        for fam in ("v1", "v2"):
            ratio = r[fam]["samples_per_s"] / r["hf_t5"]["samples_per_s"]
            # Our models need fewer FLOPs per sample (attention as wide as the model, not
            # 6 x 64): the FLOP rate says how much of the ratio is the smaller model.
            flop_rate = r[fam]["gflops_per_s"] / r["hf_t5"]["gflops_per_s"]
            result["rows"].append(
                {
                    "comparison": f"train {fam} vs hf_t5",
                    "ratio": ratio,
                    "flop_rate_ratio": flop_rate,
                    "goal": GOALS["train"],
                }
            )
            print(
                f"  {fam}: {ratio:.2f}x the peer's samples/s (goal {GOALS['train']}x), "
                f"{flop_rate:.2f}x its GFLOP/s"
            )
        result["train"] = r
    if "beam" in a.only:
        result["beam"] = {}
        for beam in a.beams:
            print(f"beam search, beam {beam}, {SHAPE['users']} users", flush=True)
            setup = {"task": "beam", "beam": beam, **SHAPE}
            sides = {
                "hf_t5": (peer, setup),
                "v1": (ours, {**setup, "family": "v1"}),
                "v2": (ours, {**setup, "family": "v2"}),
            }
            # HF's generate is slow at wide beams: fewer calls keep the run short.
            r = compare(sides, a.rounds, max(1, a.reps // 2 if beam > 64 else a.reps))
            for side in r.values():
                side["users_per_s"] = SHAPE["users"] / side["median_s"]
            for fam in ("v1", "v2"):
                ratio = r[fam]["users_per_s"] / r["hf_t5"]["users_per_s"]
                result["rows"].append(
                    {
                        "comparison": f"beam {beam} {fam} vs hf_t5",
                        "ratio": ratio,
                        "goal": GOALS["beam"],
                    }
                )
                print(f"  {fam}: {ratio:.1f}x the peer's users/s (goal {GOALS['beam']}x)")
            result["beam"][str(beam)] = r
        if a.v2_beam:
            print(f"V2 beam {a.v2_beam} latency, {SHAPE['users']} users", flush=True)
            setup = {"task": "beam", "beam": a.v2_beam, **SHAPE, "family": "v2"}
            r = compare({"v2": (ours, setup)}, a.rounds, a.reps)
            r["v2"]["ms_per_user"] = 1e3 * r["v2"]["median_s"] / SHAPE["users"]
            print(f"  v2 beam {a.v2_beam}: {r['v2']['ms_per_user']:.1f} ms per user")
            result["beam"][f"{a.v2_beam}_v2"] = r
    pathlib.Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.json}")


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
