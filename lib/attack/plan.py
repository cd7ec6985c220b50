"""The attack job as a plan: its settings, which attacks to run and how they are cut into chunks.

A plan is a pure function of its settings, the training stage's predictions (which images each
checkpoint classifies correctly) and the epochs to attack; it reads no file and attacks
nothing. The attack stage (:mod:`lib.run.attack_stage`) runs the chunks and merges them.

1. **Selection** (:mod:`lib.attack.selection`): per trained model (named by its seed),
   attacked epoch and class, the first ``n_per_class`` correctly classified test images in one
   seeded order (``replicate_per_class`` for every model but the first).
2. **Rows**: per model and epoch, one row per (selected image, other class as target,
   schedule) in targeted mode, or per (image, schedule) in untargeted mode. Images are taken
   rank by rank across the classes (rank 0 of every class, then rank 1, ...), targets in label
   order, schedules in the given order. ``row_id`` numbers the rows of one model's epoch from
   0; the key of an attack is ``(model, epoch, row_id)``.
3. **Chunks**: ``chunk_size`` consecutive rows of one *part* (a model's attacked epoch, or one
   lr0 of the sensitivity sweep on the first model) are the unit of work. Each chunk is one
   fresh engine call, so its float32 results are bit-identical however often and wherever it
   is re-run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lib import NUM_CLASSES
from lib.attack.results import MODES
from lib.attack.schedules import SCHEDULES, bind, get_schedule
from lib.attack.selection import (
    SELECTION_COLUMNS,
    SHORTFALL_COLUMNS,
    Selection,
    select_images,
)
from lib.checking import (
    check_choice,
    check_int,
    check_ints,
    check_list,
    check_positive,
    check_positives,
)
from lib.errors import ParameterError
from lib.model import precision as precision_lib

#: Columns of the planned row table (:attr:`AttackJob.rows`).
PLAN_COLUMNS: tuple[str, ...] = (
    "part", "kind", "model", "epoch", "lr0", "row_id", "image_id", "rank", "source", "target",
    "schedule", "chunk", "gallery",
)


@dataclass(frozen=True)
class AttackSettings:
    """Everything that defines an attack job (what it computes, not where it runs): the attack
    stage's parameters, with the only defaults (those of the default build) and value checks.

    Attributes:
        epochs: checkpoints of the first model to attack; [] for every trained epoch (paper:
            all 10). The default build leaves out epoch 2, whose checkpoint still confuses some
            tools (the training chapter says how).
        models: seeds of the trained models to attack, increasing; the first is attacked at
            ``epochs`` with ``n_per_class`` images, the others (replicates) at
            ``replicate_epochs`` with ``replicate_per_class``; [] for every trained model.
        replicate_epochs: checkpoints of every model but the first; [] for the first and the
            last of the first model's attacked epochs.
        schedules: step-size schedules (lib.attack.schedules), in the order rows use them.
        lr0: initial step size > 0 in [0, 1] pixel units, about 2/255 (the paper does not give
            it).
        max_iter: update budget per attack; no flip by then is a failure (paper: 100).
        n_per_class: correctly classified test images per class and checkpoint (paper: 50).
        replicate_per_class: the same for every model but the first (n_per_class where that
            is smaller): the replicates trade images for models, which the budget of the
            default build needs.
        mode: "targeted": every other class as target (paper); "untargeted": leave the class.
        seed: seed of the one test-split permutation all checkpoints share.
        batch_size: attacks in flight per forward/backward pass; float32 results depend on it.
        chunk_size: attacks per chunk (one engine call, written atomically): the unit of
            resume; fewer, longer chunks keep the batch full longer.
        schedule_constants: per schedule, constants other than the method chapter's, e.g.
            ``{"step": {"drop": 0.5}}``.
        sweep_lr0: lr0 values of the sensitivity sweep, a factor 10 around lr0; [] for no
            sweep. A value equal to ``lr0`` is not attacked again: its sweep rows are the main
            attack's rows of the same images at ``sweep_epoch``.
        sweep_per_class: images per class in the sweep (ranks 0 .. k-1 of the main selection).
        sweep_epoch: checkpoint of the sweep; 0 for the last attacked one.
        gallery_images: the first classes that have an image at the last attacked checkpoint;
            their first image is kept as pictures (every schedule; target
            ``(source + 1) mod 7``).
        precision: model forwards: "float32", "bfloat16" (autocast; successes confirmed in
            float32) or "auto" (bfloat16 where the device computes it natively).
        refine_tolerance: None: off; else bisect each success's last step to this Linf width
            (pixel units) and report the refined distances beside the path distances.
        certify: finish attacks that interval bounds prove cannot succeed before their budget
            ends (lib.attack.stop); outcomes stay those of the full loop; false: the paper's
            loop to the end.
    """

    epochs: tuple[int, ...] = (1, 3, 4, 5)
    models: tuple[int, ...] = ()
    replicate_epochs: tuple[int, ...] = ()
    schedules: tuple[str, ...] = tuple(SCHEDULES)
    lr0: float = 0.008
    max_iter: int = 100
    n_per_class: int = 4
    replicate_per_class: int = 1
    mode: str = "targeted"
    seed: int = 0
    batch_size: int = 128
    chunk_size: int = 840
    schedule_constants: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    sweep_lr0: tuple[float, ...] = (0.004, 0.008, 0.04)
    sweep_per_class: int = 1
    sweep_epoch: int = 0
    gallery_images: int = 7
    precision: str = "auto"
    refine_tolerance: float | None = 0.001
    certify: bool = True

    def __post_init__(self) -> None:
        # lists from notebooks and JSON become tuples, so settings compare and hash as values
        object.__setattr__(self, "epochs", check_ints(self.epochs, "epochs", low=1))
        object.__setattr__(self, "models", check_ints(self.models, "models", low=0))
        object.__setattr__(self, "replicate_epochs",
                           check_ints(self.replicate_epochs, "replicate_epochs", low=1))
        object.__setattr__(self, "schedules", check_list(self.schedules, "schedules"))
        object.__setattr__(self, "sweep_lr0", check_list(self.sweep_lr0, "sweep_lr0"))
        constants = self.schedule_constants or {}
        if not isinstance(constants, Mapping):
            raise ParameterError(
                f"schedule_constants must map schedule names to their constants, e.g. "
                f"{{\"step\": {{\"drop\": 0.5}}}}, got {constants!r}"
            )
        for name, values in constants.items():
            if not isinstance(values, Mapping):
                raise ParameterError(
                    f"schedule_constants[{name!r}] must map constant names to numbers, e.g. "
                    f"{{\"step\": {{\"drop\": 0.5}}}}, got {values!r}"
                )
        object.__setattr__(self, "schedule_constants",
                           {k: dict(v) for k, v in constants.items()})
        self.check()

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` naming the first bad setting and how to
        fix it."""
        if not self.schedules:
            raise ParameterError(
                f"schedules is empty; name at least one of {', '.join(SCHEDULES)}"
            )
        for name in self.schedules:
            get_schedule(name)
        if len(set(self.schedules)) != len(self.schedules):
            raise ParameterError(f"schedules lists a name twice: {list(self.schedules)}")
        for name, constants in self.schedule_constants.items():
            if name not in self.schedules:
                raise ParameterError(
                    f"schedule_constants names {name!r}, which is not in schedules "
                    f"{list(self.schedules)}"
                )
            bind(name, lr0=1.0, **constants)
        check_positive(self.lr0, "lr0", unit="pixel units")
        check_positives(self.sweep_lr0, "sweep_lr0", unit="pixel units")
        check_int(self.max_iter, "max_iter", low=1)
        check_int(self.n_per_class, "n_per_class", low=1)
        check_int(self.replicate_per_class, "replicate_per_class", low=1)
        if list(self.models) != sorted(set(self.models)):
            raise ParameterError(f"models must be increasing seeds, got {list(self.models)}; "
                                 "e.g. [0, 1, 2], or [] for every trained model")
        check_int(self.seed, "seed", low=0)
        check_int(self.batch_size, "batch_size", low=1)
        check_int(self.chunk_size, "chunk_size", low=1)
        check_int(self.sweep_per_class, "sweep_per_class", low=0)
        check_int(self.sweep_epoch, "sweep_epoch", low=0)
        check_int(self.gallery_images, "gallery_images", low=0)
        if self.sweep_per_class > self.n_per_class:
            raise ParameterError(
                f"sweep_per_class={self.sweep_per_class} exceeds n_per_class="
                f"{self.n_per_class}: the sweep attacks a subset of the main selection"
            )
        check_choice(self.mode, MODES, "mode")
        if not isinstance(self.certify, bool):
            raise ParameterError(f"certify must be true or false, got {self.certify!r}")
        precision_lib.check(self.precision)
        if self.refine_tolerance is not None:
            check_positive(self.refine_tolerance, "refine_tolerance (None for no refinement)",
                           unit="pixel units")

    def to_json(self) -> dict[str, Any]:
        """The settings as plain values (lists for tuples), as ``job.json`` and the stage's
        parameters hold them."""
        values = asdict(self)
        for key in ("epochs", "models", "replicate_epochs", "schedules", "sweep_lr0"):
            values[key] = list(values[key])
        return values


