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

With an ``objective`` (:mod:`lib.train.borderline`: the control, borderline or PGD arm) each
step's loss comes from the objective instead of the clean cross-entropy, and the folder also
holds ``steps.csv`` (the passes of every step by kind, :data:`lib.train.borderline.STEP_COLUMNS`)
and, for the borderline arm, ``margins_NN.csv`` (each training image's margin after epoch NN).
A run may start from another run's checkpoint (``start_epoch``, ``start_checkpoint``): its
epochs continue that run's numbering and learning-rate schedule.

Every file is written atomically. Randomness is derived from ``(seed, epoch)`` through explicit
generators (shuffling, sampler, augmentation) and a seeded fork of the global RNG (dropout), so
on the CPU a run is reproducible bit for bit, and a run resumed after epoch k ends with the
same files as one that was never interrupted.

The hyperparameters' defaults and checks are :class:`~lib.train.settings.TrainSettings`; the
values for the paper's scale (Cholec80, 224 px) are given beside each in :func:`fit`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lib import NUM_CLASSES
from lib.checking import check_int
from lib.errors import ParameterError
from lib.model import precision as precision_lib
from lib.model.checkpoints import save_checkpoint
from lib.model.network import check_image_size, resolve_device
from lib.progress import message, progress_bar
from lib.run import layout, ranks
from lib.run.tables import (
    OBJECTIVE_TABLES,
    TABLES,
    TRAIN_TABLES,
    read_margins,
    write_margins,
    write_train_table,
)
from lib.train.batches import (
    augment_batch,
    dataset_fingerprint,
    dataset_image_size,
    dataset_labels,
    fork_kwargs,
    loss_weights,
    rank_stream_seed,
    train_loader,
)
from lib.train.borderline import (
    Batch,
    BorderlineSettings,
    IndexedImages,
    Objective,
    make_objective,
)
from lib.train.evaluation import evaluate
from lib.train.margins import MarginTable
from lib.train.resume import (
    StartPoint,
    finished_epochs,
    objective_record,
    prepare_run_folder,
    read_tables,
    resumable_epoch,
    save_optimizer,
    start_or_resume,
)
from lib.train.settings import TrainSettings


def fit(
    train_set: Dataset,
    test_set: Dataset,
    *,
    out_dir: str | os.PathLike[str],
    epochs: int = TrainSettings.epochs,
    batch_size: int = TrainSettings.batch_size,
    lr: float = TrainSettings.lr,
    lr_decay: float = TrainSettings.lr_decay,
    momentum: float = TrainSettings.momentum,
    weight_decay: float = TrainSettings.weight_decay,
    augment: bool = TrainSettings.augment,
    balance: str = TrainSettings.balance,
    seed: int = TrainSettings.seeds[0],
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike[str] | None = None,
    num_workers: int = TrainSettings.workers,
    precision: str = TrainSettings.precision,
    progress: bool = True,
    objective: BorderlineSettings | None = None,
    start_epoch: int = 0,
    start_checkpoint: str | os.PathLike[str] | None = None,
) -> pd.DataFrame | None:
    """Train AlexNet with SGD; checkpoint and evaluate on the whole test split after every epoch.

    A folder that already holds epochs 1..k of a run with the same parameters is continued from
    epoch k (rows of a later, unfinished epoch are dropped); asking for ``epochs <= k`` only
    returns the table. A folder made with other parameters raises :class:`RunFolderError`.
    On the CPU the result equals an uninterrupted run, file for file.

    The defaults are the training stage's (:class:`~lib.train.settings.TrainSettings`, the
    default build's run: 5 epochs over the synthetic dataset, the learning rate halved after
    every epoch, balanced batches). The paper-scale values for Cholec80 (224 px, 31,477 train
    images, 10 epochs) are given with each argument.

    Args:
        train_set, test_set: datasets of ``(image float32 [3, S, S] in [0, 1], label int 0..6)``
            with ``.labels`` (int64 [N]); ``test_set.index["image_id"]`` names the rows of
            ``predictions.csv`` when present (else the position). S >= ``MIN_IMAGE_SIZE`` (63).
        out_dir: the run folder's ``train/``; created if missing.
        epochs: last epoch to reach (paper: 10). Not part of the run's identity: rerunning
            with more epochs continues the run.
        batch_size: images per SGD step (paper scale: 64).
        lr: SGD learning rate of epoch 1 (paper scale: 0.01, AlexNet's value).
        lr_decay: factor in (0, 1] applied to the learning rate after every epoch: epoch e
            trains at ``lr * lr_decay ** (e - 1)`` (1: constant, as in the paper).
        momentum: SGD momentum in [0, 1) (paper scale: 0.9).
        weight_decay: L2 penalty >= 0 (AlexNet's 5e-4; paper scale: 5e-4).
        augment: random horizontal flip, resized crop (85-100 % of the area) and brightness /
            contrast jitter (+-10 %), all label-preserving (paper scale: True).
        balance: class balancing: "none", "weights" (cross-entropy weighted by inverse class
            frequency in the train split) or "sampler" (batches drawn with replacement, every
            class equally likely).
        seed: non-negative integer; fixes initialisation, order, augmentation and dropout
            (the training stage trains one model per seed of ``TrainSettings.seeds``, each
            into its own folder).
        device: "cpu", "cuda" or "cuda:N"; only the CPU is bit-for-bit reproducible.
        weights_path: optional local ImageNet AlexNet weights (see
            :func:`lib.model.checkpoints.build_model`).
        num_workers: DataLoader worker processes (does not change results).
        precision: the training forwards' arithmetic, "float32", "bfloat16" or "auto"
            (:mod:`lib.model.precision`): bfloat16 runs each training forward under autocast with
            channels-last input, while the weights, the optimizer state and every checkpoint
            stay float32; the evaluation always runs in float32. The resolved precision is
            part of the run's identity (``train_params.json``); the same seed and precision
            give identical checkpoints on the CPU.
        progress: show a progress bar per epoch and evaluation (:mod:`lib.progress`).
        objective: None trains on the clean cross-entropy (the training stage); else the
            settings of a training arm (:class:`~lib.train.borderline.BorderlineSettings`),
            whose objective gives each step's loss and passes. Its ``precision`` is replaced
            by this run's; the class weights of ``balance="weights"`` are given to it. One
            process only.
        start_epoch: 0 starts from a fresh model; k >= 1 from ``start_checkpoint``, the model
            after epoch k of another run: this run trains epochs k + 1 .. ``epochs`` at that
            run's learning rates (``lr * lr_decay ** (epoch - 1)``), its SGD momentum starting
            at zero. A missing checkpoint raises CheckpointError naming ``start_epoch``
            before anything is written.
        start_checkpoint: the start model's safetensors file (with ``start_epoch`` >= 1).

    Under DistributedDataParallel (a process group with K > 1 ranks is initialised, e.g. by
    ``lib.run.distributed``) the same loop runs on every rank: ``batch_size`` stays the global
    batch (divisible by K); each epoch's order is the one a single process draws, and rank r
    takes the images r, r + K, ... of every batch; augmentation and dropout draw from per-rank
    streams. Rank 0 writes every file and evaluates; logged step losses are the mean over ranks.

    Returns:
        ``metrics.csv`` as a DataFrame: one row per epoch 1..epochs (None on ranks other
        than 0).
    """
    check_int(seed, "seed", low=0)
    TrainSettings(  # checks every other value
        epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, momentum=momentum,
        weight_decay=weight_decay, augment=augment, balance=balance, seeds=(seed,),
        precision=precision, weights_path=str(weights_path or ""), workers=num_workers,
    )  # fmt: skip
    launch = ranks.current_launch()
    start = _start_point(start_epoch, start_checkpoint, batch_size, launch,
                         objective=objective, epochs=epochs)
    device = resolve_device(device)
    used = precision_lib.resolve(precision, device)
    out_dir = Path(out_dir)
    params = _run_parameters(train_set, test_set, batch_size=batch_size, lr=lr,
                             lr_decay=lr_decay, momentum=momentum,
                             weight_decay=weight_decay, augment=augment, balance=balance,
                             seed=seed, weights_path=weights_path, precision=used)
    params |= start.record() | objective_record(objective)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks.collective_step(launch, "checking train/",
                          lambda: prepare_run_folder(out_dir, params), main_only=True)
    finished = ranks.broadcast(launch, finished_epochs(out_dir, first=(first := start.first))
                               if launch.is_main else None)
    if finished >= epochs:
        return (read_tables(out_dir, up_to_epoch=epochs, first=first)["metrics"]
                .reset_index(drop=True) if launch.is_main else None)
    done = ranks.broadcast(launch, resumable_epoch(out_dir, finished, first=first)
                           if launch.is_main else None)
    tables = (read_tables(out_dir, up_to_epoch=done, first=first,
                          objective=objective is not None) if launch.is_main else None)
    model, optimizer = start_or_resume(
        out_dir, done=done, seed=seed, weights_path=weights_path, device=device,
        lr=lr, momentum=momentum, weight_decay=weight_decay, start=start,
    )  # fmt: skip
    weights = loss_weights(train_set, balance, device)
    criterion = nn.CrossEntropyLoss(weight=weights)
    if done > start.epoch and progress and launch.is_main:
        message(f"{out_dir}: epochs {first}-{done} found, continuing from epoch {done + 1}")
    epoch_plan = EpochPlan(
        train_set=train_set, seed=seed, batch_size=batch_size, balance=balance, augment=augment,
        num_workers=num_workers, epochs=epochs, progress=progress and launch.is_main,
        precision=used, objective=_step_objective(objective, out_dir, done=done, start=start,
                                                  precision=used, class_weights=weights,
                                                  num_images=len(train_set)),
    )  # fmt: skip
    trained = _parallel(model, device, launch)
    for epoch in range(done + 1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(lr, lr_decay, epoch)
        first_step = (epoch - 1) * math.ceil(len(train_set) / batch_size) + 1
        steps = _train_epoch(trained, optimizer, criterion, epoch_plan, epoch=epoch,
                             device=device, launch=launch, first_step=first_step)
        finish = functools.partial(
            _finish_epoch, model, optimizer, test_set, tables, out_dir,
            _gathered(launch, steps.losses), epoch=epoch, batch_size=batch_size,
            device=device, progress=progress, first_step=first_step,
            objective=epoch_plan.objective, step_rows=steps.rows,
        )  # fmt: skip
        ranks.collective_step(launch, f"saving and evaluating epoch {epoch}", finish,
                              main_only=True)
    return tables["metrics"].reset_index(drop=True) if launch.is_main else None


def _start_point(start_epoch: int, start_checkpoint: str | os.PathLike[str] | None,
                 batch_size: int, launch: ranks.Launch, *,
                 objective: BorderlineSettings | None, epochs: int) -> StartPoint:
    """The run's start point, after the checks that need it or the launch (nothing is
    written before them)."""
    if batch_size % launch.world_size:
        raise ParameterError(
            f"batch_size={batch_size} is not divisible by the {launch.world_size} processes; "
            f"choose a multiple of {launch.world_size} (each process takes batch_size / "
            f"{launch.world_size} images per step)"
        )
    if objective is not None and launch.distributed:
        raise ParameterError(
            "a training objective (the borderline-training arms) runs in one process; run it "
            "without torchrun")
    start = StartPoint(start_epoch, None if start_checkpoint is None else Path(start_checkpoint))
    start.check(epochs=epochs)
    return start


def _step_objective(objective: BorderlineSettings | None, out_dir: Path, *, done: int,
                    start: StartPoint, precision: str, num_images: int,
                    class_weights: torch.Tensor | None) -> Objective | None:
    """The objective that gives each step's loss, its margins restored after epoch ``done``."""
    if objective is None:
        return None
    margins = read_margins(out_dir, done) if done > start.epoch else None
    return make_objective(
        dataclasses.replace(objective, precision=precision), num_images=num_images,
        margins=None if margins is None else MarginTable.from_frame(margins),
        class_weights=class_weights,
    )  # fmt: skip


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
    objective: Objective | None = None  #: None: the clean cross-entropy (``batch_loss``)


@dataclasses.dataclass
class EpochSteps:
    """What one epoch's steps leave: (loss, batch size) per step, and with an objective one
    row of ``steps.csv`` per step."""

    losses: list[tuple[float, int]]
    rows: list[dict[str, Any]]


def batch_loss(model: nn.Module, criterion: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, *, precision: str = "float32") -> torch.Tensor:
    """The training objective of one batch: images float [B, 3, S, S] in [0, 1], labels
    int64 [B] in 0..6 -> a scalar float32 loss (the model's one forward pass in training,
    in the resolved ``precision``: "float32" or "bfloat16" autocast)."""
    return criterion(precision_lib.forward(model, images, precision=precision), labels)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    plan: EpochPlan,
    *,
    epoch: int,
    device: torch.device,
    launch: ranks.Launch,
    first_step: int,
) -> EpochSteps:
    """One pass of SGD over this rank's part of every batch; (loss, batch size) per step."""
    generator = (torch.Generator().manual_seed(rank_stream_seed(plan.seed, epoch, "augment",
                                                                 launch))
                 if plan.augment else None)
    batches = _epoch_loader(plan, epoch, launch)
    bar = progress_bar(len(batches), desc=f"epoch {epoch}/{plan.epochs}", unit="batch",
                       enabled=plan.progress)
    steps = EpochSteps([], [])
    with torch.random.fork_rng(**fork_kwargs(device)), bar:
        torch.manual_seed(rank_stream_seed(plan.seed, epoch, "dropout", launch))
        model.train()
        for step, (images, labels, *position) in enumerate(batches, start=1):
            if generator is not None:
                images = augment_batch(images, generator=generator)
            images, labels = images.to(device), labels.to(device)
            if plan.objective is None:
                loss = batch_loss(model, criterion, images, labels, precision=plan.precision)
            else:
                out = plan.objective(model, Batch(images, labels, position[0], epoch, step))
                loss = out.loss
                steps.rows.append(out.row(epoch=epoch, step=first_step + step - 1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            steps.losses.append((value, len(labels)))
            bar.update(postfix=f"loss={value:.4f}")
    return steps


def _epoch_loader(plan: EpochPlan, epoch: int, launch: ranks.Launch) -> DataLoader:
    """The epoch's batches in the order one process draws them from ``(seed, epoch)``; with K
    ranks, rank r takes the images r, r + K, ... of every batch."""
    labels = dataset_labels(plan.train_set, "train_set")
    # an objective keys its per-image state (the margins) by the image's position
    dataset = plan.train_set if plan.objective is None else IndexedImages(plan.train_set)
    single = train_loader(dataset, labels, epoch=epoch, seed=plan.seed,
                           batch_size=plan.batch_size, balance=plan.balance,
                           num_workers=plan.num_workers if not launch.distributed else 0)
    if not launch.distributed:
        return single
    from torch.utils.data import Subset
    from torch.utils.data.distributed import DistributedSampler

    ordered = Subset(dataset, list(single.sampler))
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
                  device: torch.device, first_step: int, progress: bool,
                  objective: Objective | None = None,
                  step_rows: list[dict[str, Any]] | None = None) -> None:
    """The end of an epoch (rank 0): checkpoint, optimizer, margins, evaluation, tables."""
    save_checkpoint(model, layout.checkpoint_file(out_dir, epoch))
    save_optimizer(optimizer, layout.optimizer_file(out_dir, epoch))
    margins = getattr(objective, "margins", None)  # the borderline arm's margin table
    if margins is not None:
        write_margins(out_dir, epoch, margins.to_frame())
    evaluation = evaluate(model, test_set, batch_size=batch_size, device=device, epoch=epoch,
                          progress=progress)
    evaluation["losses"] = _losses_table(step_losses, epoch=epoch, first_step=first_step)
    evaluation["metrics"]["train_loss"] = _mean_loss(step_losses)
    if objective is not None:
        evaluation["steps"] = pd.DataFrame(step_rows, columns=list(TABLES["steps"].columns))
    _append_tables(out_dir, tables, evaluation)
    # resuming needs only the newest optimizer state, and each is as large as a checkpoint
    layout.optimizer_file(out_dir, epoch - 1).unlink(missing_ok=True)
    if progress:
        message(_epoch_summary(evaluation["metrics"].iloc[0]))


def _run_parameters(train_set: Dataset, test_set: Dataset, **hyper: Any) -> dict[str, Any]:
    """What ``train_params.json`` records: the hyperparameters and the data (checked)."""
    image_size = dataset_image_size(train_set, "train_set")
    if dataset_image_size(test_set, "test_set") != image_size:
        raise ParameterError(
            f"train and test images differ in size ({image_size} vs "
            f"{dataset_image_size(test_set, 'test_set')} px); load both splits from the same run"
        )
    check_image_size(image_size)
    dataset_labels(test_set, "test_set")
    weights_path = hyper.pop("weights_path")
    return {
        **hyper, "image_size": image_size, "num_classes": NUM_CLASSES,
        "weights_path": None if weights_path is None else str(weights_path),
        "train_data": dataset_fingerprint(train_set), "test_data": dataset_fingerprint(test_set),
    }  # fmt: skip


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
    for name in (*OBJECTIVE_TABLES, *TRAIN_TABLES):
        if name not in epoch_tables:
            continue
        columns = list(TABLES[name].columns)
        tables[name] = pd.concat([tables[name], epoch_tables[name][columns]])
        write_train_table(out_dir, name, tables[name])


def _epoch_summary(metrics: pd.Series) -> str:
    return (
        f"epoch {int(metrics.epoch)}: train loss {metrics.train_loss:.4f}, "
        f"test loss {metrics.test_loss:.4f}, accuracy {metrics.accuracy:.4f}, "
        f"macro F1 {metrics.macro_f1:.4f}"
    )


def epoch_lr(lr: float, lr_decay: float, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based): ``lr * lr_decay ** (epoch - 1)``."""
    return lr * lr_decay ** (epoch - 1)

