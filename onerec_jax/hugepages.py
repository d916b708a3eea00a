"""Transparent huge pages for XLA:CPU's buffers, through glibc's malloc.

XLA:CPU allocates each step's temporary buffers afresh and frees them after it; glibc serves
allocations above 32 MiB with mmap and returns them with munmap, so every step touches its
hundreds of megabytes of activations as new 4 KiB pages: 678,000 page faults per V1 train step
at the TIGER shape (benchmarks/peers.py), a fifth of the step on 2 cores. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask the kernel for transparent huge
pages (madvise), which cuts the faults 500-fold: that step (unrolled layers) went from 1.93 to
1.54 s (median of 8; Linux with transparent_hugepage=madvise). Tunables are read when a process
starts, so the `onerec` command re-executes itself once with the tunable set;
ONEREC_HUGE_PAGES=0 turns this off. Elsewhere (not Linux, not glibc, or huge pages disabled)
nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
# Set in the restarted process: a process whose loader drops GLIBC_TUNABLES (a privileged,
# AT_SECURE interpreter) must not restart itself forever.
_RESTARTED = "ONEREC_HUGE_PAGES_RESTARTED"


def wanted(env: Mapping[str, str]) -> bool:
    """Whether a process started with `env` should get the tunable: on Linux with glibc,
    unless ONEREC_HUGE_PAGES=0 or GLIBC_TUNABLES already sets glibc.malloc.hugetlb."""
    if env.get("ONEREC_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    return "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", "")


def environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) with the tunable appended where `wanted`."""
    env = dict(os.environ if env is None else env)
    if wanted(env):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TUNABLE]))
    return env


def reexec() -> None:
    """Replace this process by the same command with the tunable set, if it is wanted and the
    command is a script file (the `onerec` entry point); otherwise return. Called first
    thing, before any heavy import, so the restart costs an interpreter start (~50 ms)."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) != "onerec" or not os.path.isfile(script):
        return  # not the entry point (python -m, tests, a notebook): leave the process alone
    if os.environ.get(_RESTARTED) or not wanted(os.environ) or not sys.executable:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    # orig_argv keeps the interpreter's own options (-X, -W, -I, a shebang's -s) and wrappers
    # run as `python -m cProfile onerec ...`; argv would drop them.
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, environ() | {_RESTARTED: "1"})
    except OSError:
        return  # could not restart: run on as it is, without huge pages