@dataclass
class AttackJob:
    """A planned attack job.

    Attributes:
        settings: the :class:`AttackSettings`, with ``models``, ``epochs``,
            ``replicate_epochs`` and ``sweep_epoch`` resolved.
        selection: the attacked images (and the shortfall report).
        rows: one row per attack, columns :data:`PLAN_COLUMNS`; ``part`` is
            ``"seed_S_epoch_NN"`` for the main attack of a model or ``"sweep_KK"`` for the
            k-th sweep lr0.
        chunks: one row per chunk: ``part``, ``chunk`` (0-based within the part), ``model``,
            ``epoch``, ``lr0``, ``rows`` (count), ``kind`` (``"main"`` or ``"sweep"``). Its
            index order is the order of work; ``(part, chunk)`` is a chunk's key.
    """

    settings: AttackSettings
    selection: Selection
    rows: pd.DataFrame
    chunks: pd.DataFrame

    def chunk_rows(self, part: str, chunk: int) -> pd.DataFrame:
        return self.rows[(self.rows["part"] == part) & (self.rows["chunk"] == chunk)]


def plan_attacks(settings: AttackSettings, predictions: pd.DataFrame, *,
                 epochs: Mapping[int, Sequence[int]]) -> AttackJob:
    """Plan the job: select the images, list every attack, cut the rows into chunks.

    Args:
        settings: the job's settings; their ``models``, ``epochs``, ``replicate_epochs`` and
            ``sweep_epoch`` are replaced by the resolved ones.
        predictions: the training stage's predictions of every model (``model, epoch,
            image_id, label, predicted``), the whole test split at every epoch.
        epochs: the epochs to attack per model (its seed), the first model first, each list
            sorted; every model after the first is attacked at the same epochs.

    Raises:
        ParameterError: a sweep epoch that is not attacked, or an epoch with no correctly
            classified test image (nothing to attack).
    """
    models = [int(m) for m in epochs]
    first = models[0]
    sweep_epoch = settings.sweep_epoch or list(epochs[first])[-1]
    if settings.sweep_lr0 and settings.sweep_per_class and sweep_epoch not in epochs[first]:
        raise ParameterError(
            f"sweep_epoch={sweep_epoch} is not among the attacked epochs {list(epochs[first])} "
            "of the first model; choose one of them or 0 (the last)"
        )
    replicate = list(epochs[models[1]]) if len(models) > 1 else []
    settings = AttackSettings(**{**settings.to_json(), "models": models,
                                 "epochs": list(epochs[first]), "replicate_epochs": replicate,
                                 "sweep_epoch": sweep_epoch})
    selection = _select(settings, predictions, epochs)
    parts = [_part_rows(selection.images[selection.images["model"] == model], settings,
                        model=model, epoch=e, kind="main", lr0=settings.lr0,
                        name=f"seed_{model}_epoch_{e:02d}")
             for model in models for e in epochs[model]]
    if settings.sweep_lr0 and settings.sweep_per_class:
        chosen = selection.images[(selection.images["model"] == first)
                                  & (selection.images["rank"] < settings.sweep_per_class)]
        parts += [_part_rows(chosen, settings, model=first, epoch=sweep_epoch, kind="sweep",
                             lr0=value, name=f"sweep_{k:02d}")
                  for k, value in enumerate(settings.sweep_lr0) if value != settings.lr0]
    rows = pd.concat(parts, ignore_index=True)
    _mark_gallery(rows, settings, model=first, last_epoch=list(epochs[first])[-1])
    chunks = (
        rows.groupby(["part", "chunk"], sort=False)
        .agg(model=("model", "first"), epoch=("epoch", "first"), lr0=("lr0", "first"),
             rows=("row_id", "size"), kind=("kind", "first"))
        .reset_index()
    )
    return AttackJob(settings=settings, selection=selection,
                     rows=rows[list(PLAN_COLUMNS)].reset_index(drop=True), chunks=chunks)


