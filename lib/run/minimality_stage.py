"""The minimality stage: its settings, and its work on the run folder (choose the pairs, attack
them, keep the tables).

:class:`MinimalitySettings` holds the only defaults of the stage's parameters (those of the
default build) and their only value checks.

:func:`reference_tables` picks, for each compared checkpoint, (image, target) pairs of the
attack stage's targeted results that span every tool (:func:`spread_pairs`), runs every
reference attack of
:mod:`lib.attack.reference` on them with that checkpoint, and writes ``reference.csv`` and
``timings.csv`` into the stage's folder; a finished step is read back, never repeated.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from lib.attack.reference import REFERENCE_ATTACKS, run_reference_attacks
from lib.checking import check_choices, check_int, check_ints, check_list
from lib.errors import ParameterError
from lib.run import layout, tables


@dataclass(frozen=True)
class MinimalitySettings:
    """The minimality stage's parameters (checked when made).

    Attributes:
        epochs: checkpoints of the first attacked model to compare; [] for the last attacked
            one. The default build compares the first and the last.
        n_pairs: (image, target) pairs per checkpoint, taken in turn from every tool, its images
            and targets (every image once before any twice; every tool a target too).
        steps: step budgets of every reference attack (100 matches the attack's max_iter; a
            1,000-step budget lowers the best known further at ten times the cost).
        attacks: reference attacks (lib.attack.reference).
        batch_size: pairs per reference-attack batch.
        seed: seeds the reference attacks' random initialisations.
    """

    epochs: tuple[int, ...] = (1, 5)
    n_pairs: int = 21
    steps: tuple[int, ...] = (100,)
    attacks: tuple[str, ...] = tuple(REFERENCE_ATTACKS)
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", check_ints(self.epochs, "epochs", low=1))
        object.__setattr__(self, "steps", check_ints(self.steps, "steps", low=2))
        object.__setattr__(self, "attacks", check_list(self.attacks, "attacks"))
        self.check()

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` naming the first bad setting."""
        check_int(self.n_pairs, "n_pairs", low=1)
        if not self.steps:
            raise ParameterError("steps is empty; give at least one step budget, e.g. [100]")
        check_choices(self.attacks, list(REFERENCE_ATTACKS), "attacks")
        check_int(self.batch_size, "batch_size", low=1)
        check_int(self.seed, "seed", low=0)

    def to_json(self) -> dict[str, Any]:
        """The settings as plain values (lists for tuples), as the stage's parameters hold
        them."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in asdict(self).items()}


def spread_pairs(results: pd.DataFrame, n_pairs: int) -> pd.DataFrame:
    """``n_pairs`` distinct (image, target) pairs of one checkpoint's targeted results, spread
    over the tools, the images and the targets.

    The pairs are dealt in rounds: every round takes one pair of every source tool that has one
    left, tools in label order. Within a tool the attack stage's images take turns (every image
    once before any image twice), and image ``r`` of a tool starts at target ``source + 1 + r``
    (mod the number of classes, skipping the source), so the first rounds use every tool as a
    source and as a target, and as many images as there are pairs to give.

    Returns:
        ``epoch, image_id, source, target``, ``n_pairs`` rows at most.
    """
    pairs = results.drop_duplicates(["image_id", "target"])
    classes = int(max(pairs["source"].max(), pairs["target"].max())) + 1
    rank = pairs.groupby("source", sort=False)["image_id"].transform(
        lambda ids: pd.factorize(ids)[0])
    turn = (pairs["target"] - pairs["source"]) % classes  # 1 .. classes - 1
    order = pairs.assign(image_rank=rank, lap=(turn - 1 - rank) % (classes - 1))
    order = order.sort_values(["source", "lap", "image_rank"], kind="stable")
    order = order.assign(round=order.groupby("source").cumcount())
    order = order.sort_values(["round", "source"], kind="stable").head(n_pairs)
    return order[["epoch", "image_id", "source", "target"]].reset_index(drop=True)


@dataclass(frozen=True)
class ReferenceTables:
    """What the minimality stage compares: the checkpoints, our attacks, the references."""

    #: the attacked checkpoints compared (the ``epochs`` asked, or the last attacked one)
    epochs: list[int]
    #: the attack stage's targeted results on those checkpoints of the first model
    #: (results.csv rows)
    ours: pd.DataFrame
    #: one row per (pair, reference attack, budget), as
    #: :func:`~lib.attack.reference.run_reference_attacks` returns it without ``seconds`` (the
    #: times are in ``timings.csv``)
    reference: pd.DataFrame


def reference_tables(
    run_dir: str | os.PathLike[str],
    settings: MinimalitySettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ReferenceTables:
    """The minimality stage's reference step: pick the pairs, attack them, write the files.

    The stage compares the first attacked model (the attack stage's first seed). For each of
    its checkpoints of ``settings.epochs`` (empty: the last attacked one) the first
    ``settings.n_pairs`` distinct (image, target) pairs of the attack stage's targeted results
    are attacked by every reference attack at every budget of ``settings.steps``, on the test
    images of the run
    folder and the checkpoint of that epoch. ``reference.csv`` (results) and ``timings.csv``
    (seconds per pair, which differ from run to run) are written to the stage's folder; when
    ``reference.csv`` exists it is read instead, so a finished step is never repeated.
    """
    from lib.model.checkpoints import load_checkpoint
    from lib.run.data_stage import load_run_split

    results = tables.read_results(run_dir)
    first = int(tables.read_record(run_dir, "job")["settings"]["models"][0])
    targeted = results[(results["mode"] == "targeted") & (results["model"] == first)]
    chosen = [int(e) for e in settings.epochs] or [int(targeted["epoch"].max())]
    ours = targeted[targeted["epoch"].isin(chosen)]
    found = tables.read_table(run_dir, "reference", missing_ok=True)
    if found is not None:
        return ReferenceTables(chosen, ours, found)
    test_set = load_run_split(run_dir, "test")
    position = {image_id: i for i, image_id in enumerate(test_set.index["image_id"])}
    parts = []
    for epoch in chosen:
        pairs = spread_pairs(targeted[targeted["epoch"] == epoch], settings.n_pairs)
        images = test_set.images[[position[i] for i in pairs["image_id"]]].float() / 255
        model = load_checkpoint(layout.checkpoint_path(run_dir, epoch, model=first),
                                map_location=device)
        parts.append(run_reference_attacks(
            model, images, torch.tensor(pairs["target"].to_numpy()),
            keys=pairs[["epoch", "image_id", "target"]],
            steps=list(settings.steps), attacks=list(settings.attacks), device=device,
            batch_size=settings.batch_size, seed=settings.seed, progress=progress,
        ))
    reference = pd.concat(parts, ignore_index=True)
    tables.write_table(run_dir, "timings",
                       reference[["epoch", "image_id", "target", "attack", "steps", "seconds"]])
    reference = reference.drop(columns="seconds")
    tables.write_table(run_dir, "reference", reference)
    return ReferenceTables(chosen, ours, reference)
