"""A training folder that a run continues: its parameters, the newest optimizer state, its tables.

A run records its parameters in ``train_params.json`` (:func:`prepare_run_folder` refuses a
folder made with others), keeps the SGD momentum buffers of its newest epoch
(:func:`save_optimizer`) and, when started again, continues from the last epoch that has both
(:func:`resumable_epoch`, :func:`start_or_resume`) with the tables cut to that epoch
(:func:`read_tables`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import safetensors.torch
import torch

from lib import NUM_CLASSES
from lib.errors import RunFolderError
from lib.io import atomic_path
from lib.model.checkpoints import build_model, load_checkpoint, read_safetensors
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


def finished_epochs(train_folder: str | os.PathLike[str]) -> int:
    """k such that epochs 1..k each have a checkpoint and a metrics row."""
    logged = set(logged_epochs(train_folder))
    finished = 0
    while finished + 1 in logged:
        finished += 1
    return finished


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
) -> tuple[ToolClassifier, torch.optim.SGD]:
    """The model and SGD optimizer to train from: epoch ``done``'s checkpoint and momentum buffers,
    or a fresh model seeded from ``seed`` (with ImageNet weights when given)."""
    if done:
        model = load_checkpoint(layout.checkpoint_file(out_dir, done), map_location=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, 0, "init"))
            model = build_model(num_classes=NUM_CLASSES, weights_path=weights_path)
        model = model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    if done:
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


def resumable_epoch(out_dir: Path, finished: int) -> int:
    """The last finished epoch whose optimizer state is kept (0: start from scratch)."""
    for epoch in range(finished, 0, -1):
        if layout.optimizer_file(out_dir, epoch).exists():
            return epoch
    return 0


def read_tables(out_dir: Path, *, up_to_epoch: int) -> dict[str, pd.DataFrame | None]:
    """The run's tables restricted to epochs 1..up_to_epoch (None when there are none)."""
    # pandas >= 3 parses floats exactly (round trip), so a resumed run's files equal an
    # uninterrupted run's byte for byte (tests/test_training.py checks this)
    read = {}
    for name in tables.TRAIN_TABLES:
        table = tables.read_train_table(out_dir, name) if up_to_epoch else None
        read[name] = (None if table is None
                      else table[table["epoch"] <= up_to_epoch][list(tables.TABLES[name].columns)])
    return read