def _select(settings: AttackSettings, predictions: pd.DataFrame,
            epochs: Mapping[int, Sequence[int]]) -> Selection:
    """Every model's selection (``replicate_per_class`` images for all but the first), with
    the model column first; ParameterError for an epoch with nothing to attack."""
    if "model" not in predictions.columns:
        raise ParameterError("the prediction table lacks the column 'model' (the seed of the "
                             "model that predicted); read it with lib.run.tables")
    images, shortfall = [], []
    for k, (model, chosen) in enumerate(epochs.items()):
        picked = select_images(
            predictions[predictions["model"] == model],
            n_per_class=settings.n_per_class if k == 0 else min(settings.replicate_per_class,
                                                                settings.n_per_class),
            seed=settings.seed, epochs=list(chosen))
        counts = picked.images.groupby("epoch").size().reindex(list(chosen), fill_value=0)
        empty = counts[counts == 0].index.tolist()
        if empty:
            raise ParameterError(
                f"empty selection: at epoch(s) {empty} the checkpoint of the model of seed "
                f"{model} classifies no test image correctly, so there is nothing to attack; "
                "leave those epochs out, or train longer (02_train)"
            )
        images.append(picked.images.assign(model=model))
        shortfall.append(picked.shortfall.assign(model=model))
    return Selection(
        images=pd.concat(images, ignore_index=True)[["model", *SELECTION_COLUMNS]],
        shortfall=pd.concat(shortfall, ignore_index=True)[["model", *SHORTFALL_COLUMNS]]
        .astype({"model": np.int64}))


