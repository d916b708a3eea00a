"""The line protocol between `benchmarks/peers.py` and its two workers (standard library only:
the peer's worker runs in a venv without onerec_jax).

    {"op": "setup", ...}     -> the setup function's facts, plus "setup_s"
    {"op": "run", "reps": k} -> {"times": [k seconds]}
    {"op": "quit"}
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable


def serve(setup: Callable[[dict], tuple[Callable[[], None], dict]]) -> None:
    """Answer the driver's lines on stdin: `setup(msg)` returns (the call to time, facts);
    its first call (compile, warm-up) is part of setup_s, never of the times."""
    run: Callable[[], None] | None = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "quit":
            break
        if msg["op"] == "setup":
            t = time.perf_counter()
            run, facts = setup(msg)
            reply = {"setup_s": time.perf_counter() - t, **facts}
        else:
            times = []
            for _ in range(msg["reps"]):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            reply = {"times": times}
        print(json.dumps(reply), flush=True)
