"""The borderline-training stage's measurements: every model under attacks no arm trained on.

The measured models are the clean start checkpoint (``"start"``) and the last epoch of every
arm (``"control"``, ``"borderline"``, ``"pgd"``). They are measured on the same test images
(:func:`measured_images`: ``eval_per_class`` per tool, from one seeded order of the test
split), and each measurement is one table of the stage's folder, computed model by model and
written after each model, so a killed stage continues with the next model and ends with the
same file:

- ``fmn_margins.csv``: FMN's minimum-norm margin per image in Linf and L2
  (:func:`lib.attack.evaluation.minimum_norm_attack`), with ``attack_modes.csv``, the modes
  every FMN forward ran in; control's Linf images are kept for the transfer guard;
- ``transfer.csv``: how far along control's FMN perturbations every other model changes
  class (forwards only), in Linf and L2;
- ``fixed_epsilon.csv``: APGD with its two losses at the PGD arm's radius;
- ``gradients.csv``: the input gradient of the logit gap (is it vanishing?);
- ``held_out.csv``: the PGD robust accuracy of every epoch's checkpoint on ``held_out`` other
  test images (does it collapse, as in catastrophic overfitting?).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lib import NUM_CLASSES
from lib.attack import evaluation
from lib.attack.pgd import pgd_images
from lib.data.frames import FrameSet
from lib.model.checkpoints import load_checkpoint
from lib.run import layout, tables
from lib.run.borderline_stage import ArmsRun, BorderlineStageSettings, record_time
from lib.train.borderline import ARMS

#: The measured models: the clean start checkpoint, then every arm's last epoch.
MODELS: tuple[str, ...] = ("start", *ARMS)
#: The model whose FMN perturbations the transfer guard carries to the others.
TRANSFER_SOURCE = "control"
#: Images per attack batch.
BATCH_SIZE = 128
#: PGD steps of the held-out check after every epoch.
HELD_OUT_STEPS = 10
#: Scales tried along a transferred perturbation, then bisections between the last two.
TRANSFER_GRID, TRANSFER_BISECTIONS = 8, 6


@dataclass(frozen=True)
class MeasuredImages:
    """The test images every model is measured on, and the held-out ones.

    Attributes:
        images: float [N, C, H, W] in [0, 1]; labels: int64 [N]; image_ids: N ids.
        held_out: float [M, C, H, W]; held_out_labels: int64 [M].
    """

    images: Tensor
    labels: Tensor
    image_ids: list[str]
    held_out: Tensor
    held_out_labels: Tensor


def measured_images(test_set: FrameSet, settings: BorderlineStageSettings) -> MeasuredImages:
    """``eval_per_class`` test images of every tool (fewer where a tool has fewer), and
    ``held_out`` other test images, from one seeded order of the test split."""
    order = np.random.default_rng([settings.seed, 2]).permutation(len(test_set))
    labels = test_set.labels.numpy()[order]
    chosen = np.concatenate([order[labels == tool][: settings.eval_per_class]
                             for tool in range(NUM_CLASSES)])
    chosen = np.sort(chosen)
    rest = order[~np.isin(order, chosen)][: settings.held_out]
    measured, held = test_set.subset(chosen), test_set.subset(np.sort(rest))
    return MeasuredImages(measured.float_images(), measured.labels,
                          measured.index["image_id"].astype(str).tolist(),
                          held.float_images(), held.labels)


def model_file(run_dir: str | os.PathLike[str], model: str, *, arms: ArmsRun,
               epoch: int | None = None) -> Path:
    """The checkpoint of ``model`` ("start" or an arm) at ``epoch`` (default: its last)."""
    if model == "start":
        return layout.checkpoint_path(run_dir, arms.start_epoch, model=arms.model)
    return layout.checkpoint_file(layout.arm_dir(run_dir, model), epoch or arms.last_epoch)


def _per_model(run_dir: str | os.PathLike[str], name: str,
               compute: Callable[[str], pd.DataFrame]) -> pd.DataFrame:
    """Table ``name`` with the rows of every model of :data:`MODELS`, computing (and writing
    after each) the models it lacks; the wall time of each goes to ``timings.csv``."""
    table = tables.read_table(run_dir, name, missing_ok=True)
    for model in MODELS:
        if table is not None and (table["model"] == model).any():
            continue
        began = time.perf_counter()
        rows = compute(model)
        record_time(run_dir, model, name, time.perf_counter() - began)
        if rows.empty:
            continue
        table = rows if table is None else pd.concat([table, rows], ignore_index=True)
        tables.write_table(run_dir, name, table)
    return table


@functools.lru_cache(maxsize=len(MODELS))
def _cached(path: Path, device: str) -> nn.Module:
    return load_checkpoint(path, map_location=device)


def _load(run_dir: str | os.PathLike[str], model: str, arms: ArmsRun,
          device: str | torch.device) -> nn.Module:
    """The model's last checkpoint, read once per stage run (each measurement asks again;
    every attack leaves the weights and the modes as they were)."""
    return _cached(model_file(run_dir, model, arms=arms), str(device))


def fmn_margins(run_dir: str | os.PathLike[str], arms: ArmsRun, measured: MeasuredImages,
                settings: BorderlineStageSettings, *,
                device: str | torch.device = "cpu") -> pd.DataFrame:
    """``fmn_margins.csv``: every model's margin per image in Linf and L2 from FMN in each
    norm; with it ``attack_modes.csv`` and control's Linf FMN images
    (``transfer_images.npz``).

    An image's margin in a norm is the smallest distance, in that norm, of the images that
    FMN in Linf and FMN in L2 found off its class (each is a perturbation that changes the
    class, so each bounds the margin from above); ``success`` says whether that norm's own
    attack found one.
    """
    def compute(model_name: str) -> pd.DataFrame:
        model = _load(run_dir, model_name, arms, device)
        found, modes = {}, []
        for norm in evaluation.NORMS:
            def attack(norm: str = norm) -> None:
                found[norm] = evaluation.minimum_norm_attack(
                    model, measured.images, measured.labels, norm=norm,
                    steps=settings.fmn_steps, batch_size=BATCH_SIZE, device=device,
                    seed=settings.seed)

            check = evaluation.modes_during(model, attack)
            modes.append({"model": model_name, "attack": f"fmn_{norm}", "forwards":
                          check.forwards, "train_forwards": check.train_forwards,
                          "restored": check.restored})
        if model_name == TRANSFER_SOURCE:
            tables.write_arrays(run_dir, "transfer_images",
                                images=found["linf"][1].numpy())
        _append(run_dir, "attack_modes", pd.DataFrame(modes))
        return pd.concat([_best_of_both(found, norm, model_name, measured)
                          for norm in evaluation.NORMS], ignore_index=True)

    return _per_model(run_dir, "fmn_margins", compute)


def _best_of_both(found: dict[str, tuple[pd.DataFrame, Tensor]], norm: str, model: str,
                  measured: MeasuredImages) -> pd.DataFrame:
    """The rows of one norm: each image's smallest distance in ``norm`` over the images that
    FMN in either norm moved off its class (0 if misclassified, inf if neither did)."""
    own = found[norm][0]
    margin = np.full(len(own), np.inf)
    for table, images in found.values():
        size = evaluation.distances(images - measured.images, norm).numpy()
        margin = np.minimum(margin, np.where(table["success"].to_numpy(bool), size, np.inf))
    margin = np.where(own["correct"].to_numpy(bool), margin, 0.0)
    return pd.DataFrame({"model": model, "image_id": measured.image_ids,
                         "label": own["label"], "norm": norm, "correct": own["correct"],
                         "success": own["success"], "margin": margin})


def _append(run_dir: str | os.PathLike[str], name: str, rows: pd.DataFrame) -> None:
    """Add ``rows`` to table ``name``, replacing rows of the same models."""
    found = tables.read_table(run_dir, name, missing_ok=True)
    if found is not None:
        rows = pd.concat([found[~found["model"].isin(rows["model"])], rows], ignore_index=True)
    tables.write_table(run_dir, name, rows)


def transfer(run_dir: str | os.PathLike[str], arms: ArmsRun, measured: MeasuredImages, *,
             device: str | torch.device = "cpu") -> pd.DataFrame:
    """``transfer.csv``: for every model but control, how far along control's Linf FMN
    perturbations it changes class (:func:`lib.attack.evaluation.transfer_distances`), the
    distance in Linf and in L2."""
    perturbed = torch.from_numpy(tables.read_arrays(run_dir, "transfer_images")["images"])

    def compute(model_name: str) -> pd.DataFrame:
        if model_name == TRANSFER_SOURCE:
            return pd.DataFrame()
        model = _load(run_dir, model_name, arms, device)
        table = evaluation.transfer_distances(
            model, measured.images, measured.labels, perturbed, norm="linf",
            grid=TRANSFER_GRID, bisections=TRANSFER_BISECTIONS, batch_size=BATCH_SIZE,
            device=device)
        return pd.concat([table.assign(norm=norm, distance=_transferred(table, norm, measured,
                                                                        perturbed))
                          .assign(model=model_name, image_id=measured.image_ids)
                          [list(tables.declared("transfer").columns)]
                          for norm in evaluation.NORMS], ignore_index=True)

    return _per_model(run_dir, "transfer", compute)


def _transferred(table: pd.DataFrame, norm: str, measured: MeasuredImages,
                 perturbed: Tensor) -> np.ndarray:
    """The distance in ``norm`` of each image's transferred point (the image moved along the
    perturbation by the scale found, clipped to [0, 1]): 0 if misclassified, inf if no scale
    changed the class (:func:`lib.attack.evaluation.transfer_distances`)."""
    scale = torch.tensor(table["scale"].to_numpy(np.float64)).nan_to_num(0.0)
    delta = perturbed - measured.images
    point = (measured.images + scale.to(delta)[:, None, None, None] * delta).clamp(0, 1)
    size = evaluation.distances(point - measured.images, norm).numpy()
    size = np.where(table["success"].to_numpy(bool), size, np.inf)
    return np.where(table["correct"].to_numpy(bool), size, 0.0)


def fixed_epsilon(run_dir: str | os.PathLike[str], arms: ArmsRun, measured: MeasuredImages,
                  settings: BorderlineStageSettings, *,
                  device: str | torch.device = "cpu") -> pd.DataFrame:
    """``fixed_epsilon.csv``: whether each image survives APGD (cross-entropy, then the
    difference-of-logits ratio) in Linf at the PGD arm's radius."""
    def compute(model_name: str) -> pd.DataFrame:
        model = _load(run_dir, model_name, arms, device)
        table = evaluation.fixed_epsilon_robustness(
            model, measured.images, measured.labels, epsilon=arms.pgd_epsilon, norm="linf",
            steps=settings.apgd_steps, batch_size=BATCH_SIZE, device=device,
            seed=settings.seed)
        return pd.DataFrame({"model": model_name, "image_id": measured.image_ids,
                             "label": table["label"], "norm": "linf",
                             "epsilon": arms.pgd_epsilon, "correct": table["correct"],
                             "robust": table["robust"], "distance": table["distance"]})

    return _per_model(run_dir, "fixed_epsilon", compute)