def _part_rows(images: pd.DataFrame, settings: AttackSettings, *, model: int, epoch: int,
               kind: str, lr0: float, name: str) -> pd.DataFrame:
    """The rows of one part: images rank by rank across classes, then targets, then schedules."""
    chosen = images[images["epoch"] == epoch].sort_values(["rank", "label"], kind="stable")
    n_images = len(chosen)
    if settings.mode == "targeted":
        targets = np.array([[t for t in range(NUM_CLASSES) if t != s] for s in chosen["label"]])
        per_image = NUM_CLASSES - 1
    else:
        targets = np.full((n_images, 1), -1)
        per_image = 1
    n_sched = len(settings.schedules)
    repeat = per_image * n_sched
    table = pd.DataFrame({
        "part": name,
        "kind": kind,
        "model": model,
        "epoch": epoch,
        "lr0": float(lr0),
        "image_id": np.repeat(chosen["image_id"].to_numpy(), repeat),
        "rank": np.repeat(chosen["rank"].to_numpy(), repeat),
        "source": np.repeat(chosen["label"].to_numpy(), repeat),
        "target": np.repeat(targets.reshape(-1), n_sched) if n_images else np.array([], int),
        "schedule": np.tile(np.array(settings.schedules, dtype=object), n_images * per_image),
    })
    table["row_id"] = np.arange(len(table), dtype=np.int64)
    table["chunk"] = table["row_id"] // settings.chunk_size
    table["gallery"] = False
    return table


def _mark_gallery(rows: pd.DataFrame, settings: AttackSettings, *, model: int,
                  last_epoch: int) -> None:
    """Flag the rows whose borderline images are kept (see ``AttackSettings.gallery_images``):
    the first model's."""
    main = ((rows["kind"] == "main") & (rows["model"] == model) & (rows["epoch"] == last_epoch)
            & (rows["rank"] == 0))
    # the first k classes that have an image there (a class the checkpoint never gets right
    # has none, and the next class takes its place)
    shown = rows["source"].isin(sorted(rows.loc[main, "source"].unique())[:settings.gallery_images])
    if settings.mode == "targeted":
        aimed = rows["target"] == (rows["source"] + 1) % NUM_CLASSES
    else:
        aimed = pd.Series(True, index=rows.index)
    rows["gallery"] = main & shown & aimed


def _selection_digest(selection: Selection) -> str:
    text = selection.images.to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(text.encode()).hexdigest()


def plan_record(job: AttackJob) -> dict[str, Any]:
    """What ``job.json`` holds: the settings, the selection's digest and the job's size."""
    return {
        "settings": job.settings.to_json(),
        "selection_sha256": _selection_digest(job.selection),
        "rows": int(len(job.rows)),
        "chunks": int(len(job.chunks)),
    }
