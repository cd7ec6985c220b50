"""One dataset interface over Cholec80-layout folders and ImageFolder trees; splits; the cache.

- :class:`FrameSet`: images (uint8 [N, 3, S, S]), labels (int64 [N], 0-6 in ``lib.TOOLS``
  order) and an index table saying where each image came from.
- :func:`load_cholec80`: a Cholec80-layout folder (real or synthetic) -> ``{"train", "test"}``
  FrameSets of the annotated frames with exactly one tool, split by video. Decoded frames are
  cached per video at ``<cache_dir>/<dataset key>/<S>px/videoNN.npy`` (uncompressed, read
  through a memory map; ``videoNN.json`` beside it lists the frames); a later load with the
  same image size decodes nothing unless a video file changed. A split is an index over those
  maps: memory stays at a batch whatever the split's size (:class:`FrameImages`).
- :func:`load_image_folder`: ``<root>/{train,test}/<Tool>/*.png|jpg`` -> the same.
- :func:`write_run_data` / :func:`load_run_split`: the run folder's ``data/`` files, so later
  stages rebuild a split without decoding.
- Small tables for the data chapter: :func:`class_counts`, :func:`tools_per_frame`,
  :func:`compare_with_published`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lib import NUM_CLASSES, TOOLS, cholec80, stages
from lib.errors import DatasetError, ParameterError, RunFolderError
from lib.io import read_json, write_csv, write_json
from lib.progress import progress_bar, tracked

SPLITS: tuple[str, ...] = ("train", "test")
INDEX_COLUMNS: tuple[str, ...] = ("image_id", "split", "source", "frame", "label")
DEFAULT_TRAIN_VIDEOS = "1-40"  # METHOD.md: Cholec80 videos 1-40 train, 41-80 test
DEFAULT_TEST_VIDEOS = "41-80"
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: Single-tool frames of real Cholec80 per split and tool, as in Ding & Moeller (2023) and
#: reproduced by METHOD.md's reading of the annotations ("Data: Cholec80").
PUBLISHED_COUNTS: Mapping[str, Mapping[str, int]] = {
    "train": {
        "Grasper": 11_728,
        "Bipolar": 1_085,
        "Hook": 15_057,
        "Scissors": 541,
        "Clipper": 1_028,
        "Irrigator": 1_334,
        "SpecimenBag": 704,
    },
    "test": {
        "Grasper": 11_779,
        "Bipolar": 2_137,
        "Hook": 29_830,
        "Scissors": 942,
        "Clipper": 1_619,
        "Irrigator": 1_565,
        "SpecimenBag": 841,
    },
}
#: Totals of the same table (single-tool frames per split).
PUBLISHED_TOTALS: Mapping[str, int] = {"train": 31_477, "test": 48_713}
#: All 80 videos (METHOD.md): annotated frames, and how many show no tool / two or more.
PUBLISHED_TOOLS_PER_FRAME: Mapping[str, int] = {
    "annotated": 184_498,
    "0": 23_101,
    "1": 80_190,  # = 184,498 - 23,101 - 81,207 = 31,477 + 48,713
    "2+": 81_207,
}


# --------------------------------------------------------------------------------------------
# The dataset interface


class FrameImages:
    """uint8 images [N, 3, S, S] gathered on demand from per-source frame arrays.

    A source is an in-memory array or a :class:`lib.cholec80.MappedFrames` (a memory-mapped
    cache file); image ``i`` is row ``rows[i]`` of source ``sources[i]``. Indexing copies only
    the images asked for: ``images[i]`` is a uint8 tensor [3, S, S]; ``images[positions]``
    (a slice, a list or an int/bool array or tensor) is uint8 [K, 3, S, S] in that order.
    :meth:`take` makes a smaller index without reading anything.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self,
        sources: Sequence[np.ndarray | cholec80.MappedFrames],
        source_of: np.ndarray,
        row_of: np.ndarray,
        *,
        image_size: int,
    ) -> None:
        self.sources = list(sources)
        self.source_of = np.asarray(source_of, dtype=np.int64)
        self.row_of = np.asarray(row_of, dtype=np.int64)
        self.image_size = int(image_size)

    @classmethod
    def from_array(cls, images: torch.Tensor | np.ndarray) -> FrameImages:
        """An in-memory uint8 [N, 3, S, S] array or tensor as one source."""
        array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return cls([array], np.zeros(len(array), np.int64), np.arange(len(array)),
                   image_size=array.shape[-1] if array.ndim == 4 else 0)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.image_size, self.image_size))

    def __len__(self) -> int:
        return len(self.row_of)

    def _positions(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        chosen = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        if chosen.dtype == bool:
            if chosen.shape != (len(self),):
                raise ValueError(f"mask of shape {chosen.shape} for {len(self)} images")
            return np.flatnonzero(chosen)
        chosen = chosen.astype(np.int64).reshape(-1)
        if len(chosen) and not (-len(self) <= chosen.min() and chosen.max() < len(self)):
            raise IndexError(f"image positions outside 0..{len(self) - 1}")
        return chosen % max(len(self), 1)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or getattr(key, "ndim", None) == 0:
            return self[[int(key)]][0]
        positions = self._positions(key)
        out = np.empty((len(positions), 3, self.image_size, self.image_size), dtype=np.uint8)
        sources = self.source_of[positions]
        for source in np.unique(sources):
            picked = np.flatnonzero(sources == source)
            rows = self.row_of[positions[picked]]
            frames = self.sources[source]
            out[picked] = frames.read(rows) if hasattr(frames, "read") else frames[rows]
        return torch.from_numpy(out)

    def take(self, positions: Any) -> FrameImages:
        """The images at ``positions`` (as for indexing), still unread."""
        chosen = self._positions(positions)
        return FrameImages(self.sources, self.source_of[chosen], self.row_of[chosen],
                           image_size=self.image_size)

    def numpy(self) -> np.ndarray:
        """Every image, read into memory: uint8 [N, 3, S, S] (avoid on a paper-scale split)."""
        return self[:].numpy()


class FrameSet(Dataset):
    """Labelled frames, all of one size, with where each came from.

    Attributes:
        images: :class:`FrameImages`, uint8 [N, 3, S, S] (RGB, 0-255), read on indexing: a
            split loaded from the frame cache is an index over memory-mapped files, never a
            tensor of the whole split.
        labels: int64 tensor [N], values 0-6 (index into ``lib.TOOLS``).
        index: DataFrame with one row per image, columns ``image_id`` (str, stable),
            ``split``, ``source`` (video name or relative file path), ``frame`` (0-based frame
            index in the video, -1 for image files) and ``label`` (equal to ``labels``).
        meta: free-form dict; loaders put the ``dataset.json`` fields under ``"dataset"``.

    ``frame_set[i]`` is ``(float32 tensor [3, S, S] in [0, 1], int label)``.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray | FrameImages,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        index: pd.DataFrame,
        *,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(images, FrameImages):
            images = torch.as_tensor(images)
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"images must be uint8 [N, 3, S, S], got {images.dtype} {tuple(images.shape)}"
                )
            if images.shape[2] != images.shape[3]:
                raise ValueError(f"images must be square, got {tuple(images.shape)}")
            images = FrameImages.from_array(images)
        if isinstance(labels, torch.Tensor):
            labels = labels.to(torch.int64)
        else:
            labels = torch.as_tensor(np.array(labels, dtype=np.int64))  # a copy: writable
        if labels.shape != (len(images),) or len(index) != len(images):
            raise ValueError(
                f"{len(images)} images, {tuple(labels.shape)} labels, {len(index)} index rows"
            )
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < NUM_CLASSES):
            raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}")
        missing = set(INDEX_COLUMNS) - set(index.columns)
        if missing:
            raise ValueError(f"index lacks columns {sorted(missing)}")
        self.images = images
        self.labels = labels
        self.index = index.reset_index(drop=True)
        if not np.array_equal(self.index["label"].to_numpy(np.int64), labels.numpy()):
            raise ValueError("index['label'] differs from labels")
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def image_size(self) -> int:
        """Side S of the square images."""
        return self.images.image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 255.0, int(self.labels[i])

    def float_images(self) -> torch.Tensor:
        """All images as float32 [N, 3, S, S] in [0, 1] (read into memory: small sets only)."""
        return self.images[:].float() / 255.0

    def subset(self, selection: Any) -> FrameSet:
        """The images picked by a boolean mask (length N) or by integer positions (unread)."""
        chosen = torch.as_tensor(np.asarray(selection))
        if chosen.dtype == torch.bool:
            if chosen.shape != (len(self),):
                raise ValueError(f"mask of shape {tuple(chosen.shape)} for {len(self)} images")
            chosen = chosen.nonzero().flatten()
        chosen = chosen.long()
        return FrameSet(
            self.images.take(chosen),
            self.labels[chosen],
            self.index.iloc[chosen.numpy()],
            meta=self.meta,
        )

    def __repr__(self) -> str:
        splits = ",".join(sorted(self.index["split"].unique()))
        return f"FrameSet({len(self)} images, {self.image_size}px, split={splits or '-'})"


def _frame_set(
    images: list[np.ndarray], rows: list[dict[str, Any]], image_size: int, meta: dict[str, Any]
) -> FrameSet:
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).astype(
        {"image_id": str, "split": str, "source": str, "frame": np.int64, "label": np.int64}
    )
    stacked = (
        np.concatenate(images)
        if images
        else np.empty((0, 3, image_size, image_size), dtype=np.uint8)
    )
    return FrameSet(torch.from_numpy(stacked), index["label"].to_numpy(), index, meta=meta)


# --------------------------------------------------------------------------------------------
# Video selections


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


def _split_records(
    records: Sequence[cholec80.VideoRecord],
    root: Path,
    train_videos: str | Iterable[int],
    test_videos: str | Iterable[int],
) -> dict[str, list[cholec80.VideoRecord]]:
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


# --------------------------------------------------------------------------------------------
# Cholec80-layout folders


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
                cholec80.decode_into_cache(record, image_size=image_size, cache_path=path)
                bar.update()
            return
        context = get_context("spawn")  # workers import lib.cholec80 only: no torch, no fork
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending = {
                pool.submit(
                    cholec80.decode_into_cache, record, image_size=image_size, cache_path=path
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
    splits = _split_records(cholec80.find_videos(root), root, train_videos, test_videos)
    tables = {
        record: cholec80.single_tool_frames(cholec80.read_tool_annotations(record.annotation_path))
        for split in SPLITS
        for record in splits[split]
    }
    folder = cache_folder(root, cache_dir=cache_dir, image_size=image_size)
    cache_paths = {record: folder / f"{record.name}.npy" for record in tables}
    problems = {
        record: cholec80.cache_problem(
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
        split: _frames_from_cache(
            [(record, tables[record], cache_paths[record]) for record in splits[split]],
            split=split,
            image_size=image_size,
            meta=meta,
        )
        for split in SPLITS
    }


def _frames_from_cache(
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
    sources: list[cholec80.MappedFrames] = []
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
) -> tuple[cholec80.MappedFrames, np.ndarray]:
    """The memory-mapped frames of one cache entry and its frame indices (int64 [K]), checked
    to hold ``wanted`` at S px."""
    again = "run the data stage (01_data) again."
    if not cache_path.exists() and cache_path.with_suffix(cholec80.OLD_CACHE_SUFFIX).exists():
        raise RunFolderError(
            f"{cache_path.with_suffix(cholec80.OLD_CACHE_SUFFIX)}: frame cache in the old .npz "
            f"format, which is read whole into memory; {again[0].upper() + again[1:]} It "
            f"rebuilds the cache as {cache_path.name}, read through a memory map."
        )
    try:
        frames = cholec80.MappedFrames(cache_path)
    except FileNotFoundError as error:
        raise RunFolderError(
            f"{cache_path}: frame cache missing; run the data stage (01_data) first."
        ) from error
    except cholec80.FrameCacheError as error:
        raise RunFolderError(str(error)) from error
    cached = cholec80.read_frame_cache(cache_path, load_images=False)
    if cached is None:
        raise RunFolderError(
            f"{cholec80.cache_sidecar(cache_path)}: frame cache index missing or unreadable; "
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


def tools_per_frame(
    root: str | os.PathLike[str],
    *,
    train_videos: str | Iterable[int] = DEFAULT_TRAIN_VIDEOS,
    test_videos: str | Iterable[int] = DEFAULT_TEST_VIDEOS,
) -> pd.DataFrame:
    """How many annotated frames show 0, 1 or 2+ tools, per split (annotation files only).

    Returns:
        DataFrame ``split, tools ("0", "1", "2+"), frames, share`` (share of the split's
        annotated frames, in [0, 1]), plus ``split = "all"`` rows.
    """
    root = Path(root)
    splits = _split_records(cholec80.find_videos(root), root, train_videos, test_videos)
    rows = []
    totals = {"0": 0, "1": 0, "2+": 0}
    for split in SPLITS:
        present = np.concatenate(
            [
                cholec80.read_tool_annotations(record.annotation_path)[list(TOOLS)]
                .to_numpy()
                .sum(axis=1)
                for record in splits[split]
            ]
        )
        counts = {"0": int((present == 0).sum()), "1": int((present == 1).sum())}
        counts["2+"] = int((present >= 2).sum())
        for tools, frames in counts.items():
            totals[tools] += frames
            rows.append((split, tools, frames, frames / max(len(present), 1)))
    grand = sum(totals.values())
    rows.extend(("all", tools, frames, frames / max(grand, 1)) for tools, frames in totals.items())
    return pd.DataFrame(rows, columns=["split", "tools", "frames", "share"])


# --------------------------------------------------------------------------------------------
# ImageFolder trees


def _image_files(root: Path, split: str) -> list[tuple[Path, int]]:
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


def _image_folder_split(
    root: Path, files: Sequence[tuple[str, int]], *, split: str, image_size: int, meta: dict
) -> FrameSet:
    images = [_read_image(root / source, image_size) for source, _ in files]
    rows = [
        {"image_id": source, "split": split, "source": source, "frame": -1, "label": label}
        for source, label in files
    ]
    return _frame_set(images, rows, image_size, meta)


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
    found = {split: _image_files(root, split) for split in SPLITS}
    result = {}
    for split in SPLITS:
        files = [(path.relative_to(root).as_posix(), label) for path, label in found[split]]
        files = list(tracked(files, total=len(files), desc=f"reading {split} images",
                             unit="image", enabled=progress))
        result[split] = _image_folder_split(
            root, files, split=split, image_size=image_size, meta=meta
        )
    return result


# --------------------------------------------------------------------------------------------
# Either input


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
    if kind in ("cholec80", "synthetic"):
        return load_cholec80(
            root,
            image_size=image_size,
            cache_dir=cache_dir,
            train_videos=train_videos,
            test_videos=test_videos,
            workers=workers,
            progress=progress,
        )
    if kind == "imagefolder":
        return load_image_folder(root, image_size=image_size, progress=progress)
    raise ParameterError(
        f"dataset kind {kind!r}: expected 'cholec80', 'synthetic' or 'imagefolder'."
    )


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
            if not _image_files(root, split):
                raise DatasetError(
                    f"{root / split}: no .png or .jpg images in its class folders; add images "
                    "or check the parameter dataset_root."
                )
        return
    chosen = _split_records(cholec80.find_videos(root), root, train_videos, test_videos)
    for record in (record for split in SPLITS for record in chosen[split]):
        cholec80.read_tool_annotations(record.annotation_path)
        cholec80.decode_frames(record.video_path, [], image_size=1, min_frames=1)


# --------------------------------------------------------------------------------------------
# The run folder's data/ files


def write_run_data(
    run_dir: str | os.PathLike[str],
    splits: Mapping[str, FrameSet],
    *,
    dataset_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``data/dataset.json``, ``data/frames.csv`` and ``data/counts.csv`` (atomically).

    Args:
        run_dir: the run folder (``data/runs/<profile>``).
        splits: ``{"train": FrameSet, "test": FrameSet}`` from a loader.
        dataset_meta: the ``dataset.json`` fields; default: ``meta["dataset"]`` of the splits.

    Returns:
        The ``data/`` folder.
    """
    if dataset_meta is None:
        dataset_meta = next(iter(splits.values())).meta.get("dataset")
        if dataset_meta is None:
            raise ParameterError("dataset_meta not given and the FrameSets carry none.")
    write_json(stages.data_file(run_dir, "dataset"), dict(dataset_meta))
    frames = pd.concat([splits[split].index for split in splits], ignore_index=True)
    write_csv(stages.data_file(run_dir, "frames"), frames[list(INDEX_COLUMNS)])
    write_csv(stages.data_file(run_dir, "counts"), class_counts(splits))
    return stages.stage_dir(run_dir, "01_data")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise RunFolderError(f"{path}: missing; run the data stage (01_data) first.")
    return path


def load_run_split(run_dir: str | os.PathLike[str], split: str) -> FrameSet:
    """Rebuild one split from a run folder's ``data/`` files and the frame cache.

    Raises:
        RunFolderError: ``data/dataset.json``, ``data/frames.csv`` or a cache file is missing
            (run the data stage first), or the split has no rows.
    """
    frames_file = stages.data_file(run_dir, "frames")
    dataset = read_json(_require(stages.data_file(run_dir, "dataset")))
    frames = pd.read_csv(
        _require(frames_file),
        dtype={"image_id": str, "split": str, "source": str, "frame": np.int64, "label": np.int64},
        keep_default_na=False,
    )
    rows = frames[frames["split"] == split]
    if rows.empty:
        raise RunFolderError(
            f"{frames_file}: no rows for split {split!r} (splits there: "
            f"{sorted(frames['split'].unique())}); run the data stage (01_data) first."
        )
    image_size = int(dataset["image_size"])
    meta = {"dataset": dataset, "decoded_videos": []}
    if dataset["kind"] == "imagefolder":
        root = Path(dataset["root"])
        files = list(zip(rows["source"], rows["label"].tolist(), strict=True))
        return _image_folder_split(root, files, split=split, image_size=image_size, meta=meta)
    folder = cache_folder(dataset["root"], cache_dir=dataset["cache_dir"], image_size=image_size)
    videos = [
        (source, group[["frame", "label"]], folder / f"{source}.npy")
        for source, group in rows.groupby("source", sort=False)
    ]
    frame_set = _frames_from_cache(videos, split=split, image_size=image_size, meta=meta)
    # back into the order of frames.csv (an index permutation: no image is read)
    order = pd.Index(frame_set.index["image_id"]).get_indexer(rows["image_id"])
    return frame_set.subset(order)


# --------------------------------------------------------------------------------------------
# Tables for the data chapter


def class_counts(splits: Mapping[str, FrameSet] | pd.DataFrame) -> pd.DataFrame:
    """Images per split and tool: DataFrame ``split, tool, frames`` (every tool, zeros too).

    Accepts ``{"train": FrameSet, ...}`` or an index table with ``split`` and ``label``.
    """
    if isinstance(splits, pd.DataFrame):
        index = splits
    else:
        index = pd.concat([frame_set.index for frame_set in splits.values()], ignore_index=True)
    present = [split for split in SPLITS if split in set(index["split"])]
    present += sorted(set(index["split"]) - set(SPLITS))
    rows = []
    for split in present:
        labels = index.loc[index["split"] == split, "label"].to_numpy(np.int64)
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        rows.extend((split, tool, int(counts[label])) for label, tool in enumerate(TOOLS))
    return pd.DataFrame(rows, columns=["split", "tool", "frames"])


def compare_with_published(counts: pd.DataFrame) -> pd.DataFrame:
    """Our single-tool counts beside the published Cholec80 ones (:data:`PUBLISHED_COUNTS`).

    Args:
        counts: from :func:`class_counts` (``split, tool, frames``).

    Returns:
        DataFrame ``split, tool, frames, published, match`` for each split and tool, plus a
        ``tool = "all"`` row per split with the totals; ``match`` is a bool.
    """
    rows = []
    for split in SPLITS:
        ours = counts[counts["split"] == split].set_index("tool")["frames"]
        for tool in TOOLS:
            frames = int(ours.get(tool, 0))
            published = PUBLISHED_COUNTS[split][tool]
            rows.append((split, tool, frames, published, frames == published))
        total = int(ours.sum())
        rows.append(
            (split, "all", total, PUBLISHED_TOTALS[split], total == PUBLISHED_TOTALS[split])
        )
    return pd.DataFrame(rows, columns=["split", "tool", "frames", "published", "match"])