def gradients(run_dir: str | os.PathLike[str], arms: ArmsRun, measured: MeasuredImages, *,
              device: str | torch.device = "cpu") -> pd.DataFrame:
    """``gradients.csv``: the input gradient of the logit gap at every measured image."""
    def compute(model_name: str) -> pd.DataFrame:
        model = _load(run_dir, model_name, arms, device)
        table = evaluation.input_gradients(model, measured.images, measured.labels,
                                           batch_size=BATCH_SIZE, device=device)
        return table.drop(columns="sample").assign(model=model_name,
                                                   image_id=measured.image_ids)

    return _per_model(run_dir, "gradients", compute)


def held_out(run_dir: str | os.PathLike[str], arms: ArmsRun, measured: MeasuredImages,
             settings: BorderlineStageSettings, *,
             device: str | torch.device = "cpu") -> pd.DataFrame:
    """``held_out.csv``: per model and epoch, the held-out images classified correctly and
    those that stay so under Linf PGD at the PGD arm's radius (:data:`HELD_OUT_STEPS` steps
    of 2.5 eps / K from a seeded random start). "start" has one row, each arm one per
    epoch."""
    def compute(model_name: str) -> pd.DataFrame:
        epochs = ([arms.start_epoch] if model_name == "start"
                  else range(arms.start_epoch + 1, arms.last_epoch + 1))
        rows = []
        for epoch in epochs:
            path = (model_file(run_dir, model_name, arms=arms) if model_name == "start"
                    else model_file(run_dir, model_name, arms=arms, epoch=epoch))
            model = load_checkpoint(path, map_location=device)
            correct, robust = _pgd_survivors(model, measured.held_out,
                                             measured.held_out_labels, arms, settings, device)
            rows.append({"model": model_name, "epoch": epoch,
                         "images": len(measured.held_out_labels), "correct": correct,
                         "robust": robust})
        return pd.DataFrame(rows)

    return _per_model(run_dir, "held_out", compute)


