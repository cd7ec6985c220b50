"""The borderline-training stage: its settings, and the training of its three arms.

:class:`BorderlineStageSettings` holds the only defaults of the stage's parameters (those of
the default build) and their only value checks.

Every arm (:data:`lib.train.borderline.ARMS`: control, borderline, PGD) continues the same
clean checkpoint of the training stage's first model (:func:`clean_model`, the smallest seed;
:func:`start_epoch`) with :func:`lib.train.loop.fit`,
under the clean run's own hyperparameters (batch size, learning-rate schedule, momentum,
weight decay, augmentation, balance, seed, precision), on the same seeded subset of the
training images (:func:`training_subset`); only each step's objective differs. The control
arm trains first, then the borderline arm, then the PGD arm, whose step count is chosen so
that its passes per training image match the borderline arm's measured mean
(:func:`lib.attack.pgd.pgd_steps_for`). Each arm's training folder is
``borderline/arms/<arm>/``; a killed stage continues each arm from its last finished epoch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.analysis import margins as margin_analysis
from lib.attack.pgd import MATCH_TOLERANCE, pgd_steps_for
from lib.attack.schedules import get_schedule
from lib.checking import check_choice, check_int, check_number, check_positive, check_share
from lib.data.frames import FrameSet
from lib.errors import ParameterError, RunFolderError
from lib.run import layout, tables
from lib.train.borderline import TARGET_MODES, BorderlineSettings, mean_passes_per_image
from lib.train.resume import finished_epochs


@dataclass(frozen=True)
class BorderlineStageSettings:
    """The borderline-training stage's parameters (checked when made).

    Attributes:
        start_epoch: the clean checkpoint every arm continues from; 0 for the last trained
            epoch.
        epochs: fine-tuning epochs of every arm, at the clean run's learning rates continued.
        train_images: training images the arms fine-tune on, a seeded draw from the training
            split (the same for every arm); 0 for all of them.
        schedule: the step-size schedule that finds the borderline images during training.
        lr0: that schedule's initial step (pixel units, > 0).
        max_updates: the update cap of each borderline search during training (at least 1).
        target: "nearest" (untargeted: the nearest boundary the search reaches) or "random"
            (a drawn other class).
        share: the share of each batch's correctly classified images that is attacked, in
            (0, 1].
        border_weight: the borderline term's weight in the loss, in [0, 1] (MMA training's
            2/3); the clean term gets the rest.
        margin_cap: only images whose borderline image lies closer than this (Linf, pixel
            units, > 0) enter the borderline term; None for no cap.
        pgd_epsilon: the PGD arm's Linf radius (pixel units, > 0); None for the start
            checkpoint's median Linf margin from the attack stage.
        eval_per_class: test images per tool measured with the independent attacks, the same
            images for every model.
        fmn_steps: the budget of the minimum-norm attack (FMN) per image and norm (at least 2).
        apgd_steps: APGD's iterations per loss at the fixed epsilon (at least 2).
        held_out: other test images whose PGD robust accuracy is checked after every epoch
            (catastrophic overfitting), at least 1.
        accuracy_cost: the clean-accuracy cost (percentage points, 0 or more) that the claim
            "borderline training costs at most this" allows.
        seed: seeds the training subset, the arms' draws, the measured images and the attacks.
    """

    start_epoch: int = 0
    epochs: int = 1
    train_images: int = 512
    schedule: str = "loss-adaptive"
    lr0: float = 0.008
    max_updates: int = 10
    target: str = "nearest"
    share: float = 1.0
    border_weight: float = 2 / 3
    margin_cap: float | None = None
    pgd_epsilon: float | None = None
    eval_per_class: int = 5
    fmn_steps: int = 40
    apgd_steps: int = 10
    held_out: int = 32
    accuracy_cost: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` naming the first bad setting."""
        check_int(self.start_epoch, "start_epoch", low=0)
        check_int(self.epochs, "epochs", low=1)
        check_int(self.train_images, "train_images", low=0)
        get_schedule(self.schedule)
        check_positive(self.lr0, "lr0", unit="pixel units")
        check_int(self.max_updates, "max_updates", low=1)
        check_choice(self.target, TARGET_MODES, "target")
        check_share(self.share, "share", above_zero=True, example="0.5 attacks half of them")
        check_number(self.border_weight, "border_weight", low=0, high=1)
        if self.margin_cap is not None:
            check_positive(self.margin_cap, "margin_cap (None for no cap)", unit="pixel units")
        if self.pgd_epsilon is not None:
            check_positive(self.pgd_epsilon, "pgd_epsilon (None for the attack stage's "
                           "median margin)", unit="pixel units")
        check_int(self.eval_per_class, "eval_per_class", low=1)
        check_int(self.fmn_steps, "fmn_steps", low=2)
        check_int(self.apgd_steps, "apgd_steps", low=2)
        check_int(self.held_out, "held_out", low=1)
        check_number(self.accuracy_cost, "accuracy_cost", low=0, high=100,
                     unit="percentage points")
        check_int(self.seed, "seed", low=0)

    def arm_settings(self, arm: str, *, pgd_epsilon: float | None = None,
                     pgd_steps: int = 1) -> BorderlineSettings:
        """The objective settings of ``arm`` (its precision is the training run's, set by
        :func:`lib.train.loop.fit`)."""
        return BorderlineSettings(
            arm=arm, schedule=self.schedule, lr0=self.lr0, max_updates=self.max_updates,
            target=self.target, share=self.share, border_weight=self.border_weight,
            margin_cap=math.inf if self.margin_cap is None else self.margin_cap,
            pgd_epsilon=pgd_epsilon if arm == "pgd" else None, pgd_steps=pgd_steps,
            seed=self.seed,
        )  # fmt: skip


