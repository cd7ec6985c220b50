"""A training folder that a run continues: its parameters, the newest optimizer state, its tables.

A run records its parameters in ``train_params.json`` (:func:`prepare_run_folder` refuses a
folder made with others), keeps the SGD momentum buffers of its newest epoch
(:func:`save_optimizer`) and, when started again, continues from the last epoch that has both
(:func:`resumable_epoch`, :func:`start_or_resume`) with the tables cut to that epoch
(:func:`read_tables`).

A run may also start from a checkpoint of another run (:class:`StartPoint`, e.g. the clean
run's epoch 5 for the borderline-training arms): its epochs are then numbered on from that
epoch, its folder holds only its own epochs, and the SGD momentum starts at zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import safetensors.torch
import torch

from lib import NUM_CLASSES
from lib.checking import is_int
from lib.errors import CheckpointError, ParameterError, RunFolderError
from lib.io import atomic_path
from lib.model.checkpoints import build_model, check_checkpoint, load_checkpoint, read_safetensors
from lib.model.network import ToolClassifier
from lib.run import layout, tables
from lib.train.batches import stream_seed


def logged_epochs(train_folder: str | os.PathLike[str]) -> list[int]:
    """Sorted epochs with a ``metrics.csv`` row (written last in an epoch) and a checkpoint."""
    metrics = tables.read_train_table(train_folder, "metrics")
    if metrics is None:
        return []
    logged = set(metrics["epoch"].astype(int))
    return sorted(e for e in logged if layout.checkpoint_file(train_folder, e).is_file())


def finished_epochs(train_folder: str | os.PathLike[str], *, first: int = 1) -> int:
    """k such that epochs first..k each have a checkpoint and a metrics row (``first - 1``
    when epoch ``first`` has not finished)."""
    logged = set(logged_epochs(train_folder))
    finished = first - 1
    while finished + 1 in logged:
        finished += 1
    return finished


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: a fresh model (``epoch`` 0), or the checkpoint of another run after
    ``epoch`` (>= 1), from which this run's epochs ``epoch + 1, ...`` continue.

    Attributes:
        epoch: the epoch the start checkpoint finished; 0 for a fresh model.
        checkpoint: the model after ``epoch`` (a safetensors checkpoint); None with epoch 0.
    """

    epoch: int = 0
    checkpoint: Path | None = None

    @property
    def first(self) -> int:
        """The first epoch the run trains."""
        return self.epoch + 1

    def check(self, *, epochs: int) -> None:
        """Raise ParameterError or CheckpointError (naming ``start_epoch``) before anything is
        written: a bad epoch, a missing or unusable checkpoint, or no epoch left to train."""
        if not is_int(self.epoch) or self.epoch < 0:
            raise ParameterError(f"start_epoch must be an int >= 0, got {self.epoch!r}")
        if self.epoch == 0:
            if self.checkpoint is not None:
                raise ParameterError("start_checkpoint is given but start_epoch is 0; give the "
                                     "epoch the checkpoint finished as start_epoch")
            return
        if self.checkpoint is None or not Path(self.checkpoint).is_file():
            raise CheckpointError(
                f"start_epoch {self.epoch}: no checkpoint {self.checkpoint}; that epoch was "
                "not trained: choose a trained epoch of the run you continue")
        check_checkpoint(self.checkpoint)
        if epochs <= self.epoch:
            raise ParameterError(
                f"epochs={epochs} must exceed start_epoch={self.epoch}: epochs is the last "
                "epoch to reach, counted on from the start checkpoint")

    def record(self) -> dict[str, Any]:
        """What ``train_params.json`` records of the start ({} for a fresh model): the epoch
        and a sha256 of the checkpoint's bytes, so a retrained start is never continued."""
        if self.epoch == 0:
            return {}
        digest = hashlib.sha256()
        with open(self.checkpoint, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        return {"start_epoch": self.epoch, "start_checkpoint": digest.hexdigest()[:16]}


def objective_record(objective: Any) -> dict[str, Any]:
    """What ``train_params.json`` records of a training objective's settings
    (:class:`lib.train.borderline.BorderlineSettings`; {} for None): every field but the
    precision, which the run records already; no margin cap is recorded as None."""
    if objective is None:
        return {}
    values = dataclasses.asdict(objective)
    values.pop("precision")
    if values["margin_cap"] == math.inf:
        values["margin_cap"] = None  # JSON has no infinity
    return {"objective": values}


def start_or_resume(
    out_dir: Path,
    *,
    done: int,
    seed: int,
    weights_path: str | os.PathLike[str] | None,
    device: torch.device,
    lr: float,
    momentum: float,
    weight_decay: float,
    start: StartPoint = StartPoint(),
) -> tuple[ToolClassifier, torch.optim.SGD]:
    """The model and SGD optimizer to train from: epoch ``done``'s checkpoint and momentum buffers
    in ``out_dir``; else the start checkpoint (momentum zero); else a fresh model seeded from
    ``seed`` (with ImageNet weights when given)."""
    resumed = done > start.epoch
    if resumed:
        model = load_checkpoint(layout.checkpoint_file(out_dir, done), map_location=device)
    elif start.epoch:
        model = load_checkpoint(start.checkpoint, map_location=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, 0, "init"))
            model = build_model(num_classes=NUM_CLASSES, weights_path=weights_path)
        model = model.to(device)
    # fused: one pass over each tensor and no new weight-decay tensor per step; on two CPU
    # cores AlexNet's step takes 0.025 s instead of 0.145 s (an epoch 39 s instead of 44 s).
    # Its rounding differs from the per-tensor loop's, so runs of each agree only to float32.
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True
    )
    if resumed:
        _load_optimizer(optimizer, layout.optimizer_file(out_dir, done))
    return model, optimizer


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The SGD momentum buffers as safetensors (hyperparameters live in train_params.json)."""
    tensors = {
        f"momentum_buffer.{index}": state["momentum_buffer"].detach().cpu().contiguous()
        for index, state in optimizer.state_dict()["state"].items()
        if state.get("momentum_buffer") is not None
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp)


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = read_safetensors(path)
    state = optimizer.state_dict()
    count = len(state["param_groups"][0]["params"])
    buffers = {}
    for key, tensor in tensors.items():
        index = int(key.rsplit(".", 1)[1])
        if not key.startswith("momentum_buffer.") or index >= count:
            raise RunFolderError(
                f"{path}: unexpected tensor {key!r} in the optimizer state; remove the run "
                "folder's train/ or use a new run folder"
            )
        buffers[index] = {"momentum_buffer": tensor}
    state["state"] = buffers
    optimizer.load_state_dict(state)


def prepare_run_folder(out_dir: Path, params: dict[str, Any]) -> None:
    """Record the run's parameters, or check them against those already recorded."""
    params = json.loads(json.dumps(params))  # as read back from JSON: tuples become lists
    recorded = tables.read_train_params(out_dir)
    if recorded is not None:
        differing = sorted(
            key for key in set(recorded) | set(params) if recorded.get(key) != params.get(key)
        )
        if differing:
            listing = "; ".join(
                f"{key}: folder {recorded.get(key)!r}, now {params.get(key)!r}" for key in differing
            )
            raise RunFolderError(
                f"{out_dir} holds a training run made with other parameters ({listing}). "
                "Use a new run folder, or remove this one to start again"
            )
    elif layout.has_checkpoints(out_dir):
        raise RunFolderError(
            f"{out_dir} holds checkpoints but no train_params.json, so it cannot be continued "
            "safely; use a new run folder or remove this one"
        )
    else:
        tables.write_train_params(out_dir, params)


def resumable_epoch(out_dir: Path, finished: int, *, first: int = 1) -> int:
    """The last finished epoch whose optimizer state is kept (``first - 1``: start from the
    start point)."""
    for epoch in range(finished, first - 1, -1):
        if layout.optimizer_file(out_dir, epoch).exists():
            return epoch
    return first - 1


def read_tables(out_dir: Path, *, up_to_epoch: int, first: int = 1,
                objective: bool = False) -> dict[str, pd.DataFrame | None]:
    """The run's tables restricted to epochs first..up_to_epoch (None when there are none);
    with ``objective`` also the per-step table of a run with an objective."""
    # pandas >= 3 parses floats exactly (round trip), so a resumed run's files equal an
    # uninterrupted run's byte for byte (tests/test_training.py checks this)
    read = {}
    names = (*tables.TRAIN_TABLES, *(tables.OBJECTIVE_TABLES if objective else ()))
    for name in names:
        table = tables.read_train_table(out_dir, name) if up_to_epoch >= first else None
        read[name] = (None if table is None
                      else table[table["epoch"] <= up_to_epoch][list(tables.TABLES[name].columns)])
    return read
