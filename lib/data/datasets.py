"""One dataset interface over Cholec80-layout folders and ImageFolder trees; splits by video.

- :func:`load_cholec80`: a Cholec80-layout folder (real or synthetic) -> ``{"train", "test"}``
  :class:`~lib.data.frames.FrameSet` of the annotated frames with exactly one tool, split by
  video. Decoded frames are kept in the frame cache (:mod:`lib.data.cache`); a later load with
  the same image size decodes nothing unless a video file changed. A split is an index over
  the cache's memory maps: memory stays at a batch whatever the split's size.
- :func:`load_image_folder`: ``<root>/{train,test}/<Tool>/*.png|jpg`` -> the same.
- :func:`load` chooses between them by dataset kind; :func:`check_dataset` checks a folder
  before a stage writes anything.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from lib import TOOLS
from lib.checking import check_choice
from lib.data import cache, cholec80
from lib.data.cache import cache_folder
from lib.data.frames import INDEX_COLUMNS, FrameImages, FrameSet, frame_set_from_arrays
from lib.errors import DatasetError, ParameterError, RunFolderError
from lib.progress import progress_bar, tracked

SPLITS: tuple[str, ...] = ("train", "test")
#: The kinds of dataset folder: "synthetic" (generated when missing) and "cholec80" share the
#: Cholec80 layout; "imagefolder" holds ``train/<Tool>/`` and ``test/<Tool>/`` images.
DATASET_KINDS: tuple[str, ...] = ("synthetic", "cholec80", "imagefolder")
#: Cholec80's split by video (the paper's): videos 1-40 train, 41-80 test.
DEFAULT_TRAIN_VIDEOS = "1-40"
DEFAULT_TEST_VIDEOS = "41-80"
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def parse_video_ids(spec: str | int | Iterable[int]) -> list[int]:
    """Video ids from ``"1-40"``, ``"1-6,9"``, an int or a list of ints; sorted, unique.

    Raises:
        ParameterError: malformed text, a reversed range, or an id below 1.
    """
    if isinstance(spec, int):
        spec = [spec]
    if not isinstance(spec, str):
        ids = sorted({int(i) for i in spec})
        if ids and ids[0] < 1:
            raise ParameterError(f"video ids {ids}: ids start at 1.")
        return ids
    ids_set: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ParameterError(
                f"video selection {spec!r}: cannot read {part!r}; expected ranges and ids like "
                "'1-40' or '1-6,9'."
            )
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if first < 1 or last < first:
            raise ParameterError(
                f"video selection {spec!r}: range {part!r} is empty or starts below 1."
            )
        ids_set.update(range(first, last + 1))
    return sorted(ids_set)


def split_records(
    records: Sequence[cholec80.VideoRecord],
    root: Path,
    train_videos: str | Iterable[int],
    test_videos: str | Iterable[int],
) -> dict[str, list[cholec80.VideoRecord]]:
    """The videos of each split (``{"train": [...], "test": [...]}``) among ``records``.

    Raises:
        ParameterError: the two selections share a video.
        DatasetError: a split has no video in the folder.
    """
    wanted = {"train": parse_video_ids(train_videos), "test": parse_video_ids(test_videos)}
    overlap = sorted(set(wanted["train"]) & set(wanted["test"]))
    if overlap:
        raise ParameterError(
            f"videos {overlap} are in both train_videos and test_videos; the split is by video."
        )
    chosen = {
        split: [record for record in records if record.video_id in set(ids)]
        for split, ids in wanted.items()
    }
    available = [record.video_id for record in records]
    for split, split_records in chosen.items():
        if not split_records:
            raise DatasetError(
                f"{root}: none of the {split} videos ({split}_videos="
                f"{train_videos if split == 'train' else test_videos!r}) is in the folder, "
                f"which holds videos {available}. Choose the split to match the folder."
            )
    return chosen


def _decode_all(
    jobs: list[tuple[cholec80.VideoRecord, Path]],
    *,
    image_size: int,
    workers: int,
    progress: bool,
) -> None:
    """Decode each (video, cache file) job; in parallel processes when ``workers`` > 1."""
    bar = progress_bar(len(jobs), desc="decoding videos", unit="video", enabled=progress)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for record, path in jobs:
                cache.decode_into_cache(record, image_size=image_size, cache_path=path)
                bar.update()
            return
        context = get_context("spawn")  # workers import lib.data.cholec80 only: no torch, no fork
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending = {
                pool.submit(
                    cache.decode_into_cache, record, image_size=image_size, cache_path=path
                )
                for record, path in jobs
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        pool.shutdown(cancel_futures=True)
                        raise future.exception()
                    bar.update()


def load_cholec80(
    root: str | os.PathLike[str],
    *,
    image_size: int,
    cache_dir: str | os.PathLike[str],
    train_videos: str | Iterable[int] = DEFAULT_TRAIN_VIDEOS,
    test_videos: str | Iterable[int] = DEFAULT_TEST_VIDEOS,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, FrameSet]:
    """Read a Cholec80-layout folder into train and test FrameSets of single-tool frames.

    Every annotation file of the chosen videos is checked before anything is decoded. Videos
    whose cache is missing or stale are decoded (in ``workers`` processes); the others are
    read from the cache.

    Args:
        root: folder with ``videos/videoNN.mp4`` and ``tool_annotations/videoNN-tool.txt``.
        image_size: side S of the square images (whole frames are resized to S x S).
        cache_dir: folder for the frame caches (any number of datasets and sizes).
        train_videos, test_videos: video ids, e.g. ``"1-40"`` or ``[1, 2, 5]``. Ids that are
            not in the folder are skipped; each split must keep at least one video.
        workers: decoding processes (1 = decode in this process).
        progress: show a progress bar (:mod:`lib.progress`).

    Returns:
        ``{"train": FrameSet, "test": FrameSet}``. ``image_id`` is ``videoNN-fFFFFFF``,
        ``source`` ``videoNN``. Each FrameSet's ``meta`` has ``"dataset"`` (the
        ``dataset.json`` fields, with the video ids actually used) and ``"decoded_videos"``
        (names of the videos decoded by this call).

    Raises:
        DatasetError: the folder, an annotation file or a video is missing or malformed.
        ParameterError: a malformed or overlapping video selection, or image_size < 1.
    """
    if image_size < 1:
        raise ParameterError(f"image_size={image_size}: expected a positive number of pixels.")
    root = Path(root)
    splits = split_records(cholec80.find_videos(root), root, train_videos, test_videos)
    tables = {
        record: cholec80.single_tool_frames(cholec80.read_tool_annotations(record.annotation_path))
        for split in SPLITS
        for record in splits[split]
    }
    folder = cache_folder(root, cache_dir=cache_dir, image_size=image_size)
    cache_paths = {record: folder / f"{record.name}.npy" for record in tables}
    problems = {
        record: cache.cache_problem(
            cache_paths[record], record.video_path, table["frame"].to_numpy()
        )
        for record, table in tables.items()
    }
    for problem in problems.values():
        if problem:  # an old-format or truncated cache: say why it is decoded again
            print(problem, file=sys.stderr)
    stale = [
        (record, cache_paths[record]) for record, problem in problems.items() if problem is not None
    ]
    _decode_all(stale, image_size=image_size, workers=workers, progress=progress)
    meta = {
        "dataset": {
            "kind": "cholec80",
            "root": str(root.resolve()),
            "image_size": int(image_size),
            "cache_dir": str(Path(cache_dir).resolve()),
            "train_videos": [record.video_id for record in splits["train"]],
            "test_videos": [record.video_id for record in splits["test"]],
        },
        "decoded_videos": [record.name for record, _ in stale],
    }
    return {
        split: frames_from_cache(
            [(record, tables[record], cache_paths[record]) for record in splits[split]],
            split=split,
            image_size=image_size,
            meta=meta,
        )
        for split in SPLITS
    }


def frames_from_cache(
    videos: Sequence[tuple[cholec80.VideoRecord | str, pd.DataFrame, Path]],
    *,
    split: str,
    image_size: int,
    meta: dict[str, Any],
) -> FrameSet:
    """A split as an index over cache files; ``videos`` holds (video, frame+label table, cache).

    Nothing is read but each cache's header and sidecar: the images stay in the memory-mapped
    ``.npy`` files until a batch asks for them.
    """
    sources: list[cache.MappedFrames] = []
    source_of: list[np.ndarray] = []
    row_of: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for video, table, cache_path in videos:
        name = video if isinstance(video, str) else video.name
        wanted = table["frame"].to_numpy(np.int64)
        frames, cached_frames = _open_cache(cache_path, wanted, image_size)
        source_of.append(np.full(len(wanted), len(sources), dtype=np.int64))
        row_of.append(np.searchsorted(cached_frames, wanted))
        sources.append(frames)
        rows.extend(
            {
                "image_id": f"{name}-f{frame:06d}",
                "split": split,
                "source": name,
                "frame": frame,
                "label": label,
            }
            for frame, label in zip(
                wanted.tolist(), table["label"].to_numpy(np.int64).tolist(), strict=True
            )
        )
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).astype(
        {"image_id": str, "split": str, "source": str, "frame": np.int64, "label": np.int64}
    )
    images = FrameImages(
        sources,
        np.concatenate(source_of) if source_of else np.empty(0, np.int64),
        np.concatenate(row_of) if row_of else np.empty(0, np.int64),
        image_size=image_size,
    )
    return FrameSet(images, index["label"].to_numpy(), index, meta=meta)


def _open_cache(
    cache_path: Path, wanted: np.ndarray, image_size: int
) -> tuple[cache.MappedFrames, np.ndarray]:
    """The memory-mapped frames of one cache entry and its frame indices (int64 [K]), checked
    to hold ``wanted`` at S px."""
    again = "run the data stage (01_data) again."
    if not cache_path.exists() and cache_path.with_suffix(cache.OLD_CACHE_SUFFIX).exists():
        raise RunFolderError(
            f"{cache_path.with_suffix(cache.OLD_CACHE_SUFFIX)}: frame cache in the old .npz "
            f"format, which is read whole into memory; {again[0].upper() + again[1:]} It "
            f"rebuilds the cache as {cache_path.name}, read through a memory map."
        )
    try:
        frames = cache.MappedFrames(cache_path)
    except FileNotFoundError as error:
        raise RunFolderError(
            f"{cache_path}: frame cache missing; run the data stage (01_data) first."
        ) from error
    except cache.FrameCacheError as error:
        raise RunFolderError(str(error)) from error
    cached = cache.read_frame_cache(cache_path, load_images=False)
    if cached is None:
        raise RunFolderError(
            f"{cache.cache_sidecar(cache_path)}: frame cache index missing or unreadable; "
            + again
        )
    if not np.isin(wanted, cached["frames"]).all():
        raise RunFolderError(f"{cache_path}: the frame cache lacks frames this run needs; " + again)
    if frames.shape[-1] != image_size:
        raise RunFolderError(
            f"{cache_path}: cached images are {frames.shape[-1]}px, expected {image_size}px; "
            + again
        )
    return frames, cached["frames"]


def image_files(root: Path, split: str) -> list[tuple[Path, int]]:
    """``(path, label)`` of every image of ``root/split/<Tool>/``, in name order."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: split folder missing. An image-folder dataset holds "
            f"'train/<Tool>/*.png' and 'test/<Tool>/*.png' with <Tool> one of {', '.join(TOOLS)}."
        )
    files = []
    for class_folder in sorted(folder.iterdir()):
        if class_folder.name.startswith("."):
            continue
        if not class_folder.is_dir() or class_folder.name not in TOOLS:
            raise DatasetError(
                f"{class_folder}: not a class folder of the seven tools; expected only folders "
                f"named {', '.join(TOOLS)} (exact spelling) in {folder}."
            )
        label = TOOLS.index(class_folder.name)
        files.extend(
            (path, label)
            for path in sorted(class_folder.iterdir())
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        )
    return files