# --------------------------------------------------------------------------- inputs


def clean_model(run_dir: str | os.PathLike[str]) -> int:
    """The seed of the clean model every arm continues: the training stage's first model."""
    trained = layout.model_dirs(run_dir)
    if not trained:
        raise RunFolderError(
            f"{layout.train_dir(run_dir)} holds no trained model; run the training stage "
            "(02_train) first")
    return next(iter(trained))


def clean_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The clean model's training parameters (its ``train_params.json``)."""
    folder = layout.model_dir(run_dir, clean_model(run_dir))
    params = tables.read_train_params(folder)
    if params is None:
        raise RunFolderError(
            f"{layout.train_params_file(folder)} is missing; run the training stage "
            "(02_train) first")
    return params


def start_epoch(run_dir: str | os.PathLike[str], settings: BorderlineStageSettings) -> int:
    """The clean epoch the arms continue from: ``settings.start_epoch``, or the last trained
    one when it is 0.

    Raises:
        ParameterError: naming ``start_epoch`` when that epoch was not trained.
    """
    model = clean_model(run_dir)
    trained = finished_epochs(layout.model_dir(run_dir, model))
    if trained == 0:
        raise RunFolderError(
            f"{layout.model_dir(run_dir, model)} holds no trained epoch; run the training "
            "stage (02_train) first")
    if settings.start_epoch > trained:
        raise ParameterError(
            f"start_epoch {settings.start_epoch} was not trained: the training stage trained "
            f"epochs 1-{trained} (model of seed {model}); choose one of them, or 0 for the "
            "last")
    return settings.start_epoch or trained


def training_subset(train_set: FrameSet, settings: BorderlineStageSettings) -> FrameSet:
    """The training images every arm fine-tunes on: ``train_images`` drawn without
    replacement (seeded), in the split's order; the whole split when 0 or more."""
    if settings.train_images == 0 or settings.train_images >= len(train_set):
        return train_set
    generator = np.random.default_rng([settings.seed, 1])
    chosen = np.sort(generator.choice(len(train_set), settings.train_images, replace=False))
    return train_set.subset(chosen)


def pgd_radius(run_dir: str | os.PathLike[str], settings: BorderlineStageSettings, *,
               epoch: int) -> float:
    """The PGD arm's Linf radius: ``pgd_epsilon``, or the median over the attack stage's
    images of each image's smallest refined Linf distance over targets and schedules (its
    margin, :func:`lib.analysis.margins.image_margins`) at checkpoint ``epoch``.

    Raises:
        RunFolderError: the attack stage has no results for ``epoch``: name ``pgd_epsilon``,
            or attack that checkpoint first.
    """
    if settings.pgd_epsilon is not None:
        return float(settings.pgd_epsilon)
    results = tables.read_table(run_dir, "results", missing_ok=True)
    if results is not None:
        results = results[results["model"] == clean_model(run_dir)]
    if results is None or not (results["epoch"] == epoch).any():
        attacked = [] if results is None else sorted(set(results["epoch"]))
        raise RunFolderError(
            f"pgd_epsilon is None, which takes the PGD radius from the attack stage's margins "
            f"of the start checkpoint (epoch {epoch}), but the attack stage attacked epochs "
            f"{attacked or 'none'}; give pgd_epsilon (e.g. 0.016), or choose an attacked "
            "start_epoch")
    margins = margin_analysis.image_margins(results[results["epoch"] == epoch])
    linf = margins[(margins["norm"] == "linf")
                   & (margins["method"] == margin_analysis.BEST_OF_SCHEDULES)]
    return float(np.median(linf["margin"].to_numpy(float)))


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class ArmsRun:
    """What the arms' training left: the start, the last epoch, the PGD arm's match."""

    model: int  #: the seed of the clean model every arm continued
    start_epoch: int  #: the clean epoch every arm continued
    last_epoch: int  #: the arms' last epoch (start + epochs)
    pgd_epsilon: float  #: the PGD arm's Linf radius
    pgd_steps: int  #: the PGD arm's step count K
    borderline_passes: float  #: the borderline arm's mean passes per training image
    metrics: dict[str, pd.DataFrame]  #: each arm's metrics.csv (its epochs only)

    @property
    def pgd_mismatch(self) -> float:
        """abs(K + 1 - p) / p: how far the PGD arm's passes per image are from the borderline
        arm's mean p."""
        return abs(self.pgd_steps + 1 - self.borderline_passes) / self.borderline_passes

    @property
    def matched(self) -> bool:
        """Whether the PGD arm's cost matches the borderline arm's within the tolerance."""
        return self.pgd_mismatch <= MATCH_TOLERANCE


