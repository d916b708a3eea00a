"""Atomic claims on the points of a sweep, for several runners sharing one sweep directory.

A runner owns point P while it holds the newest claim file of P: CLAIMS/P.<g> for generation
g = 0, 1, ..., written whole under a private name and hard-linked into place (link() fails
when the name exists: atomic on a local disk and on NFS, so two runners racing for a
generation get one winner, and no claim is ever seen half-written). A holder refreshes its
file's mtime every `heartbeat_s` and releases P by creating the next generation as a
"released" marker. A claim of this machine (same host name, boot and PID namespace: a
container sharing the host name is not trusted with PIDs) is stale exactly when its process
is dead; one from elsewhere when its mtime is older than `stale_after_s` (its holder crashed,
powered off, was preempted). A released or stale generation g is taken over by creating
g + 1 the same way, so a takeover races safely too. No claim file is ever deleted, renamed
or rewritten while the claims are in use (generations only grow), which is what makes this
safe on a shared filesystem; across hosts it needs clocks within `stale_after_s` of each
other.

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
import uuid
from typing import Any


def _machine() -> str:
    """This boot of this machine and its PID namespace: where a PID means one process."""
    try:
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""  # not Linux: PIDs are never trusted, only heartbeats


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
        self.host, self.pid, self.machine = socket.gethostname(), os.getpid(), _machine()
        self.runner = runner or f"{self.host}:{self.pid}"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s or max(1.0, stale_after_s / 10)
        self.held: dict[str, pathlib.Path] = {}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        warned: set[pathlib.Path] = set()
        while not self._stop.wait(self.heartbeat_s):
            for name, path in list(self.held.items()):
                try:
                    os.utime(path)
                    gens = self._generations(name)
                except FileNotFoundError:
                    continue  # released meanwhile
                except OSError as e:  # a filesystem hiccup (NFS ESTALE, EIO): beat again later
                    print(f"claims: heartbeat of {name} failed ({e}); retrying", flush=True)
                    continue
                if name in self.held and gens and gens[-1][1] != path and path not in warned:
                    # Another runner judged this claim stale (a heartbeat late by more than
                    # stale_after_s from another host: a filesystem stall) and took over.
                    print(f"claims: {name} was taken over by another runner", flush=True)
                    warned.add(path)

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
        info = self._read(gens[-1][1])
        if info is None:  # vanished between listing and reading: someone is acting on it
            return {"runner": "unknown", "age_s": 0.0}
        return None if info.get("released") or self._stale(info) else info

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
        same = self.machine and (info.get("host"), info.get("machine")) == (
            self.host,
            self.machine,
        )
        if same and isinstance(info.get("pid"), int) and info["pid"] != self.pid:
            # This machine's process table decides: a live holder keeps its claim however
            # late its heartbeat (a laptop's sleep, a stopped job), a dead one loses it now.
            return not _alive(info["pid"])
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
            if info is None:
                return False  # vanished: files are never deleted in use, so a cleanup runs
            if not info.get("released") and not self._stale(info):
                return False
            nxt = g + 1
        path = self._create(name, nxt, {})
        if path is None:
            return False  # another runner won this generation
        self.held[name] = path
        return True

    def _create(self, name: str, g: int, extra: dict[str, Any]) -> pathlib.Path | None:
        path = self.dir / f"{name}.{g}"
        info = {"runner": self.runner, "host": self.host, "machine": self.machine,
                "pid": self.pid, "t": time.time(), **extra}  # fmt: skip
        # Written whole under a private name, then hard-linked into place: link() fails if the
        # name exists (atomic, NFS included), and a claim file is never seen half-written.
        tmp = self.dir / f".{name}.{g}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(info))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        finally:
            tmp.unlink()
        return path

    def release(self, name: str) -> None:
        """Give `name` up: the next generation, created as a "released" marker, frees it for
        the next claimer (a stale claim of ours that was taken over is just dropped)."""
        path = self.held.pop(name, None)
        if path is None:
            return
        g = int(path.name.rsplit(".", 1)[1])
        self._create(name, g + 1, {"released": True})
