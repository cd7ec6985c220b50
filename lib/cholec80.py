"""The Cholec80 layout: find videos, parse tool annotations, decode exactly the annotated frames.

The layout as distributed (METHOD.md, "Data: Cholec80")::

    <root>/videos/videoNN.mp4                 25 fps
    <root>/tool_annotations/videoNN-tool.txt  tab separated, one row every 25 frames

The annotation row with ``Frame = f`` belongs to the ``f``-th decoded frame (0-based) of its
video. Frames are paired by that index while decoding the whole video in order, never by counting
extracted image files. Other files in the folders (``videoNN-timestamp.txt``, phase annotations)
are ignored. This module needs no torch: it runs in the decoding worker processes.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
from PIL import Image

from lib import TOOLS
from lib.errors import DatasetError
from lib.io import atomic_path, write_json

FPS: int = 25  #: frames per second of every Cholec80 video
ANNOTATION_INTERVAL: int = 25  #: frames between two annotation rows (1 per second)
ANNOTATION_COLUMNS: tuple[str, ...] = ("Frame", *TOOLS)
HEADER: str = "\t".join(ANNOTATION_COLUMNS)
VIDEO_DIR = "videos"
ANNOTATION_DIR = "tool_annotations"

VIDEO_NAME_PATTERN = re.compile(r"^video(\d+)\.mp4$")
ANNOTATION_NAME_PATTERN = re.compile(r"^video(\d+)-tool\.txt$")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class VideoRecord:
    """One video of a Cholec80-layout folder and its tool-annotation file."""

    video_id: int
    video_path: Path
    annotation_path: Path

    @property
    def name(self) -> str:
        """``videoNN`` as in the file names (e.g. ``video41``)."""
        return f"video{self.video_id:02d}"


class VideoTooShortError(DatasetError):
    """A requested frame index lies at or beyond the end of the video."""

    def __init__(self, message: str, frame_count: int) -> None:
        super().__init__(message, frame_count)
        self.frame_count = frame_count

    def __str__(self) -> str:
        return str(self.args[0])


def video_file_name(video_id: int) -> str:
    """``videoNN.mp4`` for a video id (two digits at least, as in Cholec80)."""
    return f"video{video_id:02d}.mp4"


def annotation_file_name(video_id: int) -> str:
    """``videoNN-tool.txt`` for a video id."""
    return f"video{video_id:02d}-tool.txt"


def _ids_in(folder: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            video_id = int(match.group(1))
            if video_id in found:
                raise DatasetError(
                    f"{path}: video id {video_id} appears twice in {folder} "
                    f"(also {found[video_id].name}); keep one file per video id."
                )
            found[video_id] = path
    return found


def find_videos(root: str | os.PathLike[str]) -> list[VideoRecord]:
    """List the videos of a Cholec80-layout folder, each paired with its annotation file.

    Args:
        root: the dataset folder holding ``videos/`` and ``tool_annotations/``.

    Returns:
        One :class:`VideoRecord` per video, sorted by video id.

    Raises:
        DatasetError: the folder or a subfolder is missing, it holds no video, or a video has no
            annotation file (or an annotation file has no video).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset folder not found. Expected a Cholec80-layout folder with "
            f"'{VIDEO_DIR}/videoNN.mp4' and '{ANNOTATION_DIR}/videoNN-tool.txt'; check the "
            "parameter dataset_root (or use dataset_kind 'synthetic', which generates one)."
        )
    folders = {name: root / name for name in (VIDEO_DIR, ANNOTATION_DIR)}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DatasetError(
                f"{folder}: subfolder '{name}/' missing in dataset folder {root}. A Cholec80 "
                f"folder holds '{VIDEO_DIR}/' (videoNN.mp4) and '{ANNOTATION_DIR}/' "
                "(videoNN-tool.txt)."
            )
    videos = _ids_in(folders[VIDEO_DIR], VIDEO_NAME_PATTERN)
    annotations = _ids_in(folders[ANNOTATION_DIR], ANNOTATION_NAME_PATTERN)
    for video_id in sorted(set(videos) - set(annotations)):
        raise DatasetError(
            f"{videos[video_id]}: video without annotation file; expected "
            f"{folders[ANNOTATION_DIR] / annotation_file_name(video_id)}. Add it or remove the "
            "video."
        )
    for video_id in sorted(set(annotations) - set(videos)):
        raise DatasetError(
            f"{annotations[video_id]}: annotation file without video; expected "
            f"{folders[VIDEO_DIR] / video_file_name(video_id)}. Add it or remove the annotation "
            "file."
        )
    if not videos:
        raise DatasetError(
            f"{folders[VIDEO_DIR]}: no videoNN.mp4 files found in dataset folder {root}."
        )
    return [VideoRecord(i, videos[i], annotations[i]) for i in sorted(videos)]


