"""Checkpoints of a run: the training state, the grain iterator's position and the run's
counters, saved together by one orbax manager in WORKDIR/checkpoints, so a restored run
continues exactly where the checkpoint left it."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import pathlib
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import grain
import jax
import orbax.checkpoint as ocp

from onerec_jax.atomic import write_atomic

ITEMS = ("state", "data", "meta")
FILE_LIST = "onerec_files.json"  # in each step directory: its files' sizes (`_list_files`)
T = TypeVar("T")


class Checkpoints:
    """The orbax manager of one run's checkpoint directory (kept: the newest `keep`)."""

    def __init__(self, directory: pathlib.Path, keep: int | None = None):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.directory = directory
        self._mngr = ocp.CheckpointManager(directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, step: int, state: Any, data: Any) -> tuple[Any, dict[str, Any]]:
        """The state and counters saved at `step`; `data` (the grain iterator) is moved to
        its saved position in place. `state` gives the structure (its values are replaced)."""
        self._check_processes(step)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state),
                data=grain.checkpoint.CheckpointRestore(data),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["meta"])

    def restore_newest(
        self, restore: Callable[[int], T], move_aside: bool = True, check_processes: bool = False
    ) -> tuple[int, T | None]:
        """(step, restore(step)) of the newest checkpoint that restores; (0, None) when there
        is none. A damaged checkpoint (a file missing or cut short against its file list, or
        contents the restore cannot parse) is skipped with a warning naming it and, with
        `move_aside`, renamed to STEP.corrupt (kept for a look, never deleted; a later save
        of that step then finds its name free). An I/O error (a flaky network disk) is not
        damage: it stops with that error and moves nothing. When none restores, nothing is
        moved and one error names them all. `check_processes`: a training resume, whose data
        position needs the process count it was saved with (evaluation reads no data)."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self._mngr.all_steps(), reverse=True):
            if check_processes:  # a wrong process count is not corruption
                self._check_processes(step)
            why = self._damage(step)
            if why:  # found without orbax: none of its errors to print
                failed.append((step, why))
                continue
            ok, out = self._try(restore, step, failed)
            if not ok:
                continue
            for bad, why in failed:
                where = self.directory / str(bad)
                note = ""
                if move_aside:
                    dest = where.with_name(f"{bad}.corrupt")
                    k = 1
                    while dest.exists():
                        dest, k = where.with_name(f"{bad}.corrupt{k}"), k + 1
                    os.rename(where, dest)
                    note = f"; moved to {dest.name}"
                warnings.warn(
                    f"{where}: checkpoint unreadable ({why}){note}; using step {step}",
                    stacklevel=2,
                )
            if failed and move_aside:
                self._mngr.reload()
            return step, out
        if failed:
            listed = "; ".join(f"step {s}: {why}" for s, why in failed)
            raise ValueError(
                f"{self.directory}: no checkpoint restores ({listed}); move them away to "
                "start afresh, or use a new --workdir"
            )
        return 0, None

    def _damage(self, step: int) -> str:
        """What is wrong with checkpoint `step` against its file list (a missing or truncated
        file), or "" (also when it has no list: saved by an older version, or killed between
        orbax's commit and the list; the restore then tells)."""
        d = self.directory / str(step)
        try:
            files = json.loads((d / FILE_LIST).read_text())
        except FileNotFoundError:
            return ""
        except (ValueError, OSError) as e:
            return f"{FILE_LIST} unreadable ({e})"
        for rel, size in files.items():
            p = d / rel
            if not p.is_file():
                return f"{rel} missing"
            if p.stat().st_size != size:
                return f"{rel} has {p.stat().st_size} bytes, saved with {size}"
        return ""

    def _list_files(self, step: int) -> None:
        """STEP/onerec_files.json: the size of every file of a committed checkpoint, so a
        truncated or missing one is found before orbax reads it."""
        d = self.directory / str(step)
        files = {
            str(p.relative_to(d)): p.stat().st_size
            for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != FILE_LIST
        }
        write_atomic(d / FILE_LIST, json.dumps(files, indent=0, sort_keys=True))

    @staticmethod
    def _try(restore: Callable[[int], T], step: int, failed: list) -> tuple[bool, T | None]:
        """restore(step), or (False, None) with the failure noted in `failed`. A failed orbax
        restore leaves dozens of its reader coroutines failing too, each printed as "Exception
        ignored in ..." when collected: they are collected here, silently (the one line in
        `failed` says what went wrong)."""
        hook = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None
        try:
            try:
                return True, restore(step)
            except OSError as e:
                if not isinstance(e, FileNotFoundError):
                    raise  # EIO, a stale handle: the disk, not the checkpoint
                first = str(e)[:200]
                failed.append((step, f"{type(e).__name__}: {first}"))
            except Exception as e:  # orbax, tensorstore, grain and json raise many types
                first = (str(e).strip().splitlines() or [""])[0][:200]
                failed.append((step, f"{type(e).__name__}: {first}"))
            gc.collect()
            return False, None
        finally:
            sys.unraisablehook = hook

    def _check_processes(self, step: int) -> None:
        """The data position is saved per process (grain: process_I-of-N.json), so a run
        resumes on as many processes as it ran on (its mesh may change, not its hosts)."""
        saved = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        if not saved:
            return
        n = int(saved[0].stem.rsplit("-of-", 1)[1])
        if n != jax.process_count():
            raise ValueError(
                f"{self.directory / str(step)} was saved by {n} process(es); resume it with "
                f"{n} (this run has {jax.process_count()}), or start a new --workdir"
            )

    def restore_state(self, step: int, state: Any) -> Any:
        """The training state alone (evaluation reads no data iterator)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(state))
        return self._mngr.restore(step, args=args)["state"]

    def save(self, step: int, state: Any, data: Any, meta: dict[str, Any]) -> None:
        """Save and wait until the checkpoint is on disk (a crash after this keeps it). Too
        little free space is found before anything is written; a save that fails anyway is one
        OSError naming the step (orbax keeps the unfinished one apart: the newest complete
        checkpoint stays the one a resume reads)."""
        need, free = self._bytes_needed(state), shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"{self.directory}: {free / 1e6:.1f} MB free, a checkpoint needs about "
                f"{need / 1e6:.1f} MB; free space and run the same command (the newest "
                f"checkpoint, step {self.latest_step()}, is intact)",
            )
        try:
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data),
                    meta=ocp.args.JsonSave(dict(meta)),
                ),
                force=True,
            )
            self._mngr.wait_until_finished()
        except Exception as e:  # orbax and tensorstore raise many types
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise OSError(
                f"{self.directory / str(step)}: checkpoint not saved ({type(e).__name__}: "
                f"{first}); the newest complete one, step {self.latest_step()}, is intact"
            ) from None
        if jax.process_index() == 0:
            self._list_files(step)

    def _bytes_needed(self, state: Any) -> float:
        """About what a checkpoint takes on disk: the newest one's files (its list), else the
        state's bytes; with 10 % to spare."""
        newest = self.latest_step()
        if newest is not None:
            with contextlib.suppress(OSError, ValueError):
                listed = json.loads((self.directory / str(newest) / FILE_LIST).read_text())
                return 1.1 * sum(listed.values())
        leaves = jax.tree.leaves(state)
        return 1.1 * sum(getattr(x, "nbytes", 0) for x in leaves)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._mngr.close()
