"""The data stage's settings: which dataset, which split, at which image size.

:class:`DataSettings` holds the only defaults of the data stage's parameters (those of the
default build) and their only value checks. Its ``Attributes`` section is the meaning of each
parameter that the book's parameter table shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.checking import RUNTIME, check_choice, check_int
from lib.errors import ParameterError


@dataclass(frozen=True)
class DataSettings:
    """The data stage's parameters (checked when made).

    Attributes:
        dataset_kind: "synthetic" (generated if missing), "cholec80" or "imagefolder".
        dataset_root: the dataset folder (Cholec80 layout or ImageFolder).
        train_videos: video ids of the training split (paper: 1-40; ids not present are
            skipped).
        test_videos: video ids of the test split (paper: 41-80).
        image_size: frames are resized to image_size x image_size (paper scale: 224).
        cache_dir: decoded frames, one folder per dataset and image size.
        synthetic_videos: synthetic only: number of videos (2-80; half train, half test).
        synthetic_seconds: synthetic only: annotated seconds per video; 15 minutes give a first
            epoch large enough to learn every tool.
        synthetic_width: synthetic only: frame width in pixels, even (Cholec80: 854).
        synthetic_height: synthetic only: frame height in pixels, even (Cholec80: 480).
        seed: synthetic only: the generator's seed.
        workers: processes decoding videos in parallel (1: in this process).
    """

    dataset_kind: str = "synthetic"
    dataset_root: str = "data/cholec80-synthetic"
    train_videos: str = "1-40"
    test_videos: str = "41-80"
    image_size: int = 64
    cache_dir: str = "data/cache"
    synthetic_videos: int = 16
    synthetic_seconds: int = 900
    synthetic_width: int = 192
    synthetic_height: int = 108
    seed: int = 0
    workers: int = field(default=2, metadata=RUNTIME)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` naming the first bad setting (no file is
        read)."""
        from lib.data.datasets import DATASET_KINDS, parse_video_ids
        from lib.model.network import check_image_size

        check_choice(self.dataset_kind, DATASET_KINDS, "dataset_kind")
        check_int(self.image_size, "image_size", low=1)
        check_image_size(self.image_size)
        if self.dataset_kind != "imagefolder":
            train = parse_video_ids(self.train_videos)
            test = parse_video_ids(self.test_videos)
            overlap = sorted(set(train) & set(test))
            if overlap:
                raise ParameterError(
                    f"videos {overlap} are in both train_videos and test_videos; the split is "
                    "by video, so give each video to one split only"
                )
        if self.dataset_kind == "synthetic":
            self.check_synthetic()
        check_int(self.seed, "seed", low=0)
        check_int(self.workers, "workers", low=1)

    def check_synthetic(self) -> None:
        """The synthetic dataset's own settings: video count, length and an even frame size."""
        check_int(self.synthetic_videos, "synthetic_videos", low=2, high=80)
        check_int(self.synthetic_seconds, "synthetic_seconds", low=2)
        for name in ("synthetic_width", "synthetic_height"):
            value = check_int(getattr(self, name), name, low=32)
            if value % 2:
                raise ParameterError(
                    f"{name} must be even (H.264 with 4:2:0 colour needs even sizes), "
                    f"got {value}; use {value + 1}"
                )
