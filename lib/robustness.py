"""The attack stage's job: which attacks to run, in resumable chunks, merged into tidy tables.

A job is planned from the run folder alone (``train/`` checkpoints and ``predictions.csv``) and
is a deterministic function of its settings:

1. **Selection** (:mod:`lib.selection`): per attacked epoch and class, the first
   ``n_per_class`` correctly classified test images in one seeded order.
2. **Rows**: per epoch, one row per (selected image, other class as target, schedule) in
   targeted mode, or per (image, schedule) in untargeted mode. Images are taken rank by rank
   across the classes (rank 0 of every class, then rank 1, ...), targets in label order,
   schedules in the given order. ``row_id`` numbers the rows of one epoch from 0; the key of an
   attack is ``(epoch, row_id)``.
3. **Chunks**: ``chunk_size`` consecutive rows of one *part* (an attacked epoch, or one lr0 of
   the sensitivity sweep) are the unit of work. Each chunk is one fresh engine call
   (:func:`lib.attack.iter_attack_rows`), so its float32 results are bit-identical however
   often and wherever it is re-run; a finished chunk is written atomically and never redone.
4. **Merge**: the chunks become ``results.csv``, ``traces.npz``, ``gallery.npz`` and
   ``lr0_sweep.csv``, sorted by key, so two runs give byte-identical files.

Files under the run folder's ``attack/``::

    job.json                      the settings and a digest of the selection (resume check)
    selection.csv                 epoch, image_id, label, rank
    shortfall.csv                 epoch, label, tool, wanted, available
    chunks/<part>/chunk_NNNNN.npz traces (lr, loss per iteration) and gallery images
    chunks/<part>/chunk_NNNNN.csv the chunk's result rows; written last: it marks the chunk done
    results.csv                   one row per attack (:data:`RESULT_COLUMNS`)
    traces.npz                    epoch, row_id [R]; lr, loss float32 [R, max_iter] (NaN after stop)
    gallery.npz                   a few attacks' original, borderline images and keys
    lr0_sweep.csv                 the lr0 sweep: lr0 plus the result columns

Running pieces (resume, and one process per shard of chunks)::

    job = plan_job(run_dir, settings)
    save_plan(job, run_dir)                            # idempotent; refuses a different plan
    run_chunks(job, run_dir, chunks=some_keys, device="cuda:1")
    merge(job, run_dir)                                # once every chunk is done

:func:`run_attack_stage` does all four.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib import NUM_CLASSES, io, stages
from lib import attack as engine
from lib import precision as precision_lib
from lib import schedules as schedule_registry
from lib.errors import ParameterError, RunFolderError
from lib.progress import progress_bar
from lib.selection import Selection, select_images

# The run folder's paths, which lib.stages owns; named here for this module's callers.
from lib.stages import CHUNK_DIR, attack_dir, checkpoint_path, chunk_files  # noqa: F401

#: Columns of ``results.csv``, one row per attack.
RESULT_COLUMNS: tuple[str, ...] = (
    "epoch", "schedule", "mode", "row_id", "image_id", "source", "target", "success",
    "iterations", "mean_lr", "l1", "l1_255", "l2", "linf", "target_prob", "final_class", "status",
    "refined_l1", "refined_l2", "refined_linf", "refine_forwards",
)
#: Columns of ``lr0_sweep.csv``: the lr0 of the row, then the result columns.
SWEEP_COLUMNS: tuple[str, ...] = ("lr0", *RESULT_COLUMNS)
#: Columns of the planned row table (:attr:`AttackJob.rows`).
ROW_COLUMNS: tuple[str, ...] = (
    "part", "kind", "epoch", "lr0", "row_id", "image_id", "rank", "source", "target",
    "schedule", "chunk", "gallery",
)

ATTACK_STAGE = "03_attack"
#: ``(checkpoint path, device) -> model``: how :func:`run_chunks` gets each epoch's model.
ModelLoader = Callable[[Path, torch.device], torch.nn.Module]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AttackSettings:
    """Everything that defines an attack job (what it computes, not where it runs).

    Attributes:
        epochs: checkpoints to attack; empty = every trained epoch.
        schedules: names in :data:`lib.schedules.SCHEDULES`, in the order rows use them.
        lr0: initial step size > 0 in [0, 1] pixel units.
        max_iter: update budget per attack (>= 1; the paper: 100).
        n_per_class: images per class and epoch (>= 1; the paper: 50).
        mode: ``"targeted"`` (every other class as target) or ``"untargeted"``.
        seed: the seed of the test-split permutation.
        batch_size: attacks in flight per engine pass; float32 results depend on it.
        chunk_size: rows per chunk, the unit of resume (>= 1; best a multiple of batch_size).
        schedule_constants: per schedule, its constants, e.g. ``{"step": {"drop": 0.5}}``.
        sweep_lr0: lr0 values of the sensitivity sweep; empty = no sweep. A value equal to
            ``lr0`` is not attacked again: its sweep rows are the main attack's rows of the same
            images at ``sweep_epoch`` (the same attacks, so the same results up to float32
            batching).
        sweep_per_class: images per class in the sweep (ranks 0 .. k-1 of the main selection).
        sweep_epoch: the epoch of the sweep; 0 = the last attacked epoch.
        gallery_images: for the last attacked epoch, the rank-0 images of the first k classes
            that have one are kept as pictures (every schedule; target ``(source + 1) mod 7``).
        precision: the engine's forward precision, ``"float32"``, ``"bfloat16"`` or ``"auto"``
            (:mod:`lib.precision`); successes are confirmed in float32 either way.
        refine_tolerance: None (no refinement) or > 0 in [0, 1] pixel units: the Linf width
            to which each success's last step is bisected (the ``refined_*`` columns).
    """

    epochs: tuple[int, ...] = ()
    schedules: tuple[str, ...] = tuple(schedule_registry.SCHEDULES)
    lr0: float = 1 / 255
    max_iter: int = 100
    n_per_class: int = 50
    mode: str = "targeted"
    seed: int = 0
    batch_size: int = 64
    chunk_size: int = 512
    schedule_constants: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    sweep_lr0: tuple[float, ...] = ()
    sweep_per_class: int = 0
    sweep_epoch: int = 0
    gallery_images: int = 7
    precision: str = "float32"
    refine_tolerance: float | None = None

    def __post_init__(self) -> None:
        # lists from notebooks and JSON become tuples, so settings compare and hash as values
        object.__setattr__(self, "epochs", tuple(int(e) for e in _sequence(self.epochs, "epochs")))
        object.__setattr__(self, "schedules", tuple(_sequence(self.schedules, "schedules")))
        object.__setattr__(self, "sweep_lr0", tuple(_sequence(self.sweep_lr0, "sweep_lr0")))
        object.__setattr__(
            self, "schedule_constants",
            {k: dict(v) for k, v in dict(self.schedule_constants or {}).items()},
        )
        self.check()

    def check(self) -> None:
        """Raise :class:`ParameterError` naming the first bad setting and how to fix it."""
        if not self.schedules:
            raise ParameterError(
                f"schedules is empty; name at least one of {', '.join(schedule_registry.SCHEDULES)}"
            )
        for name in self.schedules:
            schedule_registry.get_schedule(name)
        if len(set(self.schedules)) != len(self.schedules):
            raise ParameterError(f"schedules lists a name twice: {list(self.schedules)}")
        for name, constants in self.schedule_constants.items():
            if name not in self.schedules:
                raise ParameterError(
                    f"schedule_constants names {name!r}, which is not in schedules "
                    f"{list(self.schedules)}"
                )
            schedule_registry.bind(name, lr0=1.0, **constants)
        _positive_float(self.lr0, "lr0")
        for value in self.sweep_lr0:
            _positive_float(value, "every sweep_lr0 value")
        _int_at_least(self.max_iter, 1, "max_iter")
        _int_at_least(self.n_per_class, 1, "n_per_class")
        _int_at_least(self.seed, 0, "seed")
        _int_at_least(self.batch_size, 1, "batch_size")
        _int_at_least(self.chunk_size, 1, "chunk_size")
        _int_at_least(self.sweep_per_class, 0, "sweep_per_class")
        _int_at_least(self.sweep_epoch, 0, "sweep_epoch")
        _int_at_least(self.gallery_images, 0, "gallery_images")
        if self.sweep_per_class > self.n_per_class:
            raise ParameterError(
                f"sweep_per_class={self.sweep_per_class} exceeds n_per_class="
                f"{self.n_per_class}: the sweep attacks a subset of the main selection"
            )
        if self.mode not in engine.MODES:
            raise ParameterError(
                f"mode must be one of {', '.join(engine.MODES)}, got {self.mode!r}"
            )
        for epoch in self.epochs:
            _int_at_least(epoch, 1, "every epoch")
        precision_lib.check(self.precision)
        if self.refine_tolerance is not None:
            _positive_float(self.refine_tolerance, "refine_tolerance (None for no refinement)")

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        for key in ("epochs", "schedules", "sweep_lr0"):
            values[key] = list(values[key])
        return values


def _sequence(value: Any, name: str) -> tuple:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ParameterError(f"{name} must be a list, got {type(value).__name__} {value!r}")
    return tuple(value)


def _positive_float(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        math.isfinite(value) and value > 0
    ):
        raise ParameterError(f"{name} must be a finite number > 0 (pixel units), got {value!r}")


def _int_at_least(value: Any, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParameterError(f"{name} must be an int >= {low}, got {value!r}")


# --------------------------------------------------------------------------- the run folder


def settings_from_parameters(parameters: Mapping[str, Any]) -> AttackSettings:
    """The :class:`AttackSettings` of the attack stage's parameters: the one conversion.

    Parameters named like a settings field set it; the attack notebook's other parameters
    and the runtime ones (``run_dir``, ``device``, ``overwrite``, ``progress``, ...) do not
    change what is computed. Any other name is an error, so a misspelt parameter never
    passes silently.
    """
    fields = {f.name for f in dataclasses.fields(AttackSettings)}
    known = fields | stages.RUNTIME_PARAMETERS
    if stages.notebook_path(ATTACK_STAGE).exists():
        known |= set(stages.notebook_defaults(ATTACK_STAGE))
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ParameterError(
            f"unknown attack parameter(s) {', '.join(unknown)}; the settings are "
            f"{', '.join(sorted(fields))}"
        )
    return AttackSettings(**{k: v for k, v in parameters.items() if k in fields})


def trained_epochs(run_dir: str | os.PathLike[str]) -> list[int]:
    """Epochs with a checkpoint ``train/epoch_NN.safetensors`` and a ``metrics.csv`` row.

    Raises:
        RunFolderError: the run folder does not exist or has no finished epoch.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(
            f"run folder {run_dir} does not exist; run the data (01_data) and training "
            "(02_train) stages first, or name an existing run folder with run_dir"
        )
    train = stages.train_dir(run_dir)
    epochs = stages.logged_epochs(train)
    if not epochs:
        raise RunFolderError(
            f"{train} holds no checkpoints (epoch_NN.safetensors with a metrics.csv row); "
            "run the training stage (02_train) first"
        )
    return epochs


