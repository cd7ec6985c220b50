"""The minimality stage's work on the run folder: choose the pairs, attack them, keep the tables.

:func:`reference_tables` picks, for each compared checkpoint, the first (image, target) pairs of
the attack stage's targeted results, runs every reference attack of
:mod:`lib.attack.reference` on them with that checkpoint, and writes ``reference.csv`` and
``timings.csv`` into the stage's folder; a finished step is read back, never repeated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from lib import io
from lib.attack.reference import run_reference_attacks
from lib.run import layout


@dataclass(frozen=True)
class ReferenceTables:
    """What the minimality stage compares: the checkpoints, our attacks, the references."""

    #: the attacked checkpoints compared (the ``epochs`` asked, or the last attacked one)
    epochs: list[int]
    #: the attack stage's targeted results on those checkpoints (results.csv rows)
    ours: pd.DataFrame
    #: one row per (pair, reference attack, budget), as :func:`run_reference_attacks`
    #: returns it without ``seconds`` (the times are in ``timings.csv``)
    reference: pd.DataFrame


def reference_tables(
    run_dir: str | os.PathLike[str],
    *,
    epochs: Sequence[int],
    n_pairs: int,
    steps: Sequence[int],
    attacks: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> ReferenceTables:
    """The minimality stage's reference step: pick the pairs, attack them, write the files.

    For each checkpoint of ``epochs`` (empty: the last attacked one) the first ``n_pairs``
    distinct (image, target) pairs of the attack stage's targeted results are attacked by
    every reference attack at every budget of ``steps``, on the test images of the run
    folder and the checkpoint of that epoch. ``reference.csv`` (results) and ``timings.csv``
    (seconds per pair, which differ from run to run) are written to the stage's folder; when
    ``reference.csv`` exists it is read instead, so a finished step is never repeated.
    """
    from lib.model.checkpoints import load_checkpoint
    from lib.run.data_stage import load_run_split

    results = pd.read_csv(layout.attack_file(run_dir, "results"), dtype={"image_id": str},
                          keep_default_na=False, na_values=[""])
    targeted = results[results["mode"] == "targeted"]
    chosen = [int(e) for e in epochs] or [int(targeted["epoch"].max())]
    ours = targeted[targeted["epoch"].isin(chosen)]
    path = layout.minimality_file(run_dir, "reference")
    if path.exists():
        return ReferenceTables(chosen, ours, pd.read_csv(path))
    test_set = load_run_split(run_dir, "test")
    position = {image_id: i for i, image_id in enumerate(test_set.index["image_id"])}
    parts = []
    for epoch in chosen:
        pairs = (targeted[targeted["epoch"] == epoch]
                 .drop_duplicates(["image_id", "target"])
                 .head(n_pairs)[["epoch", "image_id", "target"]]
                 .reset_index(drop=True))
        images = test_set.images[[position[i] for i in pairs["image_id"]]].float() / 255
        model = load_checkpoint(layout.checkpoint_path(run_dir, epoch), map_location=device)
        parts.append(run_reference_attacks(
            model, images, torch.tensor(pairs["target"].to_numpy()), keys=pairs,
            steps=list(steps), attacks=list(attacks), device=device, batch_size=batch_size,
            seed=seed, progress=progress,
        ))
    reference = pd.concat(parts, ignore_index=True)
    io.write_csv(layout.minimality_file(run_dir, "timings"),
                 reference[["epoch", "image_id", "target", "attack", "steps", "seconds"]])
    reference = reference.drop(columns="seconds")
    io.write_csv(path, reference)
    return ReferenceTables(chosen, ours, reference)
