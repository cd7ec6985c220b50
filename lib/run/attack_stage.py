"""The attack stage's work on the run folder: plan, attack in resumable chunks, merge the tables.

The plan (:mod:`lib.attack.plan`) comes from the run folder's training tables
(:func:`plan_job`); each chunk is one fresh engine call
(:func:`lib.attack.api.iter_attack_rows`), so its float32 results are bit-identical however
often and wherever it is re-run; a finished chunk is written atomically and never redone. The
merge turns the chunks into ``results.csv``, ``traces.npz``, ``gallery.npz`` and
``lr0_sweep.csv``, sorted by key, so two runs give byte-identical files.

Files under the run folder's ``attack/``::

    job.json                      the settings and a digest of the selection (resume check)
    selection.csv                 model, epoch, image_id, label, rank
    shortfall.csv                 model, epoch, label, tool, wanted, available
    chunks/<part>/chunk_NNNNN.npz traces (lr, loss per iteration) and gallery images
    chunks/<part>/chunk_NNNNN.csv the chunk's result rows; written last: it marks the chunk done
    results.csv                   one row per attack (:data:`~lib.run.tables.RESULT_COLUMNS`)
    traces.npz                    model, epoch, row_id [R]; lr, loss float32 [R, max_iter]
                                  (NaN after the stop)
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

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.attack import api
from lib.attack.plan import AttackJob, AttackSettings, plan_attacks, plan_record
from lib.attack.results import AttackResult
from lib.errors import ParameterError, RunFolderError
from lib.progress import progress_bar
from lib.run import layout, tables
from lib.run.tables import RESULT_COLUMNS, SWEEP_COLUMNS
from lib.train.resume import logged_epochs

#: ``(checkpoint path, device) -> model``: how :func:`run_chunks` gets each epoch's model.
ModelLoader = Callable[[Path, torch.device], torch.nn.Module]


def _check_exists(run_dir: str | os.PathLike[str]) -> None:
    if not Path(run_dir).is_dir():
        raise RunFolderError(
            f"run folder {run_dir} does not exist; run the data (01_data) and training "
            "(02_train) stages first, or name an existing run folder with run_dir"
        )


def trained_epochs(run_dir: str | os.PathLike[str], *, model: int) -> list[int]:
    """Epochs of the model of seed ``model`` with a checkpoint ``epoch_NN.safetensors`` and a
    ``metrics.csv`` row in its folder.

    Raises:
        RunFolderError: the run folder does not exist or the model has no finished epoch.
    """
    _check_exists(run_dir)
    train = layout.model_dir(run_dir, model)
    epochs = logged_epochs(train)
    if not epochs:
        raise RunFolderError(
            f"{train} holds no checkpoints (epoch_NN.safetensors with a metrics.csv row); "
            "run the training stage (02_train) first"
        )
    return epochs


def resolve_models(run_dir: str | os.PathLike[str], models: Sequence[int]) -> list[int]:
    """The models to attack: ``models``, or every trained model when it is empty.

    Raises:
        RunFolderError: no run folder, or no trained model in it (run 02_train).
        ParameterError: a model that was not trained.
    """
    _check_exists(run_dir)
    trained = list(layout.model_dirs(run_dir))
    if not trained:
        raise RunFolderError(
            f"{layout.train_dir(run_dir)} holds no trained model (no seed_S folder with "
            "checkpoints); run the training stage (02_train) first"
        )
    missing = sorted(set(models) - set(trained))
    if missing:
        raise ParameterError(
            f"model(s) {missing} were not trained: {layout.train_dir(run_dir)} has the models "
            f"of seeds {trained}; choose models among those (or [] for all), or train them "
            "(02_train with those seeds)"
        )
    return list(models) or trained


def resolve_epochs(run_dir: str | os.PathLike[str], epochs: Sequence[int], *,
                   model: int) -> list[int]:
    """The epochs of model ``model`` to attack, sorted: ``epochs``, or every trained epoch
    when it is empty.

    Raises:
        RunFolderError: no checkpoints (run 02_train).
        ParameterError: an epoch that was not trained.
    """
    trained = trained_epochs(run_dir, model=model)
    if not epochs:
        return trained
    missing = sorted(set(epochs) - set(trained))
    if missing:
        raise ParameterError(
            f"epoch(s) {missing} were not trained: {layout.model_dir(run_dir, model)} has "
            f"checkpoints for epochs {_ranges(trained)}; choose epochs among those (or [] for "
            f"all), or train longer (02_train with epochs >= {max(missing)})"
        )
    return sorted(set(int(e) for e in epochs))


def attacked_epochs(run_dir: str | os.PathLike[str],
                    settings: AttackSettings) -> dict[int, list[int]]:
    """The epochs to attack per model, the first model first: ``settings.epochs`` for the
    first, ``settings.replicate_epochs`` (default: the first and the last of the first
    model's) for the others.

    Raises:
        RunFolderError, ParameterError: see :func:`resolve_models` and :func:`resolve_epochs`.
    """
    models = resolve_models(run_dir, settings.models)
    first = resolve_epochs(run_dir, settings.epochs, model=models[0])
    wanted = settings.replicate_epochs or sorted({first[0], first[-1]})
    return {model: first if k == 0 else resolve_epochs(run_dir, wanted, model=model)
            for k, model in enumerate(models)}


def _ranges(values: Sequence[int]) -> str:
    values = sorted(values)
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def plan_job(run_dir: str | os.PathLike[str], settings: AttackSettings) -> AttackJob:
    """Plan the job from the run folder's training tables (no images are read):
    :func:`lib.attack.plan.plan_attacks` on every model's ``predictions.csv`` and the epochs
    :func:`attacked_epochs` finds.

    Raises:
        RunFolderError: no checkpoints or predictions (run 02_train).
        ParameterError: a model, epoch or sweep epoch that was not trained or not attacked, or
            an epoch with no correctly classified test image (nothing to attack).
    """
    epochs = attacked_epochs(run_dir, settings)
    predictions = tables.read_predictions(run_dir)
    return plan_attacks(settings, predictions[predictions["model"].isin(list(epochs))],
                        epochs=epochs)


def save_plan(job: AttackJob, run_dir: str | os.PathLike[str]) -> None:
    """Write ``job.json``, ``selection.csv`` and ``shortfall.csv``; idempotent.

    Raises:
        RunFolderError: the folder holds a job with other settings or another selection
            (its chunks must not be mixed with this job's).
    """
    record = plan_record(job)
    recorded = tables.read_record(run_dir, "job", missing_ok=True)
    if recorded is not None:
        if recorded != record:
            diff = [f"  {k}: folder {recorded.get(k)!r}, now {record.get(k)!r}"
                    for k in sorted(set(recorded) | set(record))
                    if recorded.get(k) != record.get(k)]
            raise RunFolderError(
                f"{tables.record_path(run_dir, 'job')} describes another attack job:\n"
                + "\n".join(diff)
                + "\nIts chunks cannot be continued with these settings: use a new run folder, "
                "or rerun the stage with overwrite to discard attack/"
            )
        return
    tables.write_table(run_dir, "selection", job.selection.images)
    tables.write_table(run_dir, "shortfall", job.selection.shortfall)
    tables.write_record(run_dir, "job", record)


def pending_chunks(job: AttackJob, run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The rows of ``job.chunks`` whose results are not written yet."""
    keys = zip(job.chunks["part"], job.chunks["chunk"], strict=True)
    done = [tables.chunk_done(run_dir, part, chunk) for part, chunk in keys]
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
            :func:`lib.model.checkpoints.load_checkpoint` (tests pass a small model here).

    Returns:
        The number of chunks attacked by this call.
    """
    from lib.model import checkpoints, network
    from lib.run import data_stage

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
    device = network.resolve_device(device)
    if load_model is None:
        def load_model(path: Path, device: torch.device) -> torch.nn.Module:
            return checkpoints.load_checkpoint(path, map_location=device)
    test_set = data_stage.load_run_split(run_dir, "test")
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
    loaded: dict[tuple[int, int], torch.nn.Module] = {}
    with bar:
        work = todo[["part", "chunk", "model", "epoch", "lr0"]].itertuples(index=False)
        for part, chunk, model, epoch, lr0 in work:
            if (model, epoch) not in loaded:
                loaded.clear()  # one checkpoint in memory at a time
                loaded[model, epoch] = load_model(
                    layout.checkpoint_path(run_dir, epoch, model=model), device)
            rows = job.chunk_rows(part, chunk)
            table, arrays = _run_chunk(loaded[model, epoch], pool, pool_index, rows,
                                       job.settings, lr0=lr0, bar=bar)
            tables.write_chunk(run_dir, part, chunk, table, arrays)
    return len(todo)


def _run_chunk(model, pool, pool_index, rows: pd.DataFrame, settings: AttackSettings, *,
               lr0: float, bar) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Attack one chunk's rows: its result rows and its arrays (traces, gallery images)."""
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
    stream = api.iter_attack_rows(
        model, pool, engine_rows, targeted=settings.mode == "targeted", lr0=float(lr0),
        max_iter=settings.max_iter, batch_size=settings.batch_size,
        precision=settings.precision, refine_tolerance=settings.refine_tolerance,
        certify=settings.certify, schedule_constants=constants,
        keep_images=len(gallery_ids) > 0,
    )
    for piece in stream:
        if piece.borderline is not None:
            keep = torch.isin(piece.row_id, gallery_ids)
            if keep.any():
                gallery.append((piece.row_id[keep], piece.borderline[keep]))
            piece.borderline = None  # drop the other images at once
        pieces.append(piece)
        bar.update(len(piece))
    result = AttackResult.concat(pieces).sorted()
    table = _result_table(rows, result, settings)
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
    return table, arrays


def _result_table(rows: pd.DataFrame, result: AttackResult,
                  settings: AttackSettings) -> pd.DataFrame:
    frame = result.to_frame()
    keys = rows[["row_id", "model", "epoch", "schedule", "image_id", "source", "target"]]
    table = keys.merge(frame, on="row_id", how="left", validate="one_to_one")
    if table["status"].isna().any():
        raise RuntimeError("the engine returned no result for some rows of a chunk")
    table["mode"] = settings.mode
    table["l1_255"] = table["l1"] * 255
    return table.sort_values("row_id", kind="stable")[list(RESULT_COLUMNS)]


def _read_chunks(job: AttackJob, run_dir: str | os.PathLike[str]) -> tuple[list, list, list, list]:
    """Every finished chunk of ``job``: main tables, sweep tables, traces, gallery pieces."""
    main_tables, sweep_tables, traces, gallery = [], [], [], []
    work = job.chunks[["part", "chunk", "kind", "lr0"]].itertuples(index=False)
    for part, chunk, kind, lr0 in work:
        table = tables.read_chunk(run_dir, part, chunk)
        planned = job.chunk_rows(part, chunk)["row_id"].to_numpy()
        if not np.array_equal(table["row_id"].to_numpy(), planned):
            raise RunFolderError(
                f"{layout.chunk_files(run_dir, part, chunk)[0]} holds other rows than the plan; "
                "delete attack/chunks and rerun the attack stage"
            )
        if kind == "sweep":
            sweep_tables.append(table.assign(lr0=lr0))
            continue
        main_tables.append(table)
        arrays = tables.read_chunk_arrays(run_dir, part, chunk)
        model, epoch = int(table["model"].iloc[0]), int(table["epoch"].iloc[0])
        count = len(arrays["row_id"])
        traces.append((np.full(count, model), np.full(count, epoch), arrays["row_id"],
                       arrays["lr"], arrays["loss"]))
        if "gallery_row_id" in arrays:
            gallery.append(((model, epoch), arrays["gallery_row_id"],
                            arrays["gallery_original"], arrays["gallery_borderline"]))
    return main_tables, sweep_tables, traces, gallery


def _write_gallery(run_dir: str | os.PathLike[str], results: pd.DataFrame,
                   gallery: list) -> Path:
    """``gallery.npz``: the gallery images of every epoch with their result rows' keys."""
    keyed = results.set_index(["model", "epoch", "row_id"])
    models = np.concatenate([np.full(len(g[1]), g[0][0]) for g in gallery])
    epochs = np.concatenate([np.full(len(g[1]), g[0][1]) for g in gallery])
    row_ids = np.concatenate([g[1] for g in gallery])
    info = keyed.loc[list(zip(models.tolist(), epochs.tolist(), row_ids.tolist(), strict=True))]
    return tables.write_arrays(
        run_dir, "gallery",
        model=models.astype(np.int64),
        epoch=epochs.astype(np.int64),
        row_id=row_ids.astype(np.int64),
        image_id=info["image_id"].to_numpy(str),
        schedule=info["schedule"].to_numpy(str),
        source=info["source"].to_numpy(np.int64),
        target=info["target"].to_numpy(np.int64),
        original=np.concatenate([g[2] for g in gallery]),
        borderline=np.concatenate([g[3] for g in gallery]),
    )


def _main_rows_in_sweep(job: AttackJob, results: pd.DataFrame) -> list[pd.DataFrame]:
    """The sweep's rows at the main lr0, taken from the main results (see ``sweep_lr0``).

    The main part of the sweep epoch lists its images rank by rank, so the images of the sweep
    (ranks below ``sweep_per_class``) come first, with the row ids a sweep part would give them.
    """
    settings = job.settings
    if not (settings.sweep_per_class and settings.lr0 in settings.sweep_lr0):
        return []
    rows = job.rows
    first = settings.models[0]
    swept = rows[(rows["kind"] == "main") & (rows["model"] == first)
                 & (rows["epoch"] == settings.sweep_epoch)
                 & (rows["rank"] < settings.sweep_per_class)]
    table = results[(results["model"] == first) & (results["epoch"] == settings.sweep_epoch)
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
        ["model", "epoch", "row_id"], kind="stable")[list(RESULT_COLUMNS)]
    written["results"] = tables.write_table(run_dir, "results", results)
    written["traces"] = tables.write_arrays(
        run_dir, "traces",
        model=np.concatenate([t[0] for t in traces]).astype(np.int64),
        epoch=np.concatenate([t[1] for t in traces]).astype(np.int64),
        row_id=np.concatenate([t[2] for t in traces]).astype(np.int64),
        lr=np.concatenate([t[3] for t in traces]),
        loss=np.concatenate([t[4] for t in traces]),
    )
    if gallery:
        written["gallery"] = _write_gallery(run_dir, results, gallery)
    sweep_tables += _main_rows_in_sweep(job, results)
    if sweep_tables:
        sweep = pd.concat(sweep_tables, ignore_index=True).sort_values(
            ["lr0", "row_id"], kind="stable")[list(SWEEP_COLUMNS)]
        written["lr0_sweep"] = tables.write_table(run_dir, "lr0_sweep", sweep)
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