def _pgd_survivors(model: nn.Module, images: Tensor, labels: Tensor, arms: ArmsRun,
                   settings: BorderlineStageSettings,
                   device: str | torch.device) -> tuple[int, int]:
    """(correctly classified, still correct under PGD) among ``images``."""
    correct = robust = 0
    generator = torch.Generator().manual_seed(settings.seed)
    for start in range(0, len(images), BATCH_SIZE):
        x = images[start:start + BATCH_SIZE].to(device)
        y = labels[start:start + BATCH_SIZE].to(device)
        adversarial = pgd_images(model, x, y, epsilon=arms.pgd_epsilon, steps=HELD_OUT_STEPS,
                                 step_size=2.5 * arms.pgd_epsilon / HELD_OUT_STEPS,
                                 generator=generator)
        with torch.no_grad():
            right = model(x).argmax(1) == y
            kept = right & (model(adversarial).argmax(1) == y)
        correct, robust = correct + int(right.sum()), robust + int(kept.sum())
    return correct, robust


def measure_all(run_dir: str | os.PathLike[str], arms: ArmsRun, test_set: FrameSet,
                settings: BorderlineStageSettings, *,
                device: str | torch.device = "cpu") -> dict[str, pd.DataFrame]:
    """Every measurement of the stage, in order (each read back when already written)."""
    measured = measured_images(test_set, settings)
    found = {"fmn_margins": fmn_margins(run_dir, arms, measured, settings, device=device)}
    found["transfer"] = transfer(run_dir, arms, measured, device=device)
    found["fixed_epsilon"] = fixed_epsilon(run_dir, arms, measured, settings, device=device)
    found["gradients"] = gradients(run_dir, arms, measured, device=device)
    found["held_out"] = held_out(run_dir, arms, measured, settings, device=device)
    found["attack_modes"] = tables.read_table(run_dir, "attack_modes")
    _cached.cache_clear()
    return found
