"""Each training image's margin in the borderline arm, kept across epochs and saved as a table.

The margin of a training image is the Linf distance (pixel units) of its refined borderline
image when the borderline arm last attacked it (:mod:`lib.train.borderline`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lib.checking import is_int
from lib.errors import ParameterError


class MarginTable:
    """Each training image's latest margin, kept across epochs.

    ``margin`` float64 [N]: the Linf distance (pixel units) of the image's refined borderline
    image when it was last attacked; 0 when the model misclassified it then; ``inf`` when no
    flip was found within the update cap; NaN when it was never looked at. ``epoch`` and
    ``step`` int64 [N] say when (0: never).
    """

    COLUMNS: tuple[str, ...] = ("image", "margin", "epoch", "step")

    def __init__(self, num_images: int) -> None:
        if not is_int(num_images) or num_images < 1:
            raise ParameterError(f"num_images must be an int >= 1, got {num_images!r}")
        self.margin = torch.full((num_images,), math.nan, dtype=torch.float64)
        self.epoch = torch.zeros(num_images, dtype=torch.int64)
        self.step = torch.zeros(num_images, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.margin)

    def update(self, index: Tensor, margins: Tensor, *, epoch: int, step: int) -> None:
        """Record ``margins`` [k] (pixel units) of the training images at ``index`` [k]."""
        index = index.detach().to("cpu", torch.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise ParameterError(
                f"margin table: image positions must lie in 0 .. {len(self) - 1}, got "
                f"{index.min().item()} .. {index.max().item()}"
            )
        self.margin[index] = margins.detach().to("cpu", torch.float64)
        self.epoch[index] = epoch
        self.step[index] = step

    def to_frame(self) -> pd.DataFrame:
        """The table as a DataFrame with ``COLUMNS``, one row per training image."""
        return pd.DataFrame({
            "image": np.arange(len(self)), "margin": self.margin.numpy(),
            "epoch": self.epoch.numpy(), "step": self.step.numpy(),
        })  # fmt: skip

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> MarginTable:
        """The table :meth:`to_frame` wrote (rows in image order 0 .. N-1)."""
        missing = [c for c in cls.COLUMNS if c not in frame.columns]
        if missing or not np.array_equal(frame["image"].to_numpy(), np.arange(len(frame))):
            raise ParameterError(
                f"a margin table needs the columns {', '.join(cls.COLUMNS)} and one row per "
                f"image 0 .. N-1 in order; missing {missing or 'none'}"
            )
        table = cls(len(frame))
        table.margin = torch.tensor(frame["margin"].to_numpy(dtype=np.float64))
        table.epoch = torch.tensor(frame["epoch"].to_numpy(dtype=np.int64))
        table.step = torch.tensor(frame["step"].to_numpy(dtype=np.int64))
        return table
