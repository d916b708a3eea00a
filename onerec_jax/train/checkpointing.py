"""Checkpoints of a run: the training state, the grain iterator's position and the run's
counters, saved together by one orbax manager in WORKDIR/checkpoints, so a restored run
continues exactly where the checkpoint left it."""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


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
        """Save and wait until the checkpoint is on disk (a crash after this keeps it)."""
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

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._mngr.close()
