"""Atomic file writes: a file either appears whole under its name or not at all.

Every writer here writes to a hidden temporary name in the same folder, flushes it to disk and
renames it over the final name (``os.replace`` is atomic on POSIX and Windows). A run killed
mid-write leaves only hidden files (names starting with a dot: our ``.<name>.*.tmp`` and any
temporary file the writer makes beside it, such as safetensors' own), which no reader opens.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.errors import RunFolderError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    ``suffix`` ends the temporary name (a tool that checks extensions may need e.g.
    ``".tmp.ipynb"``); readers skip names that start with a dot.

    The caller writes the temporary file by any means (``np.save``, ``torch.save``, ...).
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (byte-identical for equal objects)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | os.PathLike[str], table: pd.DataFrame) -> None:
    """Write ``table`` as CSV without the index, atomically.

    Floats are written with ``repr`` precision (pandas' default), so equal tables give equal
    bytes and a table read back equals the one written.
    """
    write_text(path, table.to_csv(index=False, lineterminator="\n"))


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read without unpickling.

    Only plain numeric and string arrays load: an object array (which numpy stores as a
    pickle, and unpickling can run code) is refused before it is unpickled.

    Raises:
        RunFolderError: the file is unreadable, truncated or holds a pickled array.
    """
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except ValueError as error:
        reason = ("it holds a pickled (object) array, which is never unpickled"
                  if "allow_pickle" in str(error) else str(error))
        raise RunFolderError(
            f"{path} cannot be read: {reason}; delete it and rerun the stage that wrote it"
        ) from None
    except (OSError, EOFError, KeyError) as error:
        raise RunFolderError(
            f"{path} cannot be read ({type(error).__name__}: {error}); delete it and rerun "
            "the stage that wrote it"
        ) from None


def write_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Write arrays to an uncompressed ``.npz`` file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
