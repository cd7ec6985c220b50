"""The Cholec80 layout: find videos, parse tool annotations, decode exactly the annotated frames.

The layout as distributed (the data chapter, notebooks/01_data.py)::

    <root>/videos/videoNN.mp4                 25 fps
    <root>/tool_annotations/videoNN-tool.txt  tab separated, one row every 25 frames

The annotation row with ``Frame = f`` belongs to the ``f``-th decoded frame (0-based) of its
video. Frames are paired by that index while decoding the whole video in order, never by counting
extracted image files. Other files in the folders (``videoNN-timestamp.txt``, phase annotations)
are ignored. This module needs no torch: it runs in the decoding worker processes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pandas as pd
from PIL import Image

from lib import TOOLS
from lib.errors import DatasetError

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
