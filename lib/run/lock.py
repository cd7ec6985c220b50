"""The run folder's lock: one stage at a time writes a run folder.

A stage holds an exclusive ``flock`` on ``<run_dir>/run.lock`` while it runs; the operating
system releases it when the process ends, however it ends, so a killed run never leaves a
stale lock. A second stage on the same folder is refused at once with a
:class:`~lib.errors.RunFolderError` that names the holding stage, its process id and since
when, and writes nothing. A stage that starts removes the temporary files of interrupted
atomic writes (:func:`remove_leftovers`) from its own folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib.errors import RunFolderError
from lib.run.layout import lock_file

#: Set in a stage command's environment while it holds a run folder's lock, so the notebook
#: kernel it starts knows that its parent holds the folder.
LOCK_ENVIRONMENT = "BORDERLINE_HELD_RUN_DIR"

#: Run folders this process holds: resolved path -> (open lock file, depth of nesting).
_held: dict[Path, list[Any]] = {}


def _holder_text(run_dir: Path) -> str:
    try:
        holder = json.loads(lock_file(run_dir).read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process"
    return (f"stage {holder.get('stage', '?')} (process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")


def _in_use(run_dir: Path) -> RunFolderError:
    return RunFolderError(
        f"run folder {run_dir} is in use by {_holder_text(run_dir)}; wait until it "
        "finishes, or use another run folder (-p run_dir ...)"
    )


def _held_by_parent(run_dir: Path) -> bool:
    return os.environ.get(LOCK_ENVIRONMENT) == str(run_dir)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike[str], stage: str) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block (created, with the folder, when missing).

    Re-entrant within a process; a block inside a stage command's notebook kernel finds the
    lock held by its parent command (through :data:`LOCK_ENVIRONMENT`) and takes nothing.
    While held, ``LOCK_ENVIRONMENT`` names the folder for the processes this one starts.

    Raises:
        RunFolderError: another process holds the folder; the message names its stage,
            process id and start time. Nothing is written then.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or _held_by_parent(run_dir):
        if run_dir in _held:
            _held[run_dir][1] += 1
        try:
            yield run_dir
        finally:
            if run_dir in _held:
                _release(run_dir)
        return
    _acquire(run_dir, stage)
    try:
        yield run_dir
    finally:
        _release(run_dir)


def _acquire(run_dir: Path, stage: str) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(
            f"run folder {run_dir} is a file, not a folder; set run_dir to a folder path"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file(run_dir), "a+")  # noqa: SIM115 -- kept open while held
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _in_use(run_dir) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({
        "stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
        "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }) + "\n")
    handle.flush()
    _held[run_dir] = [handle, 1, os.environ.get(LOCK_ENVIRONMENT)]
    os.environ[LOCK_ENVIRONMENT] = str(run_dir)


def _release(run_dir: Path) -> None:
    entry = _held[run_dir]
    entry[1] -= 1
    if entry[1]:
        return
    del _held[run_dir]
    if entry[2] is None:
        os.environ.pop(LOCK_ENVIRONMENT, None)
    else:
        os.environ[LOCK_ENVIRONMENT] = entry[2]
    entry[0].close()  # closing the file releases the flock


def holds_run_folder(run_dir: str | os.PathLike[str]) -> bool:
    """Whether this process (or the stage command that started it) holds ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    return run_dir in _held or _held_by_parent(run_dir)


def is_leftover(path: Path) -> bool:
    """A temporary file of an interrupted atomic write (``.<name>.<random>.tmp...``)."""
    return path.name.startswith(".") and ".tmp" in path.name and path.is_file()


def remove_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that a killed run left under ``folder``; return them.

    Call only while holding the run folder, so no write in flight is removed.
    """
    folder = Path(folder)
    found = sorted(p for p in folder.rglob(".*") if is_leftover(p)) if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def check_not_held(run_dir: str | os.PathLike[str]) -> None:
    """RunFolderError when another process holds ``run_dir``; only reads (writes nothing).

    The stage command calls it before its checks, so a second command is refused at once.
    """
    run_dir = Path(run_dir).resolve()
    path = lock_file(run_dir)
    if holds_run_folder(run_dir) or not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir) from None
