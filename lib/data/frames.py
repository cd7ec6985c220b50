"""Labelled frames: the images of a split (read on demand) with where each came from.

- :class:`FrameImages`: uint8 images [N, 3, S, S] gathered on demand from per-source frame
  arrays (in memory, or memory-mapped cache files of :mod:`lib.data.cache`), so memory stays
  at a batch whatever the split's size.
- :class:`FrameSet`: images, labels (int64 [N], 0-6 in ``lib.TOOLS`` order) and an index table
  saying where each image came from; a torch ``Dataset`` of ``(image in [0, 1], label)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lib import NUM_CLASSES
from lib.data import cache

INDEX_COLUMNS: tuple[str, ...] = ("image_id", "split", "source", "frame", "label")


class FrameImages:
    """uint8 images [N, 3, S, S] gathered on demand from per-source frame arrays.

    A source is an in-memory array or a :class:`lib.data.cache.MappedFrames` (a memory-mapped
    cache file); image ``i`` is row ``rows[i]`` of source ``sources[i]``. Indexing copies only
    the images asked for: ``images[i]`` is a uint8 tensor [3, S, S]; ``images[positions]``
    (a slice, a list or an int/bool array or tensor) is uint8 [K, 3, S, S] in that order.
    :meth:`take` makes a smaller index without reading anything.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self,
        sources: Sequence[np.ndarray | cache.MappedFrames],
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


def frame_set_from_arrays(
    images: list[np.ndarray], rows: list[dict[str, Any]], image_size: int, meta: dict[str, Any]
) -> FrameSet:
    """A FrameSet of in-memory uint8 images [k, 3, S, S] (one array per source) and their index
    rows."""
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).astype(
        {"image_id": str, "split": str, "source": str, "frame": np.int64, "label": np.int64}
    )
    stacked = (
        np.concatenate(images)
        if images
        else np.empty((0, 3, image_size, image_size), dtype=np.uint8)
    )
    return FrameSet(torch.from_numpy(stacked), index["label"].to_numpy(), index, meta=meta)