def resolve_epochs(run_dir: str | os.PathLike[str], epochs: Sequence[int]) -> list[int]:
    """The epochs to attack, sorted: ``epochs``, or every trained epoch when it is empty.

    Raises:
        RunFolderError: no checkpoints (run 02_train).
        ParameterError: an epoch that was not trained.
    """
    trained = trained_epochs(run_dir)
    if not epochs:
        return trained
    missing = sorted(set(epochs) - set(trained))
    if missing:
        raise ParameterError(
            f"epoch(s) {missing} were not trained: {stages.train_dir(run_dir)} has checkpoints for "
            f"epochs {_ranges(trained)}; choose epochs among those (or [] for all), or train "
            f"longer (02_train with epochs >= {max(missing)})"
        )
    return sorted(set(int(e) for e in epochs))


def _ranges(values: Sequence[int]) -> str:
    values = sorted(values)
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def read_predictions(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``train/predictions.csv``; RunFolderError naming the training stage if it is missing."""
    path = stages.train_table(stages.train_dir(run_dir), "predictions")
    if not path.is_file():
        raise RunFolderError(f"{path} is missing; run the training stage (02_train) first")
    return pd.read_csv(path, dtype={"image_id": str})


# --------------------------------------------------------------------------- the plan


@dataclass
class AttackJob:
    """A planned attack job.

    Attributes:
        settings: the :class:`AttackSettings`, with ``epochs`` and ``sweep_epoch`` resolved.
        selection: the attacked images (and the shortfall report).
        rows: one row per attack, columns :data:`ROW_COLUMNS`; ``part`` is ``"epoch_NN"`` for
            the main attack or ``"sweep_KK"`` for the k-th sweep lr0.
        chunks: one row per chunk: ``part``, ``chunk`` (0-based within the part), ``epoch``,
            ``lr0``, ``rows`` (count), ``kind`` (``"main"`` or ``"sweep"``). Its index order is
            the order of work; ``(part, chunk)`` is a chunk's key.
    """

    settings: AttackSettings
    selection: Selection
    rows: pd.DataFrame
    chunks: pd.DataFrame

    def chunk_rows(self, part: str, chunk: int) -> pd.DataFrame:
        return self.rows[(self.rows["part"] == part) & (self.rows["chunk"] == chunk)]


def plan_job(run_dir: str | os.PathLike[str], settings: AttackSettings) -> AttackJob:
    """Plan the job from the run folder's training tables (no images are read).

    Raises:
        RunFolderError: no checkpoints or predictions (run 02_train).
        ParameterError: an epoch or sweep epoch that was not trained or not attacked, or an
            epoch with no correctly classified test image (nothing to attack).
    """
    epochs = resolve_epochs(run_dir, settings.epochs)
    sweep_epoch = settings.sweep_epoch or epochs[-1]
    if settings.sweep_lr0 and settings.sweep_per_class and sweep_epoch not in epochs:
        raise ParameterError(
            f"sweep_epoch={sweep_epoch} is not among the attacked epochs {epochs}; choose one "
            "of them or 0 (the last)"
        )
    settings = AttackSettings(**{**settings.to_json(), "epochs": epochs,
                                 "sweep_epoch": sweep_epoch})
    selection = select_images(
        read_predictions(run_dir), n_per_class=settings.n_per_class, seed=settings.seed,
        epochs=epochs,
    )
    counts = selection.images.groupby("epoch").size().reindex(epochs, fill_value=0)
    empty = counts[counts == 0].index.tolist()
    if empty:
        raise ParameterError(
            f"empty selection: at epoch(s) {empty} the checkpoint classifies no test image "
            "correctly, so there is nothing to attack; leave those epochs out, or train longer "
            "(02_train)"
        )
    parts = [_part_rows(selection.images, settings, epoch=e, kind="main",
                        lr0=settings.lr0, name=f"epoch_{e:02d}") for e in epochs]
    if settings.sweep_lr0 and settings.sweep_per_class:
        chosen = selection.images[selection.images["rank"] < settings.sweep_per_class]
        parts += [_part_rows(chosen, settings, epoch=sweep_epoch, kind="sweep", lr0=value,
                             name=f"sweep_{k:02d}")
                  for k, value in enumerate(settings.sweep_lr0) if value != settings.lr0]
    rows = pd.concat(parts, ignore_index=True)
    _mark_gallery(rows, settings, last_epoch=epochs[-1])
    chunks = (
        rows.groupby(["part", "chunk"], sort=False)
        .agg(epoch=("epoch", "first"), lr0=("lr0", "first"), rows=("row_id", "size"),
             kind=("kind", "first"))
        .reset_index()
    )
    return AttackJob(settings=settings, selection=selection,
                     rows=rows[list(ROW_COLUMNS)].reset_index(drop=True), chunks=chunks)


def _part_rows(images: pd.DataFrame, settings: AttackSettings, *, epoch: int, kind: str,
               lr0: float, name: str) -> pd.DataFrame:
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


def _mark_gallery(rows: pd.DataFrame, settings: AttackSettings, *, last_epoch: int) -> None:
    """Flag the rows whose borderline images are kept (see ``AttackSettings.gallery_images``)."""
    main = (rows["kind"] == "main") & (rows["epoch"] == last_epoch) & (rows["rank"] == 0)
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


def save_plan(job: AttackJob, run_dir: str | os.PathLike[str]) -> None:
    """Write ``job.json``, ``selection.csv`` and ``shortfall.csv``; idempotent.

    Raises:
        RunFolderError: the folder holds a job with other settings or another selection
            (its chunks must not be mixed with this job's).
    """
    record = plan_record(job)
    path = stages.attack_file(run_dir, "job")
    if path.is_file():
        recorded = io.read_json(path)
        if recorded != record:
            diff = [f"  {k}: folder {recorded.get(k)!r}, now {record.get(k)!r}"
                    for k in sorted(set(recorded) | set(record))
                    if recorded.get(k) != record.get(k)]
            raise RunFolderError(
                f"{path} describes another attack job:\n" + "\n".join(diff)
                + "\nIts chunks cannot be continued with these settings: use a new run folder, "
                "or rerun the stage with overwrite to discard attack/"
            )
        return
    io.write_csv(stages.attack_file(run_dir, "selection"), job.selection.images)
    io.write_csv(stages.attack_file(run_dir, "shortfall"), job.selection.shortfall)
    io.write_json(path, record)


# --------------------------------------------------------------------------- running chunks


def pending_chunks(job: AttackJob, run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The rows of ``job.chunks`` whose results are not written yet."""
    keys = zip(job.chunks["part"], job.chunks["chunk"], strict=True)
    done = [chunk_files(run_dir, part, chunk)[0].is_file() for part, chunk in keys]
    return job.chunks[~np.array(done, dtype=bool)]


def run_chunks(
    job: AttackJob,
    run_dir: str | os.PathLike[str],
    *,
    chunks: Iterable[tuple[str, int]] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    load_model: ModelLoader | None = None,
) -> int:
    """Attack the rows of the job's pending chunks and write each chunk atomically.

    Args:
        job: from :func:`plan_job`.
        run_dir: the run folder (its ``attack/`` receives the chunks).
        chunks: ``(part, chunk)`` keys to consider (e.g. this process's shard); default all.
            Chunks already written are skipped.
        device: "cpu", "cuda" or "cuda:N".
        progress: a progress bar over the attack rows (:mod:`lib.progress`).
        load_model: ``(checkpoint path, device) -> model`` on that device in float32; default
            :func:`lib.model.load_checkpoint` (tests pass a small model here).

    Returns:
        The number of chunks attacked by this call.
    """
    from lib import datasets
    from lib import model as model_lib

    save_plan(job, run_dir)
    todo = pending_chunks(job, run_dir)
    if chunks is not None:
        wanted = {(str(p), int(c)) for p, c in chunks}
        unknown = wanted - set(zip(job.chunks["part"], job.chunks["chunk"], strict=True))
        if unknown:
            raise ParameterError(f"chunk keys {sorted(unknown)[:3]} are not in the job")
        todo = todo[[(p, c) in wanted for p, c in zip(todo["part"], todo["chunk"], strict=True)]]
    if todo.empty:
        return 0
    device = model_lib.resolve_device(device)
    if load_model is None:
        def load_model(path: Path, device: torch.device) -> torch.nn.Module:
            return model_lib.load_checkpoint(path, map_location=device)
    test_set = datasets.load_run_split(run_dir, "test")
    pool_ids = sorted(job.rows["image_id"].unique())
    position = pd.Series(np.arange(len(test_set)), index=test_set.index["image_id"].to_numpy())
    missing = [i for i in pool_ids if i not in position.index]
    if missing:
        raise RunFolderError(
            f"{len(missing)} selected image(s) (first {missing[0]!r}) are not in the test split "
            "of data/frames.csv; the data and training stages disagree: rerun 02_train"
        )
    pool = test_set.images[torch.from_numpy(position.loc[pool_ids].to_numpy(np.int64, copy=True))]
    pool_index = pd.Series(np.arange(len(pool_ids)), index=pool_ids)

    bar = progress_bar(int(todo["rows"].sum()), desc="attacks", unit="attack", enabled=progress)
    models: dict[int, torch.nn.Module] = {}
    with bar:
        work = todo[["part", "chunk", "epoch", "lr0"]].itertuples(index=False)
        for part, chunk, epoch, lr0 in work:
            if epoch not in models:
                models.clear()  # one checkpoint in memory at a time
                models[epoch] = load_model(checkpoint_path(run_dir, epoch), device)
            rows = job.chunk_rows(part, chunk)
            _run_chunk(models[epoch], pool, pool_index, rows, job.settings, lr0=lr0,
                       device=device, files=chunk_files(run_dir, part, chunk), bar=bar)
    return len(todo)


def _run_chunk(model, pool, pool_index, rows: pd.DataFrame, settings: AttackSettings, *,
               lr0: float, device, files: tuple[Path, Path], bar) -> None:
    engine_rows = pd.DataFrame({
        "row_id": rows["row_id"].to_numpy(np.int64),
        "image": pool_index.loc[rows["image_id"]].to_numpy(np.int64),
        "source": rows["source"].to_numpy(np.int64),
        "target": rows["target"].to_numpy(np.int64),
        "schedule": rows["schedule"].to_numpy(),
    })
    present = set(engine_rows["schedule"])
    constants = {k: v for k, v in settings.schedule_constants.items() if k in present}
    kept = rows.loc[rows["gallery"], "row_id"].to_numpy(np.int64, copy=True)
    gallery_ids = torch.from_numpy(kept)
    pieces, gallery = [], []
    stream = engine.iter_attack_rows(
        model, pool, engine_rows, lr0=float(lr0), max_iter=settings.max_iter, mode=settings.mode,
        batch_size=settings.batch_size, device=device, dtype=torch.float32,
        schedule_constants=constants, keep_images=len(gallery_ids) > 0,
        precision=settings.precision, refine_tolerance=settings.refine_tolerance,
    )
    for piece in stream:
        if piece.borderline is not None:
            keep = torch.isin(piece.row_id, gallery_ids)
            if keep.any():
                gallery.append((piece.row_id[keep], piece.borderline[keep]))
            piece.borderline = None  # drop the other images at once
        pieces.append(piece)
        bar.update(len(piece))
    result = engine.AttackResult.concat(pieces).sorted()
    table = _result_table(rows, result, settings)
    csv_path, npz_path = files
    arrays: dict[str, np.ndarray] = {
        "row_id": result.row_id.numpy(),
        "lr": result.lr_trace.float().numpy(),
        "loss": result.loss_trace.float().numpy(),
    }
    if gallery:
        ids = torch.cat([g[0] for g in gallery])
        order = torch.argsort(ids)
        images = torch.cat([g[1] for g in gallery])[order]
        arrays["gallery_row_id"] = ids[order].numpy()
        arrays["gallery_borderline"] = images.float().numpy()
        image_ids = rows.set_index("row_id").loc[ids[order].numpy(), "image_id"]
        arrays["gallery_original"] = pool[torch.from_numpy(
            pool_index.loc[image_ids].to_numpy(np.int64, copy=True))].numpy()
    io.write_npz(npz_path, **arrays)
    io.write_csv(csv_path, table)  # last: its presence marks the chunk done


def _result_table(rows: pd.DataFrame, result: engine.AttackResult,
                  settings: AttackSettings) -> pd.DataFrame:
    frame = result.to_frame()
    keys = rows[["row_id", "epoch", "schedule", "image_id", "source", "target"]]
    table = keys.merge(frame, on="row_id", how="left", validate="one_to_one")
    if table["status"].isna().any():
        raise RuntimeError("the engine returned no result for some rows of a chunk")
    table["mode"] = settings.mode
    table["l1_255"] = table["l1"] * 255
    return table.sort_values("row_id", kind="stable")[list(RESULT_COLUMNS)]


# --------------------------------------------------------------------------- merging


def _read_chunk_csv(path: Path) -> pd.DataFrame:
    # pandas >= 3 parses floats exactly as written, so merged files are byte-stable
    return pd.read_csv(path, dtype={"image_id": str, "status": str, "schedule": str,
                                    "mode": str}, keep_default_na=False, na_values=[""])


def _read_chunks(job: AttackJob, run_dir: str | os.PathLike[str]) -> tuple[list, list, list, list]:
    """Every finished chunk of ``job``: main tables, sweep tables, traces, gallery pieces."""
    main_tables, sweep_tables, traces, gallery = [], [], [], []
    work = job.chunks[["part", "chunk", "kind", "lr0"]].itertuples(index=False)
    for part, chunk, kind, lr0 in work:
        csv_path, npz_path = chunk_files(run_dir, part, chunk)
        table = _read_chunk_csv(csv_path)
        planned = job.chunk_rows(part, chunk)["row_id"].to_numpy()
        if not np.array_equal(table["row_id"].to_numpy(), planned):
            raise RunFolderError(
                f"{csv_path} holds other rows than the plan; delete attack/chunks and rerun "
                "the attack stage"
            )
        if kind == "sweep":
            sweep_tables.append(table.assign(lr0=lr0))
            continue
        main_tables.append(table)
        if not npz_path.is_file():
            raise RunFolderError(f"{npz_path} is missing; delete {csv_path} and rerun the stage")
        arrays = io.read_npz(npz_path)
        epoch = int(table["epoch"].iloc[0])
        traces.append((np.full(len(arrays["row_id"]), epoch), arrays["row_id"],
                       arrays["lr"], arrays["loss"]))
        if "gallery_row_id" in arrays:
            gallery.append((epoch, arrays["gallery_row_id"], arrays["gallery_original"],
                            arrays["gallery_borderline"]))
    return main_tables, sweep_tables, traces, gallery


def _write_gallery(run_dir: str | os.PathLike[str], results: pd.DataFrame,
                   gallery: list) -> Path:
    """``gallery.npz``: the gallery images of every epoch with their result rows' keys."""
    keyed = results.set_index(["epoch", "row_id"])
    epochs = np.concatenate([np.full(len(g[1]), g[0]) for g in gallery])
    row_ids = np.concatenate([g[1] for g in gallery])
    info = keyed.loc[list(zip(epochs.tolist(), row_ids.tolist(), strict=True))]
    io.write_npz(
        stages.attack_file(run_dir, "gallery"),
        epoch=epochs.astype(np.int64),
        row_id=row_ids.astype(np.int64),
        image_id=info["image_id"].to_numpy(str),
        schedule=info["schedule"].to_numpy(str),
        source=info["source"].to_numpy(np.int64),
        target=info["target"].to_numpy(np.int64),
        original=np.concatenate([g[2] for g in gallery]),
        borderline=np.concatenate([g[3] for g in gallery]),
    )
    return stages.attack_file(run_dir, "gallery")


def _main_rows_in_sweep(job: AttackJob, results: pd.DataFrame) -> list[pd.DataFrame]:
    """The sweep's rows at the main lr0, taken from the main results (see ``sweep_lr0``).

    The main part of the sweep epoch lists its images rank by rank, so the images of the sweep
    (ranks below ``sweep_per_class``) come first, with the row ids a sweep part would give them.
    """
    settings = job.settings
    if not (settings.sweep_per_class and settings.lr0 in settings.sweep_lr0):
        return []
    rows = job.rows
    swept = rows[(rows["kind"] == "main") & (rows["epoch"] == settings.sweep_epoch)
                 & (rows["rank"] < settings.sweep_per_class)]
    table = results[(results["epoch"] == settings.sweep_epoch)
                    & results["row_id"].isin(swept["row_id"])]
    return [table.assign(lr0=settings.lr0)]


def merge(job: AttackJob, run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Merge the written chunks into the stage's tables; every chunk must be done.

    Returns:
        The paths written, by name: ``results``, ``traces``, ``gallery`` (if any gallery rows),
        ``lr0_sweep`` (if the job has a sweep).

    Raises:
        RunFolderError: some chunks have no results yet (run :func:`run_chunks` again), or a
            chunk's rows do not match the plan.
    """
    missing = pending_chunks(job, run_dir)
    if not missing.empty:
        first = missing.iloc[0]
        raise RunFolderError(
            f"{len(missing)} of {len(job.chunks)} chunks have no results yet (first: "
            f"{first['part']} chunk {first['chunk']}); run the attack stage (03_attack) again "
            "to finish them (finished chunks are kept)"
        )
    main_tables, sweep_tables, traces, gallery = _read_chunks(job, run_dir)
    written: dict[str, Path] = {}
    results = pd.concat(main_tables, ignore_index=True).sort_values(
        ["epoch", "row_id"], kind="stable")[list(RESULT_COLUMNS)]
    io.write_csv(stages.attack_file(run_dir, "results"), results)
    written["results"] = stages.attack_file(run_dir, "results")
    io.write_npz(
        stages.attack_file(run_dir, "traces"),
        epoch=np.concatenate([t[0] for t in traces]).astype(np.int64),
        row_id=np.concatenate([t[1] for t in traces]).astype(np.int64),
        lr=np.concatenate([t[2] for t in traces]),
        loss=np.concatenate([t[3] for t in traces]),
    )
    written["traces"] = stages.attack_file(run_dir, "traces")
    if gallery:
        written["gallery"] = _write_gallery(run_dir, results, gallery)
    sweep_tables += _main_rows_in_sweep(job, results)
    if sweep_tables:
        sweep = pd.concat(sweep_tables, ignore_index=True).sort_values(
            ["lr0", "row_id"], kind="stable")[list(SWEEP_COLUMNS)]
        io.write_csv(stages.attack_file(run_dir, "lr0_sweep"), sweep)
        written["lr0_sweep"] = stages.attack_file(run_dir, "lr0_sweep")
    return written


def run_attack_stage(
    run_dir: str | os.PathLike[str],
    settings: AttackSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    load_model: ModelLoader | None = None,
) -> AttackJob:
    """Plan, save the plan, attack every pending chunk and merge: the whole stage in one call.

    A rerun in the same folder skips finished chunks, so an interrupted stage loses at most
    the chunk in flight.
    """
    job = plan_job(run_dir, settings)
    save_plan(job, run_dir)
    run_chunks(job, run_dir, device=device, progress=progress, load_model=load_model)
    merge(job, run_dir)
    return job