def _read_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"{path}: unreadable image ({error}); replace or remove it.") from error
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)[None]


def image_folder_split(
    root: Path, files: Sequence[tuple[str, int]], *, split: str, image_size: int, meta: dict
) -> FrameSet:
    """A split of an image folder from its files ``(path relative to root, label)``."""
    images = [_read_image(root / source, image_size) for source, _ in files]
    rows = [
        {"image_id": source, "split": split, "source": source, "frame": -1, "label": label}
        for source, label in files
    ]
    return frame_set_from_arrays(images, rows, image_size, meta)


def load_image_folder(
    root: str | os.PathLike[str], *, image_size: int, progress: bool = True
) -> dict[str, FrameSet]:
    """Read ``<root>/train/<Tool>/*`` and ``<root>/test/<Tool>/*`` (png or jpg) into FrameSets.

    Each image is converted to RGB and resized to S x S. ``image_id`` and ``source`` are the
    path relative to ``root`` (e.g. ``train/Hook/a.png``); ``frame`` is -1.

    Raises:
        DatasetError: ``root`` or a split folder is missing, a folder inside a split is not
            named after one of the seven tools, or an image cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: image-folder dataset not found; check the parameter dataset_root."
        )
    meta = {
        "dataset": {
            "kind": "imagefolder",
            "root": str(root.resolve()),
            "image_size": int(image_size),
            "cache_dir": "",
            "train_videos": [],
            "test_videos": [],
        },
        "decoded_videos": [],
    }
    found = {split: image_files(root, split) for split in SPLITS}
    result = {}
    for split in SPLITS:
        files = [(path.relative_to(root).as_posix(), label) for path, label in found[split]]
        files = list(tracked(files, total=len(files), desc=f"reading {split} images",
                             unit="image", enabled=progress))
        result[split] = image_folder_split(
            root, files, split=split, image_size=image_size, meta=meta
        )
    return result


def load(
    kind: str,
    root: str | os.PathLike[str],
    *,
    image_size: int,
    cache_dir: str | os.PathLike[str],
    train_videos: str | Iterable[int] = DEFAULT_TRAIN_VIDEOS,
    test_videos: str | Iterable[int] = DEFAULT_TEST_VIDEOS,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, FrameSet]:
    """:func:`load_cholec80` for ``kind`` "cholec80" or "synthetic" (same layout),
    :func:`load_image_folder` for "imagefolder" (video and cache arguments unused)."""
    check_choice(kind, DATASET_KINDS, "dataset kind")
    if kind != "imagefolder":
        return load_cholec80(
            root,
            image_size=image_size,
            cache_dir=cache_dir,
            train_videos=train_videos,
            test_videos=test_videos,
            workers=workers,
            progress=progress,
        )
    return load_image_folder(root, image_size=image_size, progress=progress)


def check_dataset(
    kind: str,
    root: str | os.PathLike[str],
    *,
    train_videos: str | Iterable[int] = DEFAULT_TRAIN_VIDEOS,
    test_videos: str | Iterable[int] = DEFAULT_TEST_VIDEOS,
) -> None:
    """Check a dataset folder quickly, before a stage writes anything; nothing is decoded.

    A Cholec80-layout folder ("cholec80"): its layout, the video selection, every annotation
    file of the chosen videos, and that each chosen video opens and yields a first frame. An
    image folder ("imagefolder"): its split and class folders, and that each split holds
    images. A "synthetic" folder is generated when missing, so it must only not be a file.

    Raises:
        DatasetError, ParameterError: as :func:`load` would, naming the file and the fix.
    """
    root = Path(root)
    if kind == "synthetic":
        if root.exists() and not root.is_dir():
            raise DatasetError(
                f"{root}: is a file, not a dataset folder; set dataset_root to a folder "
                "(the synthetic dataset is generated there when it does not exist)."
            )
        return
    if kind == "imagefolder":
        if not root.is_dir():
            raise DatasetError(
                f"{root}: image-folder dataset not found; check the parameter dataset_root."
            )
        for split in SPLITS:
            if not image_files(root, split):
                raise DatasetError(
                    f"{root / split}: no .png or .jpg images in its class folders; add images "
                    "or check the parameter dataset_root."
                )
        return
    chosen = split_records(cholec80.find_videos(root), root, train_videos, test_videos)
    for record in (record for split in SPLITS for record in chosen[split]):
        cholec80.read_tool_annotations(record.annotation_path)
        cholec80.decode_frames(record.video_path, [], image_size=1, min_frames=1)
