"""Training on borderline images: the three arms as batch objectives with one interface.

The borderline-training stage continues a clean checkpoint in three arms that differ only in
what each SGD step trains on. Each arm is an *objective*: called with the model and one batch
it returns the step's loss (a differentiable scalar, computed in the caller's train mode) and
the exact count of image passes the step cost. The one training loop calls it where it would
compute the clean loss and does the rest (zero_grad, backward, step) itself::

    objective = make_objective(settings, num_images=len(train_set), class_weights=weights)
    for step, (images, labels, index) in enumerate(batches, start=1):
        out = objective(model, Batch(images, labels, index, epoch=epoch, step=step))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

The arms:

- ``"control"``: the clean cross-entropy, exactly the loop's own clean objective (same
  forward, same class weights), so control continues the clean run as it would have gone on.
- ``"borderline"``: the batch's correctly classified images (all, or a drawn ``share``) are
  attacked by the engine (:func:`lib.attack.api.attack_rows`) with a step-size ``schedule``
  (default the paper's loss-adaptive), ``lr0`` and at most ``max_updates`` updates, toward the
  nearest boundary (untargeted, ``target="nearest"``) or toward a drawn other class
  (``target="random"``), and refined to the boundary (``refine_tolerance``). Each found image
  is labelled with its TRUE class. With ``w = border_weight``, B the batch and S the images
  whose borderline image was found with a margin below ``margin_cap``::

      loss = (1 - w) CE(clean batch) + w * sum_{i in S} c_i CE(x'_i, y_i) / sum_{i in B} c_i

  (c_i the class weight of image i, 1 without weights): both terms are averages over the
  whole batch, so the borderline term weighs less when few images qualify (as in MMA
  training, Ding et al. 2020, whose defaults 1/3 clean and 2/3 boundary are ours).
  The Linf distance of each training image's refined borderline image is its *margin*, kept in
  a :class:`MarginTable` across epochs (0 for an image the model misclassifies, ``inf`` when
  no flip was found within ``max_updates``). With the loss-adaptive schedule every step is at
  most ``lr0``, so no margin found exceeds ``lr0 * max_updates``.
- ``"pgd"`` (Madry et al. 2018; :func:`lib.attack.pgd.pgd_images`): Linf PGD with a uniform
  random start in the ``pgd_epsilon`` ball, ``pgd_steps`` signed steps of ``pgd_step_size``
  (default ``2.5 eps / K``), projected to the ball and to [0, 1], maximising the true class's
  cross-entropy; the loss is the cross-entropy of the PGD images with their true labels.
  :func:`lib.attack.pgd.pgd_steps_for` picks K so that its passes per step match the
  borderline arm's measured mean.

Attacks run in eval mode with frozen weights (:func:`lib.model.network.frozen`), restored
before the training forward.

Counting passes (per image, per step; :class:`Passes`): a *training pass* is one image
through a forward and backward with weight gradients; an *attack pass* one image through a
forward and backward to the input with frozen weights (the engine's ``iterations + 1`` per
row, a PGD step per image); a *forward* one image through a forward alone (the eval-mode
check of which images are correct, the engine's one-image class-count probe, its refinement
bisections). :attr:`Passes.total` weighs a forward as 1/3 of a pass (a backward costs about
two forwards). In ``precision="bfloat16"`` the engine's float32 confirmation forwards are
not reported by the engine and not counted.

Randomness (share, random targets, PGD start) comes from CPU generators seeded from
``(seed, epoch, step, stream)``: a resumed run repeats a step exactly on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lib.attack import api as engine
from lib.attack.pgd import pgd_images
from lib.checking import is_int, is_number
from lib.errors import ParameterError
from lib.model import precision as precision_lib
from lib.model.network import frozen
from lib.train.margins import MarginTable

#: The arms: clean fine-tuning, training on borderline images, PGD adversarial training.
ARMS: tuple[str, ...] = ("control", "borderline", "pgd")
#: "nearest": untargeted, toward whichever boundary the attack reaches first; "random": toward
#: a class drawn uniformly from the other classes.
TARGET_MODES: tuple[str, ...] = ("nearest", "random")
#: Weight of a forward-only image in :attr:`Passes.total` (a backward costs about two forwards).
FORWARD_WEIGHT = 1 / 3
#: Columns of the per-step record (:meth:`StepLoss.row`).
STEP_COLUMNS: tuple[str, ...] = (
    "epoch", "step", "images", "loss", "train_passes", "attack_passes", "forwards", "passes",
    "correct", "attacked", "found", "trained_border", "mean_iterations",
)

# Independent random streams of a step; the numbers only need to differ.
_STREAMS = {"share": 0, "target": 1, "pgd_start": 2}


@dataclass(frozen=True)
class BorderlineSettings:
    """How an arm trains (keyword-only; checked on construction).

    Attributes:
        arm: one of :data:`ARMS`.
        schedule: the engine's step-size schedule (a name in
            :data:`lib.attack.schedules.SCHEDULES`).
        lr0: the schedule's initial step, > 0, in [0, 1] pixel units.
        max_updates: the engine's update cap per borderline image, an int >= 1.
        target: one of :data:`TARGET_MODES`. With "random" the recorded margin is the
            distance to the drawn class, an upper bound of the image's margin.
        refine_tolerance: bisect each found image's last step to this Linf width (> 0, pixel
            units), or None to train on the first iterate past the boundary.
        share: the share of a batch's correctly classified images attacked, in (0, 1]; the
            count is rounded up (at least one image whenever one is correct).
        border_weight: weight of the borderline term, in [0, 1]; the clean term gets
            ``1 - border_weight``.
        margin_cap: only images whose margin is below this (> 0, Linf pixel units; ``inf``:
            no cap) enter the borderline term.
        pgd_epsilon: the PGD arm's Linf radius, > 0 (required for ``arm="pgd"``).
        pgd_steps: the PGD arm's number of steps K, an int >= 1.
        pgd_step_size: the PGD step, > 0; None: ``2.5 * pgd_epsilon / pgd_steps``.
        seed: non-negative int; the root of every random draw.
        precision: forwards of the attacks and of the training loss: "float32" or "bfloat16"
            (resolved; see :mod:`lib.model.precision`).
    """

    arm: str = "borderline"
    schedule: str = "loss-adaptive"
    lr0: float = 0.008
    max_updates: int = 10
    target: str = "nearest"
    refine_tolerance: float | None = 0.001
    share: float = 1.0
    border_weight: float = 2 / 3
    margin_cap: float = math.inf
    pgd_epsilon: float | None = None
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    seed: int = 0
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def step_size(self) -> float:
        """The PGD step size in use (``pgd_step_size`` or 2.5 eps / K)."""
        if self.pgd_step_size is not None:
            return self.pgd_step_size
        if self.pgd_epsilon is None:
            raise ParameterError("pgd_epsilon is not set; the PGD step size derives from it")
        return 2.5 * self.pgd_epsilon / self.pgd_steps


def check_settings(settings: BorderlineSettings) -> None:
    """Raise :class:`ParameterError` naming the first setting out of range."""
    s = settings
    checks = [
        ("arm", s.arm in ARMS, f"one of {', '.join(ARMS)}"),
        ("schedule", isinstance(s.schedule, str), "a schedule name"),
        ("lr0", is_number(s.lr0) and 0 < s.lr0 < math.inf, "a finite number > 0"),
        ("max_updates", is_int(s.max_updates) and s.max_updates >= 1, "an int >= 1"),
        ("target", s.target in TARGET_MODES, f"one of {', '.join(TARGET_MODES)}"),
        ("refine_tolerance", s.refine_tolerance is None
         or (is_number(s.refine_tolerance) and 0 < s.refine_tolerance < math.inf),
         "None or a finite number > 0"),
        ("share", is_number(s.share) and 0 < s.share <= 1, "a number in (0, 1]"),
        ("border_weight", is_number(s.border_weight) and 0 <= s.border_weight <= 1,
         "a number in [0, 1]"),
        ("margin_cap", s.margin_cap == math.inf
         or (is_number(s.margin_cap) and s.margin_cap > 0), "a number > 0 (inf: no cap)"),
        ("pgd_epsilon", (s.pgd_epsilon is None and s.arm != "pgd")
         or (is_number(s.pgd_epsilon) and 0 < s.pgd_epsilon < math.inf),
         "a finite number > 0 (required for arm='pgd')"),
        ("pgd_steps", is_int(s.pgd_steps) and s.pgd_steps >= 1, "an int >= 1"),
        ("pgd_step_size", s.pgd_step_size is None
         or (is_number(s.pgd_step_size) and 0 < s.pgd_step_size < math.inf),
         "None or a finite number > 0"),
        ("seed", is_int(s.seed) and s.seed >= 0, "an int >= 0"),
        ("precision", s.precision in ("float32", "bfloat16"),
         "'float32' or 'bfloat16' (resolve 'auto' with lib.precision.resolve first)"),
    ]  # fmt: skip
    for name, ok, expected in checks:
        if not ok:
            raise ParameterError(
                f"borderline training: {name} must be {expected}, got {getattr(s, name)!r}"
            )


class Batch(NamedTuple):
    """One SGD step's input.

    ``images`` float [B, C, H, W] in [0, 1], on the model's device, in its dtype;
    ``labels`` int64 [B], the true classes; ``index`` int64 [B], the images' positions in the
    training set (keys of the margins); ``epoch`` 1-based epoch and ``step`` 1-based step
    within the epoch: together with the seed they fix every random draw of the step.
    """

    images: Tensor
    labels: Tensor
    index: Tensor
    epoch: int
    step: int


@dataclass(frozen=True)
class Passes:
    """Image passes of one step (see the module docstring for the convention)."""

    train: int = 0  #: images through a training forward + backward
    attack: int = 0  #: images through a forward + backward to the input, weights frozen
    forwards: int = 0  #: images through a forward alone

    @property
    def total(self) -> float:
        """Forward + backward passes, a forward counted as :data:`FORWARD_WEIGHT`."""
        return self.train + self.attack + FORWARD_WEIGHT * self.forwards


@dataclass
class StepLoss:
    """What an objective returns for one step.

    Attributes:
        loss: the scalar loss, differentiable with respect to the model's weights.
        passes: the step's :class:`Passes`.
        images: B, the batch size.
        counts: the borderline arm's per-step counts: ``correct`` (images the model classified
            correctly before the step), ``attacked``, ``found`` (borderline images found),
            ``trained_border`` (images in the borderline term), ``iterations`` (the sum of the
            engine's updates over attacked images). Zero for the other arms.
    """

    loss: Tensor
    passes: Passes
    images: int
    counts: dict[str, int] = field(default_factory=dict)

    def row(self, *, epoch: int, step: int) -> dict[str, Any]:
        """One row of the per-step record, with the columns :data:`STEP_COLUMNS`."""
        attacked = self.counts.get("attacked", 0)
        return {
            "epoch": epoch, "step": step, "images": self.images, "loss": self.loss.item(),
            "train_passes": self.passes.train, "attack_passes": self.passes.attack,
            "forwards": self.passes.forwards, "passes": self.passes.total,
            "correct": self.counts.get("correct", 0), "attacked": attacked,
            "found": self.counts.get("found", 0),
            "trained_border": self.counts.get("trained_border", 0),
            "mean_iterations": self.counts.get("iterations", 0) / attacked if attacked else 0.0,
        }  # fmt: skip


class Objective(Protocol):
    """A batch objective: ``objective(model, batch) -> StepLoss`` (see the module docstring)."""

    settings: BorderlineSettings

    def __call__(self, model: nn.Module, batch: Batch) -> StepLoss: ...


class ControlObjective:
    """The clean cross-entropy, as the training loop computes it (one training pass each)."""

    def __init__(self, settings: BorderlineSettings, *, class_weights: Tensor | None = None):
        self.settings = settings
        self.class_weights = class_weights

    def __call__(self, model: nn.Module, batch: Batch) -> StepLoss:
        logits = precision_lib.forward(model, batch.images, precision=self.settings.precision)
        loss = F.cross_entropy(logits, batch.labels, weight=_on(self.class_weights, logits))
        return StepLoss(loss, Passes(train=len(batch.labels)), len(batch.labels))


class BorderlineObjective:
    """Clean and borderline cross-entropy mixed (module docstring); updates ``margins``."""

    def __init__(self, settings: BorderlineSettings, *, margins: MarginTable,
                 class_weights: Tensor | None = None):
        self.settings = settings
        self.margins = margins
        self.class_weights = class_weights

    def __call__(self, model: nn.Module, batch: Batch) -> StepLoss:
        images, labels = batch.images, batch.labels
        with frozen(model), torch.no_grad():
            logits = model(images)
        correct = logits.argmax(1) == labels
        attacked = _draw_share(correct.cpu(), self.settings.share,
                               _generator(self.settings.seed, batch, "share"))
        found = borderline_images(model, images, labels, attacked, batch=batch,
                                  num_classes=logits.shape[1], settings=self.settings)
        margins = torch.zeros(len(labels), dtype=torch.float64)
        margins[attacked] = found.margin
        looked_at = ~correct.cpu()
        looked_at[attacked] = True
        self.margins.update(batch.index.cpu()[looked_at], margins[looked_at],
                            epoch=batch.epoch, step=batch.step)
        keep = found.margin < self.settings.margin_cap  # inf (not found) is never below
        border = found.images[keep.to(found.images.device)]
        loss = self._mixed_loss(model, images, labels, border, attacked[keep])
        passes = Passes(train=len(labels) + len(border), attack=found.attack_passes,
                        forwards=len(labels) + found.forwards)
        counts = {"correct": int(correct.sum()), "attacked": len(attacked),
                  "found": int(torch.isfinite(found.margin).sum()),
                  "trained_border": len(border), "iterations": found.iterations}
        return StepLoss(loss, passes, len(labels), counts)

    def _mixed_loss(self, model: nn.Module, images: Tensor, labels: Tensor, border: Tensor,
                    border_rows: Tensor) -> Tensor:
        """(1 - w) CE(clean) + w * (weighted sum of borderline CE) / (weighted batch size)."""
        weight = self.settings.border_weight
        logits = precision_lib.forward(model, torch.cat([images, border]),
                                       precision=self.settings.precision)
        class_weights = _on(self.class_weights, logits)
        clean = F.cross_entropy(logits[: len(labels)], labels, weight=class_weights)
        if len(border) == 0:
            return (1 - weight) * clean
        border_labels = labels[border_rows.to(labels.device)]
        per_image = F.cross_entropy(logits[len(labels):], border_labels, weight=class_weights,
                                    reduction="sum")
        norm = len(labels) if class_weights is None else class_weights[labels].sum()
        return (1 - weight) * clean + weight * per_image / norm


class PGDObjective:
    """Cross-entropy of Linf PGD images (random start, K steps) with their true labels."""

    def __init__(self, settings: BorderlineSettings, *, class_weights: Tensor | None = None):
        if settings.pgd_epsilon is None:
            raise ParameterError("pgd_epsilon must be set for arm='pgd' (a Linf radius > 0)")
        self.settings = settings
        self.class_weights = class_weights

    def __call__(self, model: nn.Module, batch: Batch) -> StepLoss:
        s = self.settings
        adversarial = pgd_images(
            model, batch.images, batch.labels, epsilon=s.pgd_epsilon, steps=s.pgd_steps,
            step_size=s.step_size, generator=_generator(s.seed, batch, "pgd_start"),
            precision=s.precision,
        )  # fmt: skip
        logits = precision_lib.forward(model, adversarial, precision=s.precision)
        loss = F.cross_entropy(logits, batch.labels, weight=_on(self.class_weights, logits))
        count = len(batch.labels)
        return StepLoss(loss, Passes(train=count, attack=count * s.pgd_steps), count)


def make_objective(settings: BorderlineSettings, *, num_images: int | None = None,
                   margins: MarginTable | None = None,
                   class_weights: Tensor | None = None) -> Objective:
    """The objective of ``settings.arm``.

    Args:
        settings: the arm and its settings.
        num_images: the training set's size (a fresh :class:`MarginTable` for the borderline
            arm); or pass ``margins`` (e.g. read back when resuming).
        margins: the borderline arm's margin table (ignored by the other arms).
        class_weights: float [K] per-class weights of the cross-entropy (as the training
            loop's ``balance="weights"``), or None.
    """
    if settings.arm == "control":
        return ControlObjective(settings, class_weights=class_weights)
    if settings.arm == "pgd":
        return PGDObjective(settings, class_weights=class_weights)
    if margins is None:
        if num_images is None:
            raise ParameterError("the borderline arm needs num_images or a margin table")
        margins = MarginTable(num_images)
    return BorderlineObjective(settings, margins=margins, class_weights=class_weights)


@dataclass(frozen=True)
class FoundImages:
    """The engine's borderline images of the attacked images of one batch.

    ``images`` [k, C, H, W] (refined; on the batch's device), ``margin`` float64 [k] on the
    CPU (Linf pixel units; ``inf`` where no flip was found), and what the search cost:
    ``attack_passes`` (the engine's sum of ``iterations + 1``), ``forwards`` (refinement
    bisections plus the engine's one-image probe), ``iterations`` (sum of updates).
    """

    images: Tensor
    margin: Tensor
    attack_passes: int
    forwards: int
    iterations: int


def borderline_images(model: nn.Module, images: Tensor, labels: Tensor, attacked: Tensor, *,
                      batch: Batch, num_classes: int,
                      settings: BorderlineSettings) -> FoundImages:
    """Run the engine on ``images[attacked]`` (untargeted from the true class, or toward a
    drawn other class) with the settings' schedule, lr0, update cap and refinement."""
    if len(attacked) == 0:
        empty = images.new_empty((0, *images.shape[1:]))
        return FoundImages(empty, torch.empty(0, dtype=torch.float64), 0, 0, 0)
    sources = labels.cpu()[attacked]
    if settings.target == "random":
        draw = torch.randint(num_classes - 1, (len(attacked),),
                             generator=_generator(settings.seed, batch, "target"))
        targets = (sources + 1 + draw) % num_classes
    else:
        targets = torch.full_like(sources, -1)
    rows = pd.DataFrame({"row_id": np.arange(len(attacked)), "image": attacked.numpy(),
                         "source": sources.numpy(), "target": targets.numpy(),
                         "schedule": settings.schedule})
    result = engine.attack_rows(
        model, images, rows, targeted=settings.target == "random", lr0=settings.lr0,
        max_iter=settings.max_updates, batch_size=len(rows), precision=settings.precision,
        refine_tolerance=settings.refine_tolerance, certify=False, keep_images=True,
    )  # fmt: skip
    margin = torch.where(result.success, result.refined_linf.double(), math.inf)
    return FoundImages(
        images=result.refined.to(images.device), margin=margin,
        attack_passes=int((result.iterations + 1).sum()),
        forwards=int(result.refine_forwards.sum()) + 1,
        iterations=int(result.iterations.sum()),
    )


def mean_passes_per_image(rows: Sequence[StepLoss] | pd.DataFrame) -> float:
    """Total passes over total images of several steps (StepLoss objects or record rows)."""
    if isinstance(rows, pd.DataFrame):
        total, images = float(rows["passes"].sum()), int(rows["images"].sum())
    else:
        total = sum(r.passes.total for r in rows)
        images = sum(r.images for r in rows)
    if images == 0:
        raise ParameterError("mean_passes_per_image needs at least one step with images")
    return total / images


class IndexedImages(Dataset):
    """A dataset of ``(image, label)`` seen as ``(image, label, position)``, so a batch knows
    which training images it holds (the keys of the :class:`MarginTable`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.labels = getattr(dataset, "labels", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[Tensor, Any, int]:
        image, label = self.dataset[position]
        return image, label, position


def stream_seed(seed: int, epoch: int, step: int, stream: str) -> int:
    """A 63-bit seed for one (seed, epoch, step, stream) of this module's draws."""
    state = np.random.SeedSequence([seed, epoch, step, _STREAMS[stream]]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


def _generator(seed: int, batch: Batch, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, batch.epoch, batch.step, stream))


def _draw_share(correct: Tensor, share: float, generator: torch.Generator) -> Tensor:
    """Positions (int64, ascending) of ceil(share * #correct) correct images, drawn."""
    positions = correct.nonzero().flatten()
    count = math.ceil(share * len(positions) - 1e-9)
    if count >= len(positions):
        return positions
    chosen = torch.randperm(len(positions), generator=generator)[:count]
    return positions[chosen.sort().values]


def _on(weights: Tensor | None, like: Tensor) -> Tensor | None:
    return None if weights is None else weights.to(device=like.device, dtype=like.dtype)
