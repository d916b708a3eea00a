"""Atomic claims on the points of a sweep, for several runners sharing one sweep directory.

A runner owns point P while it holds the newest claim file of P: CLAIMS/P.<g> for generation
g = 0, 1, ..., created with O_CREAT | O_EXCL (atomic on a local disk and on NFS v3+, so two
runners racing for a generation get one winner). A holder refreshes its file's mtime every
`heartbeat_s`; a claim is stale when its holder is a dead process on this host, or when its
mtime is older than `stale_after_s` (a holder on another host that stopped: crashed, powered
off, preempted). A stale generation g is taken over by creating g + 1, again with O_EXCL, so a
takeover races safely too. Nothing is ever renamed or rewritten, which is what makes this
safe on a shared filesystem; across hosts it needs clocks within `stale_after_s` of each other.

"Done" is recorded elsewhere (the point's row file); a claim only keeps two runners off one
point while it trains.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import threading
import time
from typing import Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class Claims:
    """The claims of one runner (`runner`: a label for messages; default host:pid)."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        runner: str | None = None,
        stale_after_s: float = 600.0,
        heartbeat_s: float | None = None,
    ):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.runner = runner or f"{self.host}:{self.pid}"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s or max(1.0, stale_after_s / 10)
        self.held: dict[str, pathlib.Path] = {}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            for path in list(self.held.values()):
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass  # released meanwhile

    def close(self) -> None:
        self._stop.set()
        for name in list(self.held):
            self.release(name)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _generations(self, name: str) -> list[tuple[int, pathlib.Path]]:
        out = []
        for p in self.dir.glob(f"{name}.*"):
            suffix = p.name[len(name) + 1 :]
            if suffix.isdigit():
                out.append((int(suffix), p))
        return sorted(out)

    def holder(self, name: str) -> dict[str, Any] | None:
        """The live holder of `name` ({runner, host, pid, age_s}), or None when it is free
        (no claim, or only stale ones)."""
        gens = self._generations(name)
        if not gens:
            return None
        _, path = gens[-1]
        info = self._read(path)
        return None if info is None or self._stale(info) else info

    def _read(self, path: pathlib.Path) -> dict[str, Any] | None:
        try:
            age = time.time() - path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            info = {}  # just created, not written yet: fresh, judged by its age
        return {**info, "age_s": age}

    def _stale(self, info: dict[str, Any]) -> bool:
        if info.get("host") == self.host and isinstance(info.get("pid"), int):
            if info["pid"] != self.pid and not _alive(info["pid"]):
                return True
        return info["age_s"] > self.stale_after_s

    def try_claim(self, name: str) -> bool:
        """Claim `name`; False when another runner holds it (a live, fresh claim)."""
        if name in self.held:
            return True
        gens = self._generations(name)
        nxt = 0
        if gens:
            g, path = gens[-1]
            info = self._read(path)
            if info is not None and not self._stale(info):
                return False
            nxt = g + 1
        path = self.dir / f"{name}.{nxt}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False  # another runner won this generation
        info = {"runner": self.runner, "host": self.host, "pid": self.pid, "t": time.time()}
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self.held[name] = path
        return True

    def release(self, name: str) -> None:
        """Drop the claim on `name` and the stale generations below it."""
        path = self.held.pop(name, None)
        if path is None:
            return
        g = int(path.name.rsplit(".", 1)[1])
        for h, p in self._generations(name):
            if h <= g:
                p.unlink(missing_ok=True)