def train_arm(run_dir: str | os.PathLike[str], objective: BorderlineSettings, *,
              start: int, last: int, train_set: FrameSet, test_set: FrameSet,
              device: str | torch.device = "cpu", progress: bool = True) -> pd.DataFrame:
    """Fine-tune one arm from the clean checkpoint of epoch ``start`` to epoch ``last``
    (:func:`lib.train.loop.fit` into ``borderline/arms/<arm>/``) under the clean run's
    hyperparameters; the wall time of the epochs trained now goes to ``timings.csv``.

    Returns:
        The arm's ``metrics.csv`` (epochs start + 1 .. last).
    """
    from lib.train.loop import fit

    clean = clean_run(run_dir)
    folder = layout.arm_dir(run_dir, objective.arm)
    before = finished_epochs(folder, first=start + 1)
    began = time.perf_counter()
    metrics = fit(
        train_set, test_set, out_dir=folder, epochs=last, batch_size=clean["batch_size"],
        lr=clean["lr"], lr_decay=clean["lr_decay"], momentum=clean["momentum"],
        weight_decay=clean["weight_decay"], augment=clean["augment"],
        balance=clean["balance"], seed=clean["seed"], device=device,
        precision=clean["precision"], progress=progress, objective=objective,
        start_epoch=start,
        start_checkpoint=layout.checkpoint_path(run_dir, start, model=clean_model(run_dir)),
    )  # fmt: skip
    if last > before:
        _record_time(run_dir, objective.arm, "training", epochs=last - before,
                     seconds=time.perf_counter() - began)
    return metrics


def train_arms(run_dir: str | os.PathLike[str], settings: BorderlineStageSettings, *,
               train_set: FrameSet, test_set: FrameSet, device: str | torch.device = "cpu",
               progress: bool = True) -> ArmsRun:
    """Train the control, borderline and PGD arms from the same clean checkpoint.

    Args:
        train_set: the training split (the arms fine-tune on :func:`training_subset` of it).
        test_set: the test split (every epoch of every arm is evaluated on all of it).
    """
    start = start_epoch(run_dir, settings)
    last = start + settings.epochs
    epsilon = pgd_radius(run_dir, settings, epoch=start)
    subset = training_subset(train_set, settings)
    common = dict(start=start, last=last, train_set=subset, test_set=test_set, device=device,
                  progress=progress)
    metrics = {arm: train_arm(run_dir, settings.arm_settings(arm), **common)
               for arm in ("control", "borderline")}
    steps = tables.read_train_table(layout.arm_dir(run_dir, "borderline"), "steps")
    passes = mean_passes_per_image(steps)
    pgd_steps = pgd_steps_for(passes, tolerance=math.inf)  # the mismatch is reported
    metrics["pgd"] = train_arm(run_dir, settings.arm_settings(
        "pgd", pgd_epsilon=epsilon, pgd_steps=pgd_steps), **common)
    return ArmsRun(clean_model(run_dir), start, last, epsilon, pgd_steps, passes, metrics)


def _record_time(run_dir: str | os.PathLike[str], model: str, phase: str, *, epochs: int,
                 seconds: float) -> None:
    """Replace the row of (model, phase) in ``timings.csv`` (wall times differ from run to
    run: they are kept apart from the results)."""
    found = tables.read_table(run_dir, "arm_timings", missing_ok=True)
    row = pd.DataFrame([{"model": model, "phase": phase, "epochs": epochs,
                         "seconds": seconds}])
    if found is not None:
        found = found[(found["model"] != model) | (found["phase"] != phase)]
        row = pd.concat([found, row], ignore_index=True)
    tables.write_table(run_dir, "arm_timings", row)


def record_time(run_dir: str | os.PathLike[str], model: str, phase: str,
                seconds: float) -> None:
    """Record the wall time of a measurement phase of ``model`` in ``timings.csv``."""
    _record_time(run_dir, model, phase, epochs=0, seconds=seconds)