def read_tool_annotations(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Parse one ``videoNN-tool.txt`` file.

    Args:
        path: the annotation file: the header line ``Frame<TAB>Grasper<TAB>...<TAB>SpecimenBag``,
            then rows of a frame number and seven 0/1 flags, tab separated.

    Returns:
        DataFrame with int64 columns ``Frame`` (0-based decoded frame index, strictly
        increasing) and the seven tools (0 or 1), in file order. The index, named ``line``, is
        the 1-based line number of each row in the file (for error messages).

    Raises:
        DatasetError: naming the file and line: wrong header, wrong number of columns, a frame
            that is not a non-negative integer or not increasing, or a flag other than 0/1.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read annotation file ({error}).") from error
    lines = text.splitlines()
    header = lines[0].strip() if lines else ""
    if header.split("\t") != list(ANNOTATION_COLUMNS):
        raise DatasetError(
            f"{path}, line 1: wrong header {header!r}; expected the tab-separated header "
            f"{HEADER!r} of a Cholec80 tool-annotation file."
        )
    while lines and not lines[-1].strip():
        lines.pop()
    rows: list[list[int]] = []
    line_numbers: list[int] = []
    previous = -1
    for number, line in enumerate(lines[1:], start=2):
        fields = line.strip().split("\t")
        where = f"{path}, line {number}"
        if len(fields) != len(ANNOTATION_COLUMNS):
            raise DatasetError(
                f"{where}: {len(fields)} tab-separated columns, expected "
                f"{len(ANNOTATION_COLUMNS)} (Frame and the seven tool flags): {line!r}."
            )
        if not _DIGITS.fullmatch(fields[0]):
            raise DatasetError(
                f"{where}: frame {fields[0]!r} is not a non-negative integer frame number."
            )
        frame = int(fields[0])
        if frame <= previous:
            raise DatasetError(
                f"{where}: frame {frame} is not after the previous row's frame {previous}; rows "
                "must be in increasing frame order."
            )
        previous = frame
        for tool, flag in zip(TOOLS, fields[1:], strict=True):
            if flag not in ("0", "1"):
                raise DatasetError(f"{where}: {tool} flag is {flag!r}; expected 0 or 1.")
        rows.append([frame, *(int(flag) for flag in fields[1:])])
        line_numbers.append(number)
    table = pd.DataFrame(
        np.array(rows, dtype=np.int64).reshape(len(rows), len(ANNOTATION_COLUMNS)),
        columns=list(ANNOTATION_COLUMNS),
        index=pd.Index(line_numbers, name="line", dtype=np.int64),
    )
    return table


def format_tool_annotations(table: pd.DataFrame) -> str:
    """The text of a ``videoNN-tool.txt`` file for a table from :func:`read_tool_annotations`."""
    body = table[list(ANNOTATION_COLUMNS)].astype(np.int64).to_numpy()
    lines = [HEADER, *("\t".join(str(value) for value in row) for row in body)]
    return "\n".join(lines) + "\n"


def single_tool_frames(table: pd.DataFrame) -> pd.DataFrame:
    """Rows with exactly one tool present, as columns ``frame`` and ``label`` (0-6, int64)."""
    flags = table[list(TOOLS)].to_numpy()
    single = flags.sum(axis=1) == 1
    return pd.DataFrame(
        {
            "frame": table["Frame"].to_numpy()[single].astype(np.int64),
            "label": flags[single].argmax(axis=1).astype(np.int64),
        }
    )


def _resize(frame: av.VideoFrame, image_size: int) -> np.ndarray:
    """Whole frame -> RGB uint8 [3, S, S]; PIL's bilinear filter widens when it shrinks."""
    image = frame.to_image().resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def decode_frames(
    video_path: str | os.PathLike[str],
    frame_indices: Iterable[int],
    *,
    image_size: int,
    min_frames: int = 0,
) -> np.ndarray:
    """Decode a video in order and keep the frames whose 0-based decoded index is listed.

    Args:
        video_path: an mp4 (or any container FFmpeg reads) with one video stream.
        frame_indices: 0-based indices of decoded frames to keep (any order, no duplicates).
        image_size: side S of the square output; the whole frame is resized to S x S
            (aspect ratio not kept), with an antialiasing filter.
        min_frames: also require the video to have at least this many frames (to check
            annotated frames that are not returned).

    Returns:
        uint8 array [K, 3, S, S] (RGB, 0-255), in increasing frame-index order.

    Raises:
        VideoTooShortError: (a DatasetError) the video ends before a listed index.
        DatasetError: the file cannot be opened or decoded.
    """
    video_path = Path(video_path)
    wanted = sorted({int(i) for i in frame_indices})
    if wanted and wanted[0] < 0:
        raise DatasetError(f"{video_path}: negative frame index {wanted[0]} requested.")
    needed = max((wanted[-1] + 1) if wanted else 0, min_frames)
    wanted_set = set(wanted)
    frames = np.empty((len(wanted), 3, image_size, image_size), dtype=np.uint8)
    kept = 0
    decoded = 0
    try:
        with av.open(str(video_path)) as container:
            if not container.streams.video:
                raise DatasetError(f"{video_path}: no video stream; expected an mp4 video.")
            stream = container.streams.video[0]
            # frame and slice threading: every frame still comes out, in order, so the index
            # pairing holds (benchmarks/bench_decode.py measures the gain)
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in wanted_set:
                    frames[kept] = _resize(frame, image_size)
                    kept += 1
                if decoded >= needed:
                    break
    except DatasetError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise DatasetError(
            f"{video_path}: unreadable or corrupt video ({type(error).__name__}: {error}). "
            "Replace the file with a readable copy."
        ) from error
    if decoded < needed:
        raise VideoTooShortError(
            f"{video_path}: the video has {decoded} decoded frames, but frame {needed - 1} "
            "(0-based) was requested.",
            decoded,
        )
    return frames


def load_video_frames(record: VideoRecord, *, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode the single-tool annotated frames of one video.

    Checks that every annotated frame (with or without tools) exists in the video.

    Returns:
        ``(frame_indices int64 [K], images uint8 [K, 3, S, S])``; the labels are read from the
        annotations by the caller (:func:`single_tool_frames`).

    Raises:
        DatasetError: bad annotation file, an annotated frame beyond the end of the video
            (naming the annotation file and line), or an unreadable video.
    """
    table = read_tool_annotations(record.annotation_path)
    wanted = single_tool_frames(table)["frame"].to_numpy()
    last = int(table["Frame"].iloc[-1]) if len(table) else -1
    try:
        images = decode_frames(
            record.video_path, wanted, image_size=image_size, min_frames=last + 1
        )
    except VideoTooShortError as error:
        beyond = table[table["Frame"] >= error.frame_count]
        line = int(beyond.index[0])
        raise DatasetError(
            f"{record.annotation_path}, line {line}: annotated frame "
            f"{int(beyond['Frame'].iloc[0])} is beyond the end of {record.video_path}, which "
            f"has {error.frame_count} frames (0-{error.frame_count - 1}). The annotation file "
            "does not belong to this video, or the video is truncated."
        ) from error
    return wanted.astype(np.int64), images


# --------------------------------------------------------------------------------------------
# The frame cache of one video: its decoded single-tool frames at one image size, as an
# uncompressed ``videoNN.npy`` (uint8 [K, 3, S, S], read through a memory map) and a
# ``videoNN.json`` beside it (the frame indices and the video's size and modification time, so a
# changed video is decoded again). Kept here (no torch) because decoding worker processes
# import this module.

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
    """Decode a video's single-tool frames into ``cache_path`` (.npy) and its sidecar (.json).

    Each file is written atomically; the sidecar is removed first and written last, so an
    interrupted rebuild leaves no entry that looks current. An old ``.npz`` cache of the same
    video is removed. Returns the number of frames cached. On any error nothing is written.
    """
    cache_path = Path(cache_path)
    size, mtime_ns = source_signature(record.video_path)  # before decoding: a change re-decodes
    frames, images = load_video_frames(record, image_size=image_size)
    cache_sidecar(cache_path).unlink(missing_ok=True)
    with atomic_path(cache_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(images), allow_pickle=False)
    write_json(
        cache_sidecar(cache_path),
        {"frames": frames.tolist(), "source_size": size, "source_mtime_ns": mtime_ns},
    )
    cache_path.with_suffix(OLD_CACHE_SUFFIX).unlink(missing_ok=True)
    return len(frames)
