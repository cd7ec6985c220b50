"""What an epoch of training draws: the order, the class balance, the augmentation, the seeds.

Every random choice comes from its own generator seeded by ``(seed, epoch, stream)``
(:func:`stream_seed`), never from the global RNG, so an epoch draws the same batches however
the run got there (uninterrupted or resumed). Also the checks of a training dataset: labels,
image size, image ids and a fingerprint of the data.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler
from torchvision.transforms.v2 import functional as TF

from lib import NUM_CLASSES
from lib.errors import ParameterError
from lib.run import ranks

# Independent random streams per epoch; the numbers only need to differ.
_STREAMS = {"init": 0, "order": 1, "augment": 2, "dropout": 3, "loader": 4}

# Augmentation strengths: small enough that a tool entering from the border stays in view.
_CROP_AREA = (0.85, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_JITTER = 0.1  # brightness and contrast factors are drawn from [1 - _JITTER, 1 + _JITTER]


def augment_batch(images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving random views of a batch, drawn from ``generator`` only.

    images: float [B, 3, S, S] in [0, 1] (CPU) -> same shape, in [0, 1]. Per image: a crop of
    85-100 % of the area (aspect 3/4..4/3) resized back to S, a horizontal flip with p = 0.5,
    brightness and contrast factors in [0.9, 1.1]. torchvision's functional ops do the work; the
    parameters are drawn here because torchvision's random transforms use the global RNG.
    """
    count, _, height, width = images.shape
    draws = torch.rand(count, 7, generator=generator, dtype=torch.float64).tolist()
    views = []
    for image, (area_u, ratio_u, top_u, left_u, flip_u, bright_u, contrast_u) in zip(
        images, draws, strict=True
    ):
        area = height * width * (_CROP_AREA[0] + area_u * (_CROP_AREA[1] - _CROP_AREA[0]))
        ratio = math.exp(
            math.log(_CROP_RATIO[0]) + ratio_u * math.log(_CROP_RATIO[1] / _CROP_RATIO[0])
        )
        crop_w = min(width, round(math.sqrt(area * ratio)))
        crop_h = min(height, round(math.sqrt(area / ratio)))
        top = int(top_u * (height - crop_h + 1))
        left = int(left_u * (width - crop_w + 1))
        view = TF.resized_crop(image, top, left, crop_h, crop_w, [height, width], antialias=True)
        if flip_u < 0.5:
            view = TF.horizontal_flip(view)
        view = TF.adjust_brightness(view, 1 - _JITTER + 2 * _JITTER * bright_u)
        view = TF.adjust_contrast(view, 1 - _JITTER + 2 * _JITTER * contrast_u)
        views.append(view.clamp_(0.0, 1.0))
    return torch.stack(views)


def train_loader(
    train_set: Dataset,
    labels: torch.Tensor,
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    balance: str,
    num_workers: int,
) -> DataLoader:
    """The batches of one epoch, in the order drawn from ``(seed, epoch)``."""
    order = generator(seed, epoch, "order")
    if balance == "sampler":
        counts = torch.bincount(labels, minlength=NUM_CLASSES).double()
        sampler = WeightedRandomSampler(
            (1.0 / counts)[labels], num_samples=len(labels), replacement=True, generator=order
        )
    else:
        sampler = RandomSampler(train_set, generator=order)
    return DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator(seed, epoch, "loader"),  # worker seeds; never the global RNG
    )


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency class weights for the loss: float32 [7], ``N / (7 n_c)``.

    ``labels``: int64 [N] in 0..6. A class with ``n_c`` images gets ``N / (7 n_c)`` (1 for
    every class when they are balanced); a class absent from ``labels`` gets 0.
    """
    counts = torch.bincount(labels, minlength=NUM_CLASSES).float()
    weights = len(labels) / (NUM_CLASSES * counts)
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def loss_weights(train_set: Dataset, balance: str,
                 device: str | torch.device = "cpu") -> torch.Tensor | None:
    """The training cross-entropy's class weights: :func:`class_weights` of the training
    labels with ``balance="weights"``, None otherwise."""
    if balance != "weights":
        return None
    return class_weights(dataset_labels(train_set, "train_set")).to(device)


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one (seed, epoch, stream), independent across all three."""
    state = np.random.SeedSequence([seed, epoch, _STREAMS[stream]]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


def rank_stream_seed(seed: int, epoch: int, stream: str, launch: ranks.Launch) -> int:
    """The seed of one random stream; under DDP each rank's is derived from it."""
    base = stream_seed(seed, epoch, stream)
    if not launch.distributed:
        return base
    state = np.random.SeedSequence([base, launch.rank]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


def generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """A torch generator seeded for one (seed, epoch, stream)."""
    return torch.Generator().manual_seed(stream_seed(seed, epoch, stream))


def fork_kwargs(device: torch.device) -> dict[str, Any]:
    """Arguments for torch.random.fork_rng covering the CPU and the training device."""
    if device.type == "cpu":
        return {"devices": []}
    index = device.index if device.index is not None else 0
    return {"devices": [index], "device_type": device.type}


def dataset_labels(dataset: Dataset, name: str) -> torch.Tensor:
    """The labels of a dataset, int64 [N] in 0..6.

    Raises:
        ParameterError: no ``.labels``, empty, or labels outside the classes.
    """
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or len(labels) != len(dataset):
        raise ParameterError(
            f"{name} must expose .labels, an int64 tensor with one label per image "
            "(lib.data.frames.FrameSet does)"
        )
    if len(labels) == 0:
        raise ParameterError(f"{name} is empty; check the data stage's counts")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ParameterError(
            f"{name} has labels outside 0..{NUM_CLASSES - 1} "
            f"(found {int(labels.min())}..{int(labels.max())})"
        )
    return labels


def dataset_image_size(dataset: Dataset, name: str) -> int:
    """The side S of a dataset's square images."""
    size = getattr(dataset, "image_size", None)
    if size is None:
        if len(dataset) == 0:
            raise ParameterError(f"{name} is empty; check the data stage's counts")
        size = int(dataset[0][0].shape[-1])
    return int(size)


def dataset_image_ids(dataset: Dataset) -> list[Any]:
    """The image ids of a dataset (its index's ``image_id``), or the positions."""
    index = getattr(dataset, "index", None)
    if isinstance(index, pd.DataFrame) and "image_id" in index.columns:
        return index["image_id"].astype(str).tolist()
    return list(range(len(dataset)))


def dataset_fingerprint(dataset: Dataset) -> str:
    """Size and a hash of the labels (and image ids when known): which data a run was fit on."""
    digest = hashlib.sha256(dataset_labels(dataset, "dataset").numpy().astype("<i8").tobytes())
    index = getattr(dataset, "index", None)
    if isinstance(index, pd.DataFrame) and "image_id" in index.columns:
        digest.update("\n".join(index["image_id"].astype(str)).encode("utf-8"))
    return f"{len(dataset)} images, sha256 {digest.hexdigest()[:16]}"
