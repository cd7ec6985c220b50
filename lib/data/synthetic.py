"""The embedded default dataset: synthetic laparoscopic videos in the exact Cholec80 layout.

:func:`generate` writes ``videos/videoNN.mp4`` (25 fps, H.264) and
``tool_annotations/videoNN-tool.txt`` (the real header, one row every 25 frames), and nothing
else: the annotation files are the ground truth, read back by the same reader as real Cholec80.
Each video is planned and rendered by :mod:`lib.data.scene`, then encoded. Everything is
derived from ``(seed, video id)``: the same seed gives byte-identical annotation files and
identical decoded frames.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import av

from lib.data.cholec80 import (
    ANNOTATION_DIR,
    ANNOTATION_NAME_PATTERN,
    FPS,
    VIDEO_DIR,
    VIDEO_NAME_PATTERN,
    annotation_file_name,
    format_tool_annotations,
    video_file_name,
)
from lib.data.scene import Scene, annotation_table
from lib.errors import DatasetError, ParameterError
from lib.io import atomic_path, write_text
from lib.progress import progress_bar

CRF = 20  # x264 quality; lower is better and larger
_START_ID = (1, 41)  # first video id of the train half and of the test half


def video_ids(n_videos: int) -> list[int]:
    """Ids of the synthetic videos: the first ceil(n/2) from 1, the others from 41.

    So Cholec80's split by video (videos 1-40 train, 41-80 test) splits them in halves.
    """
    if not 2 <= n_videos <= 80:
        raise ParameterError(
            f"n_videos={n_videos}: expected 2 to 80 (at least one train and one test video)."
        )
    n_train = (n_videos + 1) // 2
    return [_START_ID[0] + i for i in range(n_train)] + [
        _START_ID[1] + i for i in range(n_videos - n_train)
    ]


def _video_is_current(path: Path, *, frames: int, width: int, height: int) -> bool:
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return (stream.frames, stream.width, stream.height) == (frames, width, height)
    except (av.FFmpegError, OSError, IndexError):
        return False


def _write_video(
    root: Path, video_id: int, *, seconds: int, width: int, height: int, seed: int, overwrite: bool
) -> bool:
    """Write one video and its annotation file; returns False when both were already there."""
    scene = Scene(video_id, seconds=seconds, width=width, height=height, seed=seed)
    text = format_tool_annotations(annotation_table(scene.episodes, seconds))
    video_path = root / VIDEO_DIR / video_file_name(video_id)
    annotation_path = root / ANNOTATION_DIR / annotation_file_name(video_id)
    n_frames = seconds * FPS
    if (
        not overwrite
        and annotation_path.is_file()
        and annotation_path.read_text(encoding="utf-8") == text
        and _video_is_current(video_path, frames=n_frames, width=width, height=height)
    ):
        return False
    with atomic_path(video_path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # one encoder thread: x264's output depends on its thread count
            stream.options = {"preset": "ultrafast", "crf": str(CRF), "threads": "1"}
            for index in range(n_frames):
                frame = av.VideoFrame.from_image(scene.render(index))
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    write_text(annotation_path, text)
    return True


def generate(
    root: str | os.PathLike[str],
    *,
    n_videos: int,
    seconds_per_video: int,
    width: int,
    height: int,
    seed: int,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the Cholec80 layout under ``root``.

    Args:
        root: output folder; ``videos/`` and ``tool_annotations/`` are created in it.
        n_videos: number of videos (2-80); ids from :func:`video_ids` (1.. and 41..).
        seconds_per_video: length of each video in seconds (= annotation rows), at least 2.
        width, height: frame size in pixels (even numbers, at least 32 x 32).
        seed: all content derives from ``(seed, video id)``.
        workers: processes rendering videos in parallel (1 = in this process).
        overwrite: re-render videos that are already present and current (a video counts as
            current when its annotation file has the planned bytes and its mp4 the planned
            frame count and size; the renderer's code is not checked).
        progress: show a progress bar (:mod:`lib.progress`).

    Returns:
        ``root`` as a Path. Nothing else is written: the annotation files are the ground truth.

    Raises:
        ParameterError: an argument out of range.
        DatasetError: ``root`` holds Cholec80 files of videos outside this plan (pass
            ``overwrite=True`` to delete them, or choose another folder).
    """
    ids = video_ids(n_videos)
    if seconds_per_video < 2:
        raise ParameterError(f"seconds_per_video={seconds_per_video}: expected at least 2.")
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ParameterError(
            f"width x height = {width} x {height}: expected even sizes of at least 32 (H.264 "
            "with 4:2:0 colour needs even sizes)."
        )
    root = Path(root)
    _remove_stale(root, set(ids), overwrite=overwrite)
    (root / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    (root / ANNOTATION_DIR).mkdir(parents=True, exist_ok=True)
    jobs = [
        dict(
            root=root,
            video_id=video_id,
            seconds=seconds_per_video,
            width=width,
            height=height,
            seed=seed,
            overwrite=overwrite,
        )
        for video_id in ids
    ]
    bar = progress_bar(len(jobs), desc="synthetic videos", unit="video", enabled=progress)
    with bar:
        if workers <= 1:
            for job in jobs:
                _write_video(**job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for _ in pool.map(_call_write_video, jobs):
                    bar.update()
    return root


def ensure(
    root: str | os.PathLike[str],
    *,
    n_videos: int,
    seconds_per_video: int,
    width: int,
    height: int,
    seed: int,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """:func:`generate` without ``overwrite``: renders only videos missing or not current."""
    return generate(
        root,
        n_videos=n_videos,
        seconds_per_video=seconds_per_video,
        width=width,
        height=height,
        seed=seed,
        workers=workers,
        overwrite=False,
        progress=progress,
    )


def _call_write_video(job: dict) -> bool:
    return _write_video(**job)


def _remove_stale(root: Path, ids: set[int], *, overwrite: bool) -> None:
    stale = []
    for folder, pattern in (
        (VIDEO_DIR, VIDEO_NAME_PATTERN),
        (ANNOTATION_DIR, ANNOTATION_NAME_PATTERN),
    ):
        if (root / folder).is_dir():
            for path in sorted((root / folder).iterdir()):
                match = pattern.match(path.name)
                if match and int(match.group(1)) not in ids:
                    stale.append(path)
    if stale and not overwrite:
        listed = ", ".join(str(p) for p in stale[:5]) + (" ..." if len(stale) > 5 else "")
        raise DatasetError(
            f"{root}: holds videos or annotation files that this synthetic dataset does not "
            f"have ({listed}). Choose an empty folder, delete them, or pass overwrite=True."
        )
    for path in stale:
        path.unlink()
