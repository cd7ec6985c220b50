"""The frame cache: each video's decoded single-tool frames at one image size, decoded once.

One cache entry per video and image size, at ``<cache_dir>/<dataset key>/<S>px/``: an
uncompressed ``videoNN.npy`` (uint8 [K, 3, S, S], read through a memory map,
:class:`MappedFrames`) and a ``videoNN.json`` beside it (the frame indices and the video's
size and modification time, so a changed video is decoded again). This module needs no torch:
it runs in the decoding worker processes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lib.data.cholec80 import VideoRecord, load_video_frames
from lib.errors import DatasetError
from lib.io import atomic_path, write_json

OLD_CACHE_SUFFIX = ".npz"  #: the earlier single-file cache format, rebuilt when found


class FrameCacheError(DatasetError):
    """A frame cache file is truncated or is not a uint8 [K, 3, S, S] array.

    ``problem`` says what is wrong; the message adds what to do about it.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem} Delete it and run the data stage (01_data) again.")
        self.problem = problem


def cache_sidecar(cache_path: str | os.PathLike[str]) -> Path:
    """``videoNN.json`` beside ``videoNN.npy``: the frame indices and the source signature."""
    return Path(cache_path).with_suffix(".json")


def source_signature(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file: what a cache entry was made from."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def _array_header(handle: Any, path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of an ``.npy`` file holding a C-ordered uint8 [K, 3, S, S] array."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, OSError, SyntaxError) as error:
        raise FrameCacheError(f"{path}: not a readable .npy frame cache ({error}).") from error
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[1] != 3:
        raise FrameCacheError(
            f"{path}: holds {dtype} {shape}, expected C-ordered uint8 [K, 3, S, S] frames."
        )
    return tuple(int(n) for n in shape), handle.tell()


class MappedFrames:
    """The frames of one ``.npy`` cache, read through a read-only memory map.

    :meth:`read` copies the requested frames out and then tells the kernel the mapped pages
    are not needed, so reading a whole split keeps resident memory at one batch (the pages stay
    in the page cache, not in this process). Pickles as its path: DataLoader workers map the
    file again.

    Raises:
        FrameCacheError: the file is truncated (fewer bytes than its header announces) or holds
            something other than uint8 [K, 3, S, S].
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            self.shape, self._offset = _array_header(handle, self.path)
            expected = self._offset + int(np.prod(self.shape))
            actual = os.fstat(handle.fileno()).st_size
        if actual != expected:
            raise FrameCacheError(
                f"{self.path}: truncated frame cache: {actual} bytes, but its header announces "
                f"{self.shape[0]} frames ({expected} bytes)."
            )
        self._map: mmap.mmap | None = None

    def _array(self) -> np.ndarray:
        if int(np.prod(self.shape)) == 0:
            return np.empty(self.shape, dtype=np.uint8)
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        count = int(np.prod(self.shape))
        return np.frombuffer(self._map, np.uint8, count, self._offset).reshape(self.shape)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Copies of the frames at ``rows`` (int [k]): uint8 [k, 3, S, S]."""
        frames = self._array()[np.asarray(rows, dtype=np.int64)]
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
        return frames

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "shape": self.shape, "_offset": self._offset, "_map": None}


def read_frame_cache(
    cache_path: str | os.PathLike[str], *, load_images: bool = True
) -> dict[str, Any] | None:
    """A cache entry, or None when it is missing, unreadable or truncated.

    Returns:
        ``frames`` (int64 [K], 0-based frame indices, increasing), ``source_size``,
        ``source_mtime_ns`` and, with ``load_images``, ``images`` (a :class:`MappedFrames`;
        nothing is read until asked).
    """
    try:
        sidecar = json.loads(cache_sidecar(cache_path).read_text(encoding="utf-8"))
        entry: dict[str, Any] = {
            "frames": np.asarray(sidecar["frames"], dtype=np.int64),
            "source_size": int(sidecar["source_size"]),
            "source_mtime_ns": int(sidecar["source_mtime_ns"]),
        }
        images = MappedFrames(cache_path)
    except (OSError, ValueError, KeyError, TypeError, FrameCacheError):
        return None
    if len(images) != len(entry["frames"]):
        return None
    if load_images:
        entry["images"] = images
    return entry


def cache_problem(
    cache_path: str | os.PathLike[str], video_path: str | os.PathLike[str], frames: np.ndarray
) -> str | None:
    """Why the cache cannot serve these frames of this video (None when it can).

    An old ``.npz`` cache or a truncated ``.npy`` gets a sentence saying so (the caller shows
    it before decoding again); a missing or stale cache gets ``""``.
    """
    cache_path = Path(cache_path)
    old = cache_path.with_suffix(OLD_CACHE_SUFFIX)
    if old.exists() and not cache_path.exists():
        return (
            f"{old}: frame cache in the old .npz format; decoding the video again into "
            f"{cache_path.name} (read through a memory map) and removing the .npz"
        )
    try:
        if cache_path.exists():
            MappedFrames(cache_path)
    except FrameCacheError as error:
        return f"{error.problem} Decoding the video again."
    cached = read_frame_cache(cache_path, load_images=False)
    if cached is None:
        return ""
    signature = (cached["source_size"], cached["source_mtime_ns"])
    if signature != source_signature(video_path) or not np.isin(frames, cached["frames"]).all():
        return ""
    return None


def cache_is_current(
    cache_path: str | os.PathLike[str], video_path: str | os.PathLike[str], frames: np.ndarray
) -> bool:
    """True when the cache was made from this very video file and holds every frame."""
    return cache_problem(cache_path, video_path, frames) is None


def decode_into_cache(
    record: VideoRecord, *, image_size: int, cache_path: str | os.PathLike[str]
) -> int:
    """Decode a video's single-tool frames into ``cache_path`` (.npy) and its sidecar (.json)
    (:func:`write_frame_cache`). Returns the number of frames cached. On any error nothing is
    written."""
    signature = source_signature(record.video_path)  # before decoding: a change re-decodes
    frames, images = load_video_frames(record, image_size=image_size)
    write_frame_cache(cache_path, frames, images, signature=signature)
    return len(frames)


def write_frame_cache(cache_path: str | os.PathLike[str], frames: np.ndarray,
                      images: np.ndarray, *, signature: tuple[int, int]) -> None:
    """Write one cache entry: uint8 ``images`` [K, 3, S, S] of the video frames ``frames``
    (int64 [K], sorted) made from a file of ``signature`` (:func:`source_signature`).

    Each file is written atomically; the sidecar is removed first and written last, so an
    interrupted rebuild leaves no entry that looks current. An old ``.npz`` cache of the same
    video is removed.
    """
    cache_path = Path(cache_path)
    cache_sidecar(cache_path).unlink(missing_ok=True)
    with atomic_path(cache_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(images), allow_pickle=False)
    write_json(
        cache_sidecar(cache_path),
        {"frames": np.asarray(frames).tolist(), "source_size": signature[0],
         "source_mtime_ns": signature[1]},
    )
    cache_path.with_suffix(OLD_CACHE_SUFFIX).unlink(missing_ok=True)


def dataset_key(root: str | os.PathLike[str]) -> str:
    """Name of a dataset's cache folder: its folder name and a hash of its absolute path."""
    resolved = Path(root).resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", resolved.name) or "dataset"
    return f"{name}-{digest}"


def cache_folder(
    root: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str], image_size: int
) -> Path:
    """``<cache_dir>/<dataset key>/<S>px``: the cache of one dataset at one image size."""
    return Path(cache_dir) / dataset_key(root) / f"{image_size}px"
