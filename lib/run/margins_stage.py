"""The margins stage: its settings, and the attacks it adds on the run folder.

:class:`MarginSettings` holds the only defaults of the stage's parameters (those of the default
build) and their only value checks.

The stage reads the attack stage's results and adds two small jobs of its own, each run once
and kept in the stage's folder (a finished job is read back, never repeated; on the CPU a rerun
gives the same rows):

- :func:`untargeted_results`: every image the attack stage selected at the compared
  checkpoints, attacked untargeted (leave the true class, toward whichever class is nearest)
  with the chosen schedules: the untargeted borderline distance beside the targeted margin;
- :func:`margin_loss_results`: a sample of the attack stage's attacks
  (:func:`lib.analysis.loss_comparison.rerun_sample`) run again, unchanged but for the loss,
  with the logit margin instead of cross-entropy; each failure gets its outcome class.

Both run with the attack stage's lr0, budget, batch size, precision and refinement
(``job.json``), on the checkpoints of the first trained model (:func:`rerun_model`), the one
the attack stage attacks at every checkpoint it chose.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.analysis import failures
from lib.analysis.loss_comparison import rerun_sample
from lib.attack import api
from lib.attack.engine import with_progress
from lib.attack.results import AttackResult
from lib.attack.schedules import SCHEDULES
from lib.checking import check_choices, check_int, check_ints, check_list, check_share
from lib.errors import ParameterError
from lib.run import layout, tables

#: The loss the reruns follow.
RERUN_LOSS = "logit_margin"


@dataclass(frozen=True)
class MarginSettings:
    """The margins stage's parameters (checked when made).

    Attributes:
        epochs: checkpoints of the untargeted attacks and the logit-margin reruns; [] for the
            first and the last attacked one.
        untargeted_schedules: schedules of the untargeted attacks (every image the attack stage
            selected at those checkpoints, once per schedule); [] for none.
        rerun_failures: failed attacks per checkpoint and schedule run again with the logit
            margin instead of cross-entropy (a seeded draw).
        rerun_successes: successful attacks per checkpoint and schedule run again the same way,
            to compare the distances of the two losses.
        success_levels: success rates at which the schedules' distances are compared across
            the lr0 sweep (matched success), each in (0, 1].
        epsilon_points: points of the epsilon grid of the robust-accuracy curves.
        seed: seeds the draw of the reruns.
    """

    epochs: tuple[int, ...] = ()
    untargeted_schedules: tuple[str, ...] = tuple(SCHEDULES)
    rerun_failures: int = 8
    rerun_successes: int = 3
    success_levels: tuple[float, ...] = (0.5, 0.75)
    epsilon_points: int = 51
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", check_ints(self.epochs, "epochs", low=1))
        object.__setattr__(self, "untargeted_schedules",
                           check_list(self.untargeted_schedules, "untargeted_schedules"))
        object.__setattr__(self, "success_levels",
                           check_list(self.success_levels, "success_levels"))
        self.check()

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` naming the first bad setting."""
        if self.untargeted_schedules:  # [] runs no untargeted attack
            check_choices(self.untargeted_schedules, list(SCHEDULES), "untargeted_schedules")
        check_int(self.rerun_failures, "rerun_failures", low=0)
        check_int(self.rerun_successes, "rerun_successes", low=0)
        if not self.success_levels:
            raise ParameterError("success_levels is empty; give at least one rate, e.g. [0.5]")
        for level in self.success_levels:
            check_share(level, "every value of success_levels", above_zero=True,
                        example="0.5: the distance at which half of the attacks succeed")
        check_int(self.epsilon_points, "epsilon_points", low=2)
        check_int(self.seed, "seed", low=0)

    def to_json(self) -> dict[str, Any]:
        """The settings as plain values (lists for tuples)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in asdict(self).items()}


def compared_epochs(results: pd.DataFrame, settings: MarginSettings) -> list[int]:
    """The checkpoints of the stage's own attacks: ``settings.epochs``, or the first and the
    last attacked one.

    Raises:
        ParameterError: an epoch the attack stage did not attack.
    """
    attacked = sorted(int(e) for e in results["epoch"].unique())
    if not settings.epochs:
        return sorted({attacked[0], attacked[-1]})
    missing = sorted(set(settings.epochs) - set(attacked))
    if missing:
        raise ParameterError(f"epochs {missing} were not attacked (the attack stage attacked "
                             f"{attacked}); choose epochs among those, or [] for the first "
                             "and the last")
    return sorted(settings.epochs)


def rerun_model(results: pd.DataFrame) -> int:
    """The model (seed) whose checkpoints the stage attacks again: the first (smallest seed)
    the attack stage attacked, the one it attacked at every checkpoint it chose."""
    return int(results["model"].min())


def rerun_model_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The attack stage's rows of :func:`rerun_model`."""
    return results[results["model"] == rerun_model(results)]


