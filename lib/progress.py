"""Progress of long work, shown on the terminal of whoever waits for it, never in a notebook.

Library loops (decoding, training epochs, evaluations, attacks, reference attacks) ask
:func:`progress_bar` for a bar and :func:`message` for a line of news. Where these go depends
on the environment variable ``BORDERLINE_PROGRESS`` (:data:`CHANNEL`):

- a file path: the process runs inside a stage started by the stage command, which tails that
  file (:func:`relay`) and draws the bars on its own terminal. Each bar writes JSON lines (its
  state, at most every :data:`INTERVAL` seconds, and when it closes);
- ``"stderr"``: an ordinary tqdm bar on standard error, wherever the process runs (a notebook
  then holds progress output, which the rerun proof must and does tolerate);
- ``"off"``: nothing;
- unset: an ordinary tqdm bar on standard error in a terminal or a plain script, and nothing
  inside a Jupyter kernel (a notebook run by papermill directly, or re-executed by nbval), so
  no executed notebook and no page of the book holds a progress bar.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

#: The environment variable that says where progress goes (see the module's docstring).
CHANNEL = "BORDERLINE_PROGRESS"
#: Seconds between two state lines of one bar on a channel (a bar's close is always written).
INTERVAL = 0.5

Item = TypeVar("Item")
_bar_ids = itertools.count(1)


def destination() -> str | Path | None:
    """Where progress goes now: ``"stderr"``, a channel file, or None (nowhere)."""
    value = os.environ.get(CHANNEL, "")
    if value == "off":
        return None
    if value == "stderr":
        return "stderr"
    if value:
        return Path(value)
    return None if _inside_kernel() else "stderr"


def _inside_kernel() -> bool:
    """Whether standard error is a Jupyter kernel's stream (it ends up in the notebook)."""
    return type(sys.stderr).__module__.startswith("ipykernel")


class Bar:
    """A progress bar that shows nothing; the base of the visible ones.

    Use it as a context manager (or call :meth:`close`); :meth:`update` advances it.
    """

    def update(self, n: int = 1, *, postfix: str | None = None) -> None:
        """Count ``n`` more units done; ``postfix`` replaces the text after the bar."""

    def close(self) -> None:
        """Finish the bar."""

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TerminalBar(Bar):
    """An ordinary tqdm bar on standard error."""

    def __init__(self, total: int | None, *, desc: str, unit: str, leave: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr)

    def update(self, n: int = 1, *, postfix: str | None = None) -> None:
        if postfix is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class _ChannelBar(Bar):
    """A bar whose state goes, as JSON lines, to the channel file a parent process tails."""

    def __init__(self, channel: Path, total: int | None, *, desc: str, unit: str,
                 leave: bool) -> None:
        self._channel = channel
        self._state = {"bar": f"{os.getpid()}-{next(_bar_ids)}", "desc": desc, "unit": unit,
                       "total": total, "leave": leave, "n": 0, "postfix": "", "closed": False}
        self._written = 0.0
        self._send()

    def _send(self) -> None:
        _append(self._channel, self._state)
        self._written = time.monotonic()

    def update(self, n: int = 1, *, postfix: str | None = None) -> None:
        self._state["n"] += n
        if postfix is not None:
            self._state["postfix"] = postfix
        if time.monotonic() - self._written >= INTERVAL:
            self._send()

    def close(self) -> None:
        if not self._state["closed"]:
            self._state["closed"] = True
            self._send()


def _append(channel: Path, record: dict[str, Any]) -> None:
    """One JSON line appended in one write (O_APPEND: lines of several writers never mix)."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    descriptor = os.open(channel, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def progress_bar(total: int | None, *, desc: str, unit: str = "it", enabled: bool = True,
                 leave: bool = True) -> Bar:
    """A progress bar for ``total`` units of work, shown where :func:`destination` says.

    Args:
        total: units of work (None: unknown, the bar counts without a percentage).
        desc: what is being done, e.g. ``"epoch 2/5"`` or ``"decoding videos"``.
        unit: the name of one unit (``"video"``, ``"batch"``, ``"attack"``).
        enabled: False gives a bar that shows nothing (a loop's own ``progress`` switch).
        leave: keep the finished bar on the terminal (False: it disappears when done).
    """
    where = destination() if enabled else None
    if where is None:
        return Bar()
    if where == "stderr":
        return _TerminalBar(total, desc=desc, unit=unit, leave=leave)
    return _ChannelBar(Path(where), total, desc=desc, unit=unit, leave=leave)


def tracked(items: Iterable[Item], *, total: int | None, desc: str, unit: str = "it",
            enabled: bool = True, leave: bool = True) -> Iterator[Item]:
    """``items`` one by one, advancing a :func:`progress_bar` by one after each."""
    with progress_bar(total, desc=desc, unit=unit, enabled=enabled, leave=leave) as bar:
        for item in items:
            yield item
            bar.update()


def message(text: str, *, enabled: bool = True) -> None:
    """A line of news for whoever watches the progress (e.g. an epoch's losses)."""
    where = destination() if enabled else None
    if where == "stderr":
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)
    elif where is not None:
        _append(Path(where), {"message": text})


# --------------------------------------------------------------------------- the parent side


class _Renderer:
    """Draws the bars and messages of a channel's JSON lines with tqdm on standard error."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def show(self, record: dict[str, Any]) -> None:
        from tqdm import tqdm

        if "message" in record:
            tqdm.write(str(record["message"]), file=sys.stderr)
            return
        bar = self._bars.get(record["bar"])
        if bar is None:
            bar = self._bars[record["bar"]] = tqdm(
                total=record["total"], desc=record["desc"], unit=record["unit"],
                leave=record["leave"], file=sys.stderr)
        if record["postfix"]:
            bar.set_postfix_str(record["postfix"], refresh=False)
        bar.update(record["n"] - bar.n)
        if record["closed"]:
            bar.close()
            del self._bars[record["bar"]]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def _follow(channel: Path, stop: threading.Event, renderer: _Renderer) -> None:
    """Render every complete line of ``channel`` until ``stop`` is set and the file is read."""
    with open(channel, "rb") as lines:
        pending = b""
        while True:
            stopping = stop.is_set()
            chunk = lines.read()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                with contextlib.suppress(ValueError, KeyError):
                    renderer.show(json.loads(line))
            if stopping and not chunk:
                return
            if not chunk:
                stop.wait(0.1)


@contextlib.contextmanager
def relay(*, enabled: bool = True) -> Iterator[Path | None]:
    """Show on this process's terminal the progress of the processes it starts inside.

    Creates a channel file, names it in ``BORDERLINE_PROGRESS`` for child processes (a
    papermill kernel inherits it) and draws what they write there until the block ends. With
    ``enabled`` False the environment is left as it is (a kernel then shows nothing, unless
    ``BORDERLINE_PROGRESS`` says otherwise).

    Yields:
        The channel file (None when disabled).
    """
    if not enabled:
        yield None
        return
    previous = os.environ.get(CHANNEL)
    stop = threading.Event()
    renderer = _Renderer()
    with tempfile.TemporaryDirectory(prefix="borderline-progress-") as folder:
        channel = Path(folder) / "progress.jsonl"
        channel.touch()
        follower = threading.Thread(target=_follow, args=(channel, stop, renderer), daemon=True)
        os.environ[CHANNEL] = str(channel)
        follower.start()
        try:
            yield channel
        finally:
            stop.set()
            follower.join(timeout=10)
            renderer.close()
            if previous is None:
                os.environ.pop(CHANNEL, None)
            else:
                os.environ[CHANNEL] = previous
