"""Train the tool classifier; after every epoch a checkpoint and a whole-test-split evaluation.

:func:`fit` is the training stage's one call. It writes into ``out_dir`` (the run folder's
``train/``):

- ``epoch_NN.safetensors``, the model after every epoch (about 230 MB each: AlexNet's fully
  connected layers do not shrink with the image size),
- ``optimizer_NN.safetensors``, the SGD momentum buffers of the newest epoch only (the state a
  resumed run needs; earlier ones are removed),
- ``metrics.csv`` (epoch, accuracy, macro_f1, train_loss, test_loss): ``train_loss`` is the
  epoch's mean training objective (class-weighted when ``balance="weights"``, on augmented
  images, dropout on); ``test_loss`` the plain mean cross-entropy on the test split (eval mode),
- ``per_class.csv`` (epoch, tool, label, precision, recall, f1, support),
- ``confusion.csv`` (epoch, true, predicted, count), all 7 x 7 cells per epoch,
- ``predictions.csv`` (epoch, image_id, label, predicted), the whole test split per epoch,
- ``losses.csv`` (epoch, step, loss), the training loss of every SGD step,
- ``train_params.json``, the parameters that define the run (for resuming safely).

Every file is written atomically. Randomness is derived from ``(seed, epoch)`` through explicit
generators (shuffling, sampler, augmentation) and a seeded fork of the global RNG (dropout), so
on the CPU a run is reproducible bit for bit, and a run resumed after epoch k ends with the
same files as one that was never interrupted.

Defaults are the default profile's (synthetic data, 64 px, on 2 CPU cores); the values for the
paper's scale (Cholec80, 224 px) are given beside each in :func:`fit`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler
from torchvision.transforms.v2 import functional as TF

from lib import NUM_CLASSES, TOOLS, ranks, stages
from lib import precision as precision_module
from lib.errors import ParameterError, RunFolderError
from lib.io import atomic_path, read_json, write_csv, write_json
from lib.model import (
    ToolClassifier,
    build_model,
    check_image_size,
    load_checkpoint,
    read_safetensors,
    resolve_device,
    save_checkpoint,
)
from lib.progress import message, progress_bar, tracked
from lib.stages import finished_epochs

BALANCE_MODES: tuple[str, ...] = ("none", "weights", "sampler")

#: The tables fit writes, with their columns; metrics.csv is written last in every epoch, so an
#: epoch counts as finished once it has a metrics row.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "losses": ("epoch", "step", "loss"),
    "per_class": ("epoch", "tool", "label", "precision", "recall", "f1", "support"),
    "confusion": ("epoch", "true", "predicted", "count"),
    "predictions": ("epoch", "image_id", "label", "predicted"),
    "metrics": ("epoch", "accuracy", "macro_f1", "train_loss", "test_loss"),
}

# Independent random streams per epoch; the numbers only need to differ.
_STREAMS = {"init": 0, "order": 1, "augment": 2, "dropout": 3, "loader": 4}

# Augmentation strengths: small enough that a tool entering from the border stays in view.
_CROP_AREA = (0.85, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_JITTER = 0.1  # brightness and contrast factors are drawn from [1 - _JITTER, 1 + _JITTER]


def fit(
    train_set: Dataset,
    test_set: Dataset,
    *,
    out_dir: str | os.PathLike[str],
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    lr_decay: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    balance: str = "weights",
    seed: int = 0,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike[str] | None = None,
    num_workers: int = 0,
    precision: str = "float32",
    progress: bool = True,
) -> pd.DataFrame | None:
    """Train AlexNet with SGD; checkpoint and evaluate on the whole test split after every epoch.

    A folder that already holds epochs 1..k of a run with the same parameters is continued from
    epoch k (rows of a later, unfinished epoch are dropped); asking for ``epochs <= k`` only
    returns the table. A folder made with other parameters raises :class:`RunFolderError`.
    On the CPU the result equals an uninterrupted run, file for file.

    Defaults suit the default profile (about 650 synthetic train images at 64 px, 10 epochs on
    2 CPU cores: 110 SGD steps). The paper-scale values for Cholec80 (224 px, 31,477 train
    images, 10 epochs) are given with each argument.

    Args:
        train_set, test_set: datasets of ``(image float32 [3, S, S] in [0, 1], label int 0..6)``
            with ``.labels`` (int64 [N]); ``test_set.index["image_id"]`` names the rows of
            ``predictions.csv`` when present (else the position). S >= ``MIN_IMAGE_SIZE`` (63).
        out_dir: the run folder's ``train/``; created if missing.
        epochs: last epoch to reach (paper: 10). Not part of the run's identity: rerunning
            with more epochs continues the run.
        batch_size: images per SGD step (default 64: the fastest per image on 2 CPU cores;
            paper scale: 64).
        lr: SGD learning rate of epoch 1 (default 0.01; paper scale: 0.01, AlexNet's value).
        lr_decay: factor in (0, 1] applied to the learning rate after every epoch: epoch e
            trains at ``lr * lr_decay ** (e - 1)`` (default 1: constant, as in the paper).
        momentum: SGD momentum in [0, 1) (default 0.9; paper scale: 0.9).
        weight_decay: L2 penalty >= 0 (default 5e-4, AlexNet's; paper scale: 5e-4).
        augment: random horizontal flip, resized crop (85-100 % of the area) and brightness /
            contrast jitter (+-10 %), all label-preserving (default True; paper scale: True).
        balance: class balancing: "none", "weights" (cross-entropy weighted by inverse class
            frequency in the train split) or "sampler" (batches drawn with replacement, every
            class equally likely) (default "weights"; paper scale: "weights").
        seed: non-negative integer; fixes initialisation, order, augmentation and dropout.
        device: "cpu", "cuda" or "cuda:N"; only the CPU is bit-for-bit reproducible.
        weights_path: optional local ImageNet AlexNet weights (see ``lib.model.build_model``).
        num_workers: DataLoader worker processes (does not change results).
        precision: the training forwards' arithmetic, "float32", "bfloat16" or "auto"
            (:mod:`lib.precision`): bfloat16 runs each training forward under autocast with
            channels-last input, while the weights, the optimizer state and every checkpoint
            stay float32; the evaluation always runs in float32. The resolved precision is
            part of the run's identity (``train_params.json``); the same seed and precision
            give identical checkpoints on the CPU.
        progress: show a progress bar per epoch and evaluation (:mod:`lib.progress`).

    Under DistributedDataParallel (a process group with K > 1 ranks is initialised, e.g. by
    ``lib.distributed``) the same loop runs on every rank: ``batch_size`` stays the global
    batch (divisible by K); each epoch's order is the one a single process draws, and rank r
    takes the images r, r + K, ... of every batch; augmentation and dropout draw from per-rank
    streams. Rank 0 writes every file and evaluates; logged step losses are the mean over ranks.

    Returns:
        ``metrics.csv`` as a DataFrame: one row per epoch 1..epochs (None on ranks other
        than 0).
    """
    check_hyperparameters(
        epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, momentum=momentum,
        weight_decay=weight_decay, augment=augment, balance=balance, seed=seed,
        num_workers=num_workers,
    )  # fmt: skip
    launch = ranks.current_launch()
    if batch_size % launch.world_size:
        raise ParameterError(
            f"batch_size={batch_size} is not divisible by the {launch.world_size} processes; "
            f"choose a multiple of {launch.world_size} (each process takes batch_size / "
            f"{launch.world_size} images per step)"
        )
    device = resolve_device(device)
    used = precision_module.resolve(precision, device)
    out_dir = Path(out_dir)
    params = _run_parameters(train_set, test_set, batch_size=batch_size, lr=lr,
                             lr_decay=lr_decay, momentum=momentum,
                             weight_decay=weight_decay, augment=augment, balance=balance,
                             seed=seed, weights_path=weights_path, precision=used)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks.collective_step(launch, "checking train/",
                          lambda: _prepare_run_folder(out_dir, params), main_only=True)
    finished = ranks.broadcast(launch, finished_epochs(out_dir) if launch.is_main else None)
    if finished >= epochs:
        return (_read_tables(out_dir, up_to_epoch=epochs)["metrics"].reset_index(drop=True)
                if launch.is_main else None)
    done = ranks.broadcast(launch, _resumable_epoch(out_dir, finished)
                           if launch.is_main else None)
    tables = _read_tables(out_dir, up_to_epoch=done) if launch.is_main else None
    model, optimizer = _start_or_resume(
        out_dir, done=done, seed=seed, weights_path=weights_path, device=device,
        lr=lr, momentum=momentum, weight_decay=weight_decay,
    )  # fmt: skip
    criterion = nn.CrossEntropyLoss(weight=class_weights(_labels(train_set, "train_set")).to(device)
                                    if balance == "weights" else None)
    if done and progress and launch.is_main:
        message(f"{out_dir}: epochs 1-{done} found, continuing from epoch {done + 1}")
    epoch_plan = EpochPlan(train_set=train_set, seed=seed, batch_size=batch_size,
                           balance=balance, augment=augment, num_workers=num_workers,
                           epochs=epochs, progress=progress and launch.is_main,
                           precision=used)
    trained = _parallel(model, device, launch)
    for epoch in range(done + 1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(lr, lr_decay, epoch)
        step_losses = _gathered(launch, _train_epoch(
            trained, optimizer, criterion, epoch_plan, epoch=epoch, device=device, launch=launch))
        finish = functools.partial(
            _finish_epoch, model, optimizer, test_set, tables, out_dir, step_losses, epoch=epoch,
            batch_size=batch_size, device=device, progress=progress,
            first_step=(epoch - 1) * math.ceil(len(train_set) / batch_size) + 1,
        )  # fmt: skip
        ranks.collective_step(launch, f"saving and evaluating epoch {epoch}", finish,
                              main_only=True)
    return tables["metrics"].reset_index(drop=True) if launch.is_main else None


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: str | torch.device,
    epoch: int,
    progress: bool = False,
) -> dict[str, pd.DataFrame]:
    """Classify the whole ``dataset``; the tables of :func:`classification_tables` plus
    ``predictions`` (epoch, image_id, label, predicted) and ``test_loss`` (mean unweighted
    cross-entropy) as a column of ``metrics``."""
    labels = _labels(dataset, "dataset")
    logits = predict_logits(model, dataset, batch_size=batch_size, device=device, progress=progress)
    predicted = logits.argmax(dim=1)
    tables = classification_tables(labels.numpy(), predicted.numpy(), epoch=epoch)
    tables["metrics"]["test_loss"] = F.cross_entropy(logits.double(), labels).item()
    tables["predictions"] = pd.DataFrame(
        {
            "epoch": epoch,
            "image_id": _image_ids(dataset),
            "label": labels.numpy(),
            "predicted": predicted.numpy(),
        }
    )
    return tables


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Logits float32 [N, num_classes] (on the CPU) for every image of ``dataset``, in order.

    The model runs in eval mode (dropout off); its previous mode is restored afterwards.
    """
    device = resolve_device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    try:
        batches = [
            model(images.to(device)).float().cpu()
            for images, _ in tracked(loader, total=len(loader), desc="evaluate", unit="batch",
                                     enabled=progress, leave=False)
        ]
    finally:
        model.train(was_training)
    return torch.cat(batches)


def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Predicted labels int64 [N] for every image of ``dataset`` (eval mode, in order)."""
    logits = predict_logits(model, dataset, batch_size=batch_size, device=device, progress=progress)
    return logits.argmax(dim=1)


def classification_tables(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, *, epoch: int
) -> dict[str, pd.DataFrame]:
    """Tidy scikit-learn metrics of one epoch's predictions over the 7 tool classes.

    Returns:
        ``metrics``: one row (epoch, accuracy, macro_f1); macro F1 is the unweighted mean over
        all 7 classes (a class never present nor predicted counts as F1 = 0).
        ``per_class``: 7 rows (epoch, tool, label, precision, recall, f1, support).
        ``confusion``: 49 rows (epoch, true, predicted, count), every cell, zeros included.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = list(range(NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    metrics = pd.DataFrame(
        {
            "epoch": [epoch],
            "accuracy": [float(accuracy_score(y_true, y_pred))],
            "macro_f1": [float(np.mean(f1))],
        }
    )
    per_class = pd.DataFrame(
        {
            "epoch": epoch,
            "tool": list(TOOLS),
            "label": labels,
            "precision": precision.astype(float),
            "recall": recall.astype(float),
            "f1": f1.astype(float),
            "support": support.astype(np.int64),
        }
    )
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    true, predicted = np.meshgrid(labels, labels, indexing="ij")
    confusion = pd.DataFrame(
        {
            "epoch": epoch,
            "true": true.ravel(),
            "predicted": predicted.ravel(),
            "count": matrix.ravel().astype(np.int64),
        }
    )
    return {"metrics": metrics, "per_class": per_class, "confusion": confusion}


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


# ---------------------------------------------------------------------------- internals


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """What every epoch of one :func:`fit` call draws its batches from."""

    train_set: Dataset
    seed: int
    batch_size: int
    balance: str
    augment: bool
    num_workers: int
    epochs: int
    progress: bool
    precision: str = "float32"  #: resolved: "float32" or "bfloat16"


def batch_loss(model: nn.Module, criterion: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, *, precision: str = "float32") -> torch.Tensor:
    """The training objective of one batch: images float [B, 3, S, S] in [0, 1], labels
    int64 [B] in 0..6 -> a scalar float32 loss (the model's one forward pass in training,
    in the resolved ``precision``: "float32" or "bfloat16" autocast)."""
    return criterion(precision_module.forward(model, images, precision=precision), labels)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    plan: EpochPlan,
    *,
    epoch: int,
    device: torch.device,
    launch: ranks.Launch,
) -> list[tuple[float, int]]:
    """One pass of SGD over this rank's part of every batch; (loss, batch size) per step."""
    generator = (torch.Generator().manual_seed(_rank_stream_seed(plan.seed, epoch, "augment",
                                                                 launch))
                 if plan.augment else None)
    batches = _epoch_loader(plan, epoch, launch)
    bar = progress_bar(len(batches), desc=f"epoch {epoch}/{plan.epochs}", unit="batch",
                       enabled=plan.progress)
    step_losses: list[tuple[float, int]] = []
    with torch.random.fork_rng(**_fork_kwargs(device)), bar:
        torch.manual_seed(_rank_stream_seed(plan.seed, epoch, "dropout", launch))
        model.train()
        for images, labels in batches:
            if generator is not None:
                images = augment_batch(images, generator=generator)
            loss = batch_loss(model, criterion, images.to(device), labels.to(device),
                              precision=plan.precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            step_losses.append((value, len(labels)))
            bar.update(postfix=f"loss={value:.4f}")
    return step_losses


def _epoch_loader(plan: EpochPlan, epoch: int, launch: ranks.Launch) -> DataLoader:
    """The epoch's batches in the order one process draws them from ``(seed, epoch)``; with K
    ranks, rank r takes the images r, r + K, ... of every batch."""
    labels = _labels(plan.train_set, "train_set")
    single = _train_loader(plan.train_set, labels, epoch=epoch, seed=plan.seed,
                           batch_size=plan.batch_size, balance=plan.balance,
                           num_workers=plan.num_workers if not launch.distributed else 0)
    if not launch.distributed:
        return single
    from torch.utils.data import Subset
    from torch.utils.data.distributed import DistributedSampler

    ordered = Subset(plan.train_set, list(single.sampler))
    sampler = DistributedSampler(ordered, num_replicas=launch.world_size, rank=launch.rank,
                                 shuffle=False)
    return DataLoader(ordered, batch_size=plan.batch_size // launch.world_size, sampler=sampler)


def _parallel(model: nn.Module, device: torch.device, launch: ranks.Launch) -> nn.Module:
    """``model`` itself in one process; wrapped in DistributedDataParallel with several."""
    if not launch.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def _gathered(launch: ranks.Launch,
              step_losses: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Per step, the loss averaged over ranks (weighted by their batch sizes), and the size."""
    if not launch.distributed:
        return step_losses
    per_rank = [None] * launch.world_size
    torch.distributed.all_gather_object(per_rank, step_losses)
    merged = []
    for step in range(min(len(losses) for losses in per_rank)):
        pairs = [losses[step] for losses in per_rank]
        size = sum(n for _, n in pairs)
        merged.append((sum(loss * n for loss, n in pairs) / size, size))
    return merged


def _finish_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, test_set: Dataset,
                  tables: dict[str, pd.DataFrame | None], out_dir: Path,
                  step_losses: list[tuple[float, int]], *, epoch: int, batch_size: int,
                  device: torch.device, first_step: int, progress: bool) -> None:
    """The end of an epoch (rank 0): checkpoint, optimizer, evaluation, tables."""
    save_checkpoint(model, stages.checkpoint_file(out_dir, epoch))
    _save_optimizer(optimizer, stages.optimizer_file(out_dir, epoch))
    evaluation = evaluate(model, test_set, batch_size=batch_size, device=device, epoch=epoch,
                          progress=progress)
    evaluation["losses"] = _losses_table(step_losses, epoch=epoch, first_step=first_step)
    evaluation["metrics"]["train_loss"] = _mean_loss(step_losses)
    _append_tables(out_dir, tables, evaluation)
    # resuming needs only the newest optimizer state, and each is as large as a checkpoint
    stages.optimizer_file(out_dir, epoch - 1).unlink(missing_ok=True)
    if progress:
        message(_epoch_summary(evaluation["metrics"].iloc[0]))


def _run_parameters(train_set: Dataset, test_set: Dataset, **hyper: Any) -> dict[str, Any]:
    """What ``train_params.json`` records: the hyperparameters and the data (checked)."""
    image_size = _image_size(train_set, "train_set")
    if _image_size(test_set, "test_set") != image_size:
        raise ParameterError(
            f"train and test images differ in size ({image_size} vs "
            f"{_image_size(test_set, 'test_set')} px); load both splits from the same run"
        )
    check_image_size(image_size)
    _labels(test_set, "test_set")
    weights_path = hyper.pop("weights_path")
    return {
        **hyper, "image_size": image_size, "num_classes": NUM_CLASSES,
        "weights_path": None if weights_path is None else str(weights_path),
        "train_data": _fingerprint(train_set), "test_data": _fingerprint(test_set),
    }  # fmt: skip


def _rank_stream_seed(seed: int, epoch: int, stream: str, launch: ranks.Launch) -> int:
    """The seed of one random stream; under DDP each rank's is derived from it."""
    base = _stream_seed(seed, epoch, stream)
    if not launch.distributed:
        return base
    state = np.random.SeedSequence([base, launch.rank]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


def _losses_table(
    step_losses: list[tuple[float, int]], *, epoch: int, first_step: int
) -> pd.DataFrame:
    """losses.csv rows of one epoch; steps are numbered from the start of training."""
    return pd.DataFrame(
        {
            "epoch": epoch,
            "step": np.arange(first_step, first_step + len(step_losses)),
            "loss": [loss for loss, _ in step_losses],
        }
    )


def _mean_loss(step_losses: list[tuple[float, int]]) -> float:
    """The epoch's training loss: the step losses weighted by batch size."""
    return sum(loss * size for loss, size in step_losses) / sum(size for _, size in step_losses)


def _append_tables(
    out_dir: Path, tables: dict[str, pd.DataFrame | None], epoch_tables: dict[str, pd.DataFrame]
) -> None:
    """Add one epoch's rows to every table and rewrite the files, metrics.csv last."""
    for name, columns in TABLE_COLUMNS.items():
        tables[name] = pd.concat([tables[name], epoch_tables[name][list(columns)]])
        write_csv(stages.train_table(out_dir, name), tables[name])


def _epoch_summary(metrics: pd.Series) -> str:
    return (
        f"epoch {int(metrics.epoch)}: train loss {metrics.train_loss:.4f}, "
        f"test loss {metrics.test_loss:.4f}, accuracy {metrics.accuracy:.4f}, "
        f"macro F1 {metrics.macro_f1:.4f}"
    )


def _start_or_resume(
    out_dir: Path,
    *,
    done: int,
    seed: int,
    weights_path: str | os.PathLike[str] | None,
    device: torch.device,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> tuple[ToolClassifier, torch.optim.SGD]:
    if done:
        model = load_checkpoint(stages.checkpoint_file(out_dir, done), map_location=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stream_seed(seed, 0, "init"))
            model = build_model(num_classes=NUM_CLASSES, weights_path=weights_path)
        model = model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    if done:
        _load_optimizer(optimizer, stages.optimizer_file(out_dir, done))
    return model, optimizer


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The SGD momentum buffers as safetensors (hyperparameters live in train_params.json)."""
    tensors = {
        f"momentum_buffer.{index}": state["momentum_buffer"].detach().cpu().contiguous()
        for index, state in optimizer.state_dict()["state"].items()
        if state.get("momentum_buffer") is not None
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp)


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = read_safetensors(path)
    state = optimizer.state_dict()
    count = len(state["param_groups"][0]["params"])
    buffers = {}
    for key, tensor in tensors.items():
        index = int(key.rsplit(".", 1)[1])
        if not key.startswith("momentum_buffer.") or index >= count:
            raise RunFolderError(
                f"{path}: unexpected tensor {key!r} in the optimizer state; remove the run "
                "folder's train/ or use a new run folder"
            )
        buffers[index] = {"momentum_buffer": tensor}
    state["state"] = buffers
    optimizer.load_state_dict(state)


def _prepare_run_folder(out_dir: Path, params: dict[str, Any]) -> None:
    """Record the run's parameters, or check them against those already recorded."""
    params = json.loads(json.dumps(params))  # as read back from JSON: tuples become lists
    params_path = stages.train_params_file(out_dir)
    if params_path.exists():
        recorded = read_json(params_path)
        differing = sorted(
            key for key in set(recorded) | set(params) if recorded.get(key) != params.get(key)
        )
        if differing:
            listing = "; ".join(
                f"{key}: folder {recorded.get(key)!r}, now {params.get(key)!r}" for key in differing
            )
            raise RunFolderError(
                f"{out_dir} holds a training run made with other parameters ({listing}). "
                "Use a new run folder, or remove this one to start again"
            )
    elif stages.has_checkpoints(out_dir):
        raise RunFolderError(
            f"{out_dir} holds checkpoints but no train_params.json, so it cannot be continued "
            "safely; use a new run folder or remove this one"
        )
    else:
        write_json(params_path, params)


def _resumable_epoch(out_dir: Path, finished: int) -> int:
    """The last finished epoch whose optimizer state is kept (0: start from scratch)."""
    for epoch in range(finished, 0, -1):
        if stages.optimizer_file(out_dir, epoch).exists():
            return epoch
    return 0


def _read_tables(out_dir: Path, *, up_to_epoch: int) -> dict[str, pd.DataFrame | None]:
    """The run's tables restricted to epochs 1..up_to_epoch (None when there are none)."""
    tables = {}
    for name, columns in TABLE_COLUMNS.items():
        path = stages.train_table(out_dir, name)
        if up_to_epoch and path.exists():
            # pandas >= 3 parses floats exactly (round trip), so a resumed run's files equal an
            # uninterrupted run's byte for byte (tests/test_training.py checks this)
            table = pd.read_csv(path, dtype={"image_id": str})
            tables[name] = table[table["epoch"] <= up_to_epoch][list(columns)]
        else:
            tables[name] = None
    return tables


def _train_loader(
    train_set: Dataset,
    labels: torch.Tensor,
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    balance: str,
    num_workers: int,
) -> DataLoader:
    order = _generator(seed, epoch, "order")
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
        generator=_generator(seed, epoch, "loader"),  # worker seeds; never the global RNG
    )


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency class weights for the loss: float32 [7], ``N / (7 n_c)``.

    ``labels``: int64 [N] in 0..6. A class with ``n_c`` images gets ``N / (7 n_c)`` (1 for
    every class when they are balanced); a class absent from ``labels`` gets 0.
    """
    counts = torch.bincount(labels, minlength=NUM_CLASSES).float()
    weights = len(labels) / (NUM_CLASSES * counts)
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def _stream_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one (seed, epoch, stream), independent across all three."""
    state = np.random.SeedSequence([seed, epoch, _STREAMS[stream]]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


def _generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(_stream_seed(seed, epoch, stream))


def _fork_kwargs(device: torch.device) -> dict[str, Any]:
    """Arguments for torch.random.fork_rng covering the CPU and the training device."""
    if device.type == "cpu":
        return {"devices": []}
    index = device.index if device.index is not None else 0
    return {"devices": [index], "device_type": device.type}


def _labels(dataset: Dataset, name: str) -> torch.Tensor:
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or len(labels) != len(dataset):
        raise ParameterError(
            f"{name} must expose .labels, an int64 tensor with one label per image "
            "(lib.datasets.FrameSet does)"
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


def _image_size(dataset: Dataset, name: str) -> int:
    size = getattr(dataset, "image_size", None)
    if size is None:
        if len(dataset) == 0:
            raise ParameterError(f"{name} is empty; check the data stage's counts")
        size = int(dataset[0][0].shape[-1])
    return int(size)


def _image_ids(dataset: Dataset) -> list[Any]:
    index = getattr(dataset, "index", None)
    if isinstance(index, pd.DataFrame) and "image_id" in index.columns:
        return index["image_id"].astype(str).tolist()
    return list(range(len(dataset)))


def _fingerprint(dataset: Dataset) -> str:
    """Size and a hash of the labels (and image ids when known): which data a run was fit on."""
    digest = hashlib.sha256(_labels(dataset, "dataset").numpy().astype("<i8").tobytes())
    index = getattr(dataset, "index", None)
    if isinstance(index, pd.DataFrame) and "image_id" in index.columns:
        digest.update("\n".join(index["image_id"].astype(str)).encode("utf-8"))
    return f"{len(dataset)} images, sha256 {digest.hexdigest()[:16]}"


def epoch_lr(lr: float, lr_decay: float, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based): ``lr * lr_decay ** (epoch - 1)``."""
    return lr * lr_decay ** (epoch - 1)


def check_hyperparameters(
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    lr_decay: float = 1.0,
    momentum: float,
    weight_decay: float,
    augment: bool,
    balance: str,
    seed: int,
    num_workers: int,
) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    checks = [
        ("epochs", epochs, is_int(epochs) and epochs >= 1, "an integer >= 1"),
        ("batch_size", batch_size, is_int(batch_size) and batch_size >= 1, "an integer >= 1"),
        ("lr", lr, is_number(lr) and lr > 0, "a number > 0"),
        ("lr_decay", lr_decay, is_number(lr_decay) and 0 < lr_decay <= 1, "a number in (0, 1]"),
        ("momentum", momentum, is_number(momentum) and 0 <= momentum < 1, "a number in [0, 1)"),
        ("weight_decay", weight_decay, is_number(weight_decay) and weight_decay >= 0,
         "a number >= 0"),
        ("augment", augment, isinstance(augment, bool), "True or False"),
        ("balance", balance, balance in BALANCE_MODES, f"one of {BALANCE_MODES}"),
        ("seed", seed, is_int(seed) and seed >= 0, "an integer >= 0"),
        ("num_workers", num_workers, is_int(num_workers) and num_workers >= 0, "an integer >= 0"),
    ]  # fmt: skip
    for name, value, ok, expected in checks:
        if not ok:
            raise ParameterError(f"{name} must be {expected}, got {value!r}")