def as_rerun_model(table: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """``table`` (rows of the minimality stage's reference attacks, which name no model) with
    the ``model`` of :func:`rerun_model`; a table that names its model is returned as it is."""
    if "model" in table.columns:
        return table
    return table.assign(model=rerun_model(results))


def _context(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The attack stage's settings the stage's own attacks repeat (a job made before the
    certified stop existed did not certify)."""
    job = tables.read_record(run_dir, "job")["settings"]
    return {"lr0": float(job["lr0"]), "max_iter": int(job["max_iter"]),
            "batch_size": int(job["batch_size"]), "precision": job["precision"],
            "refine_tolerance": job["refine_tolerance"],
            "certify": bool(job.get("certify", False)),
            "schedule_constants": job["schedule_constants"]}


def _pool(run_dir: str | os.PathLike[str], image_ids: list[str]) -> tuple[torch.Tensor,
                                                                              pd.Series]:
    """The test images ``image_ids`` (uint8 [N, C, H, W]) and each id's index in them."""
    from lib.run.data_stage import load_run_split

    test_set = load_run_split(run_dir, "test")
    position = pd.Series(np.arange(len(test_set)), index=test_set.index["image_id"].to_numpy())
    ids = sorted(set(image_ids))
    pool = test_set.images[torch.from_numpy(position.loc[ids].to_numpy(np.int64, copy=True))]
    return pool, pd.Series(np.arange(len(ids)), index=ids)


def _attack(run_dir: str | os.PathLike[str], model: torch.nn.Module, rows: pd.DataFrame, *,
            mode: str, loss: str, progress: bool, keep_images: bool = False) -> AttackResult:
    """Run ``rows`` (keys image_id, source, target, schedule, row_id) on ``model`` (on its
    device) with the attack stage's settings."""
    context = _context(run_dir)
    pool, index = _pool(run_dir, rows["image_id"].tolist())
    engine_rows = pd.DataFrame({
        "row_id": rows["row_id"].to_numpy(np.int64),
        "image": index.loc[rows["image_id"]].to_numpy(np.int64),
        "source": rows["source"].to_numpy(np.int64), "target": rows["target"].to_numpy(np.int64),
        "schedule": rows["schedule"].to_numpy()})
    present = set(engine_rows["schedule"])
    constants = {k: v for k, v in context.pop("schedule_constants").items() if k in present}
    stream = api.iter_attack_rows(model, pool, engine_rows, targeted=mode == "targeted",
                                  loss=loss, schedule_constants=constants,
                                  keep_images=keep_images, **context)
    return AttackResult.concat(list(with_progress(stream, len(rows), progress))).sorted()


def _model(run_dir: str | os.PathLike[str], epoch: int, model: int,
           device: str | torch.device) -> torch.nn.Module:
    from lib.model.checkpoints import load_checkpoint

    return load_checkpoint(layout.checkpoint_path(run_dir, epoch, model=model),
                           map_location=device)


def _result_table(rows: pd.DataFrame, result: AttackResult, mode: str) -> pd.DataFrame:
    """The attack stage's result columns for ``rows`` and their results."""
    keys = rows[["row_id", "model", "epoch", "schedule", "image_id", "source", "target"]]
    table = keys.merge(result.to_frame(), on="row_id", how="left", validate="one_to_one")
    return table.assign(mode=mode, l1_255=table["l1"] * 255)[list(tables.RESULT_COLUMNS)]


def untargeted_results(run_dir: str | os.PathLike[str], settings: MarginSettings, *,
                       device: str | torch.device = "cpu", progress: bool = True) -> pd.DataFrame:
    """Every selected image of the compared checkpoints, attacked untargeted with each of
    ``settings.untargeted_schedules``; ``margins/untargeted.csv`` (read back when it exists).

    Returns:
        The attack stage's result columns, ``mode`` "untargeted" and ``target`` -1; one row
        per (epoch, image, schedule) of :func:`rerun_model`, ``row_id`` numbering an epoch's
        rows.
    """
    found = tables.read_table(run_dir, "untargeted", missing_ok=True)
    if found is not None:
        return found
    results = rerun_model_rows(tables.read_results(run_dir))
    model = rerun_model(results)
    selection = tables.read_table(run_dir, "selection")
    selection = selection[selection["model"] == model]
    parts = []
    for epoch in compared_epochs(results, settings) if settings.untargeted_schedules else []:
        images = selection[selection["epoch"] == epoch].sort_values("rank", kind="stable")
        rows = pd.DataFrame([(model, epoch, image, label, -1, name)
                             for image, label in zip(images["image_id"], images["label"],
                                                     strict=True)
                             for name in settings.untargeted_schedules],
                            columns=["model", "epoch", "image_id", "source", "target",
                                     "schedule"])
        rows["row_id"] = np.arange(len(rows), dtype=np.int64)
        result = _attack(run_dir, _model(run_dir, epoch, model, device), rows,
                         mode="untargeted", loss="cross_entropy", progress=progress)
        parts.append(_result_table(rows, result, "untargeted"))
    table = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame(columns=list(tables.RESULT_COLUMNS)))
    tables.write_table(run_dir, "untargeted", table)
    return table


def margin_loss_results(run_dir: str | os.PathLike[str], settings: MarginSettings, *,
                        device: str | torch.device = "cpu",
                        progress: bool = True) -> pd.DataFrame:
    """The sampled attacks run again with the logit-margin loss; ``margins/margin_loss.csv``
    (read back when it exists).

    Returns:
        The attack stage's result columns for the rerun rows (their original ``epoch`` and
        ``row_id``) and ``outcome``: the outcome class of a failure
        (:func:`lib.analysis.failures.classify_failures`; the logit margin is > 0 until the
        flip, so a flat margin counts as saturated at any level), "nonfinite" for a model
        output that stopped being finite, "" for a success.
    """
    found = tables.read_table(run_dir, "margin_loss", missing_ok=True)
    if found is not None:
        return found.fillna({"outcome": ""})
    results = rerun_model_rows(tables.read_results(run_dir))
    chosen = rerun_sample(results, epochs=compared_epochs(results, settings),
                          failures=settings.rerun_failures, successes=settings.rerun_successes,
                          seed=settings.seed)
    parts = []
    for epoch, rows in chosen.groupby("epoch", sort=True):
        result = _attack(run_dir, _model(run_dir, int(epoch), rerun_model(results), device),
                         rows, mode="targeted", loss=RERUN_LOSS, progress=progress)
        table = _result_table(rows, result, "targeted")
        outcome = failures.classify_failures(
            result.loss_trace.double().numpy(), result.lr_trace.double().numpy(),
            table["final_class"].to_numpy(), table["source"].to_numpy(),
            table["target"].to_numpy(), plateau_loss=0.0)["outcome"].to_numpy()
        outcome = np.where(table["status"] != "ok", "nonfinite", outcome)
        parts.append(table.assign(outcome=np.where(table["success"], "", outcome)))
    columns = [*tables.RESULT_COLUMNS, "outcome"]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    tables.write_table(run_dir, "margin_loss", table)
    return table


def frozen_gradients(run_dir: str | os.PathLike[str], failed: pd.DataFrame,
                     settings: MarginSettings, *, device: str | torch.device = "cpu",
                     progress: bool = True) -> pd.DataFrame:
    """Why a saturated loss froze: the input gradient at the end of those failed attacks;
    ``margins/frozen_gradients.csv`` (read back when it exists).

    The failed attacks of the last compared checkpoint whose loss stayed exactly constant over
    the last updates while it sat on a plateau (``frozen`` and ``saturated`` in ``failed``, at
    most ``settings.rerun_failures`` per schedule) are run again unchanged, keeping
    their final images, and the gradient of the target's cross-entropy with respect to the
    final image is taken. A gradient that is exactly 0 everywhere makes every sign step 0: the
    image stops moving however large the step size.

    Args:
        failed: :func:`lib.analysis.failures.failed_attacks` of the attack stage's results.

    Returns:
        ``epoch, row_id, schedule, image_id, source, target, success`` (of the rerun, which
        repeats the original in float32 up to rare batch-order differences),
        ``gradient_linf`` (the largest absolute gradient value) and ``zero_share`` (the share
        of the image's values whose gradient is exactly 0, in [0, 1]).
    """
    found = tables.read_table(run_dir, "frozen_gradients", missing_ok=True)
    if found is not None:
        return found
    results = rerun_model_rows(tables.read_results(run_dir))
    model = rerun_model(results)
    chosen = failed[failed["frozen"] & (failed["outcome"] == "saturated")
                    & (failed["model"] == model)
                    & (failed["epoch"] == compared_epochs(results, settings)[-1])]
    chosen = chosen.groupby(["epoch", "schedule"], sort=True).head(settings.rerun_failures)
    keyed = results.set_index(["epoch", "row_id"])
    parts = []
    for epoch, keys in chosen.groupby("epoch", sort=True):
        rows = keyed.loc[[(epoch, r) for r in keys["row_id"]]].reset_index()
        network = _model(run_dir, int(epoch), model, device)
        result = _attack(run_dir, network, rows, mode="targeted", loss="cross_entropy",
                         progress=progress, keep_images=True)
        gradient = input_gradient(network, result.borderline, rows["target"], device=device)
        parts.append(rows[["epoch", "row_id", "schedule", "image_id", "source", "target"]]
                     .assign(success=result.success.numpy(),
                             gradient_linf=gradient.abs().amax(1).double().numpy(),
                             zero_share=(gradient == 0).double().mean(1).numpy()))
    columns = list(tables.TABLES["frozen_gradients"].columns)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    tables.write_table(run_dir, "frozen_gradients", table)
    return table


def input_gradient(model: torch.nn.Module, images: torch.Tensor, targets: pd.Series, *,
                   device: str | torch.device) -> torch.Tensor:
    """The gradient of each target's cross-entropy with respect to ``images`` [N, C, H, W] in
    [0, 1] (the model frozen in eval mode), flattened: [N, C*H*W] on the CPU."""
    from lib.model.network import frozen

    with frozen(model), torch.enable_grad():
        x = images.to(device).requires_grad_(True)
        target = torch.tensor(targets.to_numpy(np.int64), device=device)
        loss = torch.nn.functional.cross_entropy(model(x), target, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
    return gradient.flatten(1).cpu()
