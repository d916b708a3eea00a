"""One runner per workdir: `onerec train` and `onerec align` hold WORKDIR/.lock while they run.

The lock is an flock(2) on that file, which the kernel releases when its holder dies however it
dies (SIGKILL, a crash, a lost machine's process), so a dead runner's lock never blocks the
next one: no staleness timeouts to tune. The file holds the holder's pid, host and command,
which a refused second runner names. flock works between processes of one machine and on
NFSv4 and Lustre; on a filesystem without working locks two runners on two hosts are not
detected (the sweep runner's claims, scaling/claims.py, do not rely on flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator


class WorkdirBusyError(ValueError):
    """Another live process holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path) -> Iterator[None]:
    """Hold WORKDIR/.lock for the duration; WorkdirBusyError (naming the holder) if it is held."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirBusyError(
                f"{workdir} is in use by another run ({holder}); wait for it or stop it "
                "(a dead holder's lock is released by the system)"
            ) from None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        me = f"pid {os.getpid()} on {socket.gethostname()} since {when}: {' '.join(sys.argv)}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode()[:4000] + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock
