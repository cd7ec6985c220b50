"""The attack engine's entry points: attack images, or run a job of rows, with every input checked.

:func:`attack` attacks a batch of images with one schedule, called as the field calls attacks
(adv-lib's ``fmn(model, inputs, labels, targeted=...)``): ``labels`` are the true classes,
and a targeted attack names its ``targets`` too::

    from lib.attack.api import attack

    result = attack(model, images, labels, targeted=True, targets=targets,
                    schedule="exponential", lr0=2 / 255, max_iter=100)
    result.success, result.iterations, result.l1, result.borderline  # one value per image

    untargeted = attack(model, images, labels, targeted=False, schedule="constant", lr0=2 / 255)

:func:`adv_lib_form` wraps the engine in adv-lib's exact call shape, so it runs through a
harness written for adv-lib's attacks. :func:`iter_attack_rows` runs a job of
:class:`~lib.attack.results.AttackRow` rows (any mix of schedules) and yields results as the
attacks finish; :func:`attack_rows` collects them. The engine computes on the model's device
and in its dtype. Everything that can be checked is checked before the first forward pass
(shapes, value ranges, classes, the model's placement); the loop itself is
:mod:`lib.attack.engine`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from lib.attack.engine import (
    LoopOptions,
    RowTable,
    count_classes,
    model_placement,
    run_rows,
    to_unit,
    with_progress,
)
from lib.attack.losses import LOSSES
from lib.attack.results import ROW_COLUMNS, AttackResult, AttackRow
from lib.attack.schedules import SCHEDULES, Schedule, bind, get_schedule
from lib.attack.stop import prepare_stop
from lib.checking import check_choice, check_int, check_positive
from lib.errors import ParameterError
from lib.model import precision as precision_lib
from lib.model.network import frozen


def attack(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    targeted: bool,
    targets: Tensor | None = None,
    schedule: str | Schedule,
    lr0: float,
    max_iter: int = 100,
    constants: Mapping[str, float] | None = None,
    batch_size: int = 64,
    precision: str = "float32",
    refine_tolerance: float | None = None,
    certify: bool = True,
    progress: bool = False,
) -> AttackResult:
    """Attack every image with one schedule; results in input order, images kept.

    Args:
        model: maps images [B, C, H, W] in [0, 1] to logits [B, K]; the engine computes on its
            device and in its dtype (every parameter and buffer must agree).
        inputs: [N, C, H, W], float in [0, 1] (or uint8 0-255).
        labels: int [N] in [0, K), the true classes. Untargeted: the class to leave.
        targeted: True: reach ``targets`` (the paper); False: leave ``labels``.
        targets: int [N] in [0, K), required when targeted (each different from its label),
            None otherwise.
        schedule: a name of :data:`lib.attack.schedules.SCHEDULES`, a schedule function, or a
            ``functools.partial`` of one with its constants bound.
        lr0: initial step size > 0, in [0, 1] pixel units (e.g. 2/255).
        max_iter: the update budget per attack, >= 1 (the paper: 100).
        constants: the schedule's constants, e.g. ``{"decay": 0.3}`` (None: its defaults).
        batch_size: samples per forward/backward pass.
        precision: ``"float32"`` (default: the model runs in its dtype, exactly the loop of
            :mod:`lib.attack.engine`), ``"bfloat16"`` (forwards under autocast with
            channels-last input; needs a float32 model; crossings confirmed in float32) or
            ``"auto"`` (:func:`lib.model.precision.resolve` for the model's device).
        refine_tolerance: None (off) or > 0, in [0, 1] pixel units: bisect each success's last
            step down to this Linf width (:mod:`lib.attack.boundary`).
        certify: finish attacks that provably cannot succeed early (:mod:`lib.attack.stop`);
            outcomes are those of the full loop. Needs a model of the layers
            :mod:`lib.attack.bounds` covers.
        progress: show a progress bar over finished attacks (:mod:`lib.progress`).

    Returns:
        :class:`~lib.attack.results.AttackResult` with N rows in input order (``row_id`` =
        0 .. N-1) and ``borderline`` images.

    Raises:
        ParameterError: a bad value (named, with what to do), e.g. a target equal to its label.
        TypeError: a keyword this function does not take (from Python itself).
    """
    inputs = _check_images(inputs, "inputs")
    n = inputs.shape[0]
    if not isinstance(targeted, bool):
        raise ParameterError(f"targeted must be True or False, got {targeted!r}")
    labels = _check_labels(labels, n, "labels")
    if targeted and targets is None:
        raise ParameterError("targets is required when targeted=True: int [N] class indices")
    if not targeted and targets is not None:
        raise ParameterError("targets is given but targeted=False; pass targeted=True to reach "
                             "them, or leave targets out to leave the labels' classes")
    targets = (_check_labels(targets, n, "targets") if targeted
               else torch.full((n,), -1, dtype=torch.int64))
    schedule, constants = _named_schedule(schedule, constants)
    name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "custom")
    rows = RowTable(row_id=torch.arange(n), image=torch.arange(n), source=labels,
                    target=targets, schedule=torch.zeros(n, dtype=torch.int64), names=[name])
    stream = _start(
        model, inputs, rows, [schedule], lr0=lr0, max_iter=max_iter, targeted=targeted,
        batch_size=batch_size, precision=precision, refine_tolerance=refine_tolerance,
        certify=certify, schedule_constants={name: constants}, keep_images=True,
    )
    chunks = list(with_progress(stream, n, progress))
    return AttackResult.concat(chunks).sorted()


def adv_lib_form(
    *,
    schedule: str | Schedule,
    lr0: float,
    max_iter: int = 100,
    constants: Mapping[str, float] | None = None,
    batch_size: int = 64,
    precision: str = "float32",
    refine_tolerance: float | None = None,
    certify: bool = True,
) -> Callable[..., Tensor]:
    """The engine in adv-lib's call shape: ``fn(model, inputs, labels, targeted=False) ->
    adversarial inputs`` [N, C, H, W].

    As in adv-lib, ``labels`` are the true classes when untargeted and the targets when
    targeted (the clean class is then the model's prediction); an input the model already
    classifies as its target is returned as it is, and so is every input whose attack failed.
    The returned images are the borderline images (the refined ones with ``refine_tolerance``).
    The arguments are those of :func:`attack`.
    """

    def attack_like_adv_lib(model: nn.Module, inputs: Tensor, labels: Tensor,
                            targeted: bool = False) -> Tensor:
        options = dict(schedule=schedule, lr0=lr0, max_iter=max_iter, constants=constants,
                       batch_size=batch_size, precision=precision,
                       refine_tolerance=refine_tolerance, certify=certify)
        if not targeted:
            result = attack(model, inputs, labels, targeted=False, **options)
            return _adversarial(inputs, result.refined, result.success)
        predicted = predict(model, inputs, batch_size=batch_size)
        attacked = (predicted != labels.cpu()).nonzero().flatten()
        dtype = model_placement(model)[1]
        adversarial = to_unit(inputs, device=inputs.device, dtype=dtype).clone()
        if len(attacked):
            result = attack(model, inputs[attacked], predicted[attacked], targeted=True,
                            targets=labels.cpu()[attacked], **options)
            adversarial[attacked] = _adversarial(inputs[attacked], result.refined,
                                                 result.success)
        return adversarial

    return attack_like_adv_lib


def iter_attack_rows(
    model: nn.Module,
    pool: Tensor,
    rows: pd.DataFrame | Sequence[AttackRow] | Sequence[tuple],
    *,
    targeted: bool,
    lr0: float,
    max_iter: int = 100,
    batch_size: int = 64,
    precision: str = "float32",
    refine_tolerance: float | None = None,
    certify: bool = True,
    schedule_constants: Mapping[str, Mapping[str, float]] | None = None,
    keep_images: bool = False,
    loss: str = LOSSES[0],
) -> Iterator[AttackResult]:
    """Run a job of rows through one batched loop; yield results as attacks finish.

    Rows may mix schedules. The arguments are checked when this is called; the work happens
    as the iterator is consumed. Each yielded chunk holds the attacks that finished in one
    iteration (in slot order); ``AttackResult.concat(list(...)).sorted()`` gives the job's
    results in row order. Memory does not grow with the number of rows as long as the caller
    does not keep the chunks.

    Args:
        model: as in :func:`attack`.
        pool: the images the rows index, [M, C, H, W], float in [0, 1] or uint8 (0-255).
            It stays where it is; rows' images are copied to the model's device as they enter.
        rows: a DataFrame with columns ``row_id, image, source, target, schedule`` or a
            sequence of :class:`~lib.attack.results.AttackRow` (or tuples in that order).
            ``row_id`` values are unique ints; ``source`` is the true class; ``target`` the
            class to reach (targeted, never the source) or -1; ``schedule`` names are keys of
            :data:`lib.attack.schedules.SCHEDULES`. The order of the rows is the order of work.
        targeted, lr0, max_iter, batch_size, precision, refine_tolerance, certify: as in
            :func:`attack`.
        schedule_constants: per schedule name, its constants, e.g. ``{"step": {"drop": 0.5}}``.
        keep_images: put the borderline (and refined) images into the results (else None).
        loss: the loss the steps follow, one of :data:`lib.attack.losses.LOSSES`: the paper's
            ``"cross_entropy"`` (default) or the ``"logit_margin"`` of Carlini and Wagner.

    Yields:
        :class:`~lib.attack.results.AttackResult` chunks on the CPU.
    """
    pool = _check_images(pool, "pool")
    table = _row_table(rows, pool_size=pool.shape[0])
    return _start(
        model, pool, table, list(table.names), lr0=lr0, max_iter=max_iter, targeted=targeted,
        batch_size=batch_size, precision=precision, refine_tolerance=refine_tolerance,
        certify=certify, schedule_constants=schedule_constants or {}, keep_images=keep_images,
        loss=loss,
    )


def attack_rows(
    model: nn.Module, pool: Tensor, rows: pd.DataFrame | Sequence[AttackRow], **options: Any
) -> AttackResult:
    """:func:`iter_attack_rows` with the same keywords, collected and ordered by ``row_id``
    (for small jobs)."""
    chunks = list(iter_attack_rows(model, pool, rows, **options))
    return AttackResult.concat(chunks).sorted()


def predict(model: nn.Module, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """The model's predicted class of every image: int64 [N] on the CPU (weights frozen; on the
    model's device and in its dtype)."""
    device, dtype = model_placement(model)
    with frozen(model), torch.no_grad():
        return torch.cat([
            model(to_unit(images[k : k + batch_size], device=device, dtype=dtype)).argmax(1).cpu()
            for k in range(0, images.shape[0], batch_size)
        ])


def _adversarial(inputs: Tensor, found: Tensor, success: Tensor) -> Tensor:
    """``found`` where the attack succeeded, else the input (adv-lib's convention), as float
    images in [0, 1] of ``found``'s dtype on the inputs' device."""
    clean = to_unit(inputs, device=inputs.device, dtype=found.dtype)
    keep = success.to(inputs.device)[:, None, None, None]
    return torch.where(keep, found.to(inputs.device), clean)


def _named_schedule(schedule: str | Schedule,
                    constants: Mapping[str, float] | None) -> tuple[str | Schedule, dict]:
    """A partial of a registered schedule as its name and constants (so the certified stop
    knows its step bound); anything else as it is."""
    constants = dict(constants or {})
    if isinstance(schedule, functools.partial) and not schedule.args:
        names = [name for name, fn in SCHEDULES.items() if fn is schedule.func]
        if names:
            if "lr0" in schedule.keywords:
                raise ParameterError("give lr0 to attack(), not inside the schedule's partial")
            return names[0], {**schedule.keywords, **constants}
    get_schedule(schedule)
    return schedule, constants


def _check_images(images: Tensor, name: str) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ParameterError(
            f"{name} must be a non-empty tensor [N, C, H, W], got {shape}; "
            "add a batch dimension with images.unsqueeze(0)"
        )
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ParameterError(f"{name} must be float in [0, 1] or uint8, got {images.dtype}")
    low, high = torch.aminmax(images)
    if not (torch.isfinite(low) and torch.isfinite(high) and low >= 0 and high <= 1):
        raise ParameterError(
            f"{name} must lie in [0, 1] (pixel values / 255), got values in "
            f"[{low.item():.4g}, {high.item():.4g}]"
        )
    return images


def _check_labels(labels: Tensor, n: int, name: str) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (n,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ParameterError(
            f"{name} must be integer class indices of shape [{n}], "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    return labels.to(device="cpu", dtype=torch.int64, copy=True)


def _row_table(rows: pd.DataFrame | Sequence[Any], *, pool_size: int) -> RowTable:
    if isinstance(rows, pd.DataFrame):
        missing = [c for c in ROW_COLUMNS if c not in rows.columns]
        if missing:
            raise ParameterError(
                f"rows lacks column(s) {', '.join(missing)}; expected {', '.join(ROW_COLUMNS)}"
            )
        frame = rows.loc[:, list(ROW_COLUMNS)]
    else:
        try:
            frame = pd.DataFrame([tuple(r) for r in rows], columns=list(ROW_COLUMNS))
        except ValueError as error:
            raise ParameterError(
                f"rows must be AttackRow tuples ({', '.join(ROW_COLUMNS)}): {error}"
            ) from error
    if len(frame) == 0:
        raise ParameterError("rows is empty: a job needs at least one row")
    columns: dict[str, Tensor] = {}
    for column in ("row_id", "image", "source", "target"):
        values = frame[column]
        if not pd.api.types.is_integer_dtype(values):
            raise ParameterError(f"rows column {column!r} must hold integers, got {values.dtype}")
        columns[column] = torch.tensor(values.to_numpy(), dtype=torch.int64)
    if columns["row_id"].unique().numel() != len(frame):
        raise ParameterError("rows column 'row_id' must be unique")
    image = columns["image"]
    if image.min() < 0 or image.max() >= pool_size:
        raise ParameterError(
            f"rows column 'image' must index the pool (0 .. {pool_size - 1}), got values in "
            f"[{image.min().item()}, {image.max().item()}]"
        )
    names = list(dict.fromkeys(frame["schedule"].tolist()))
    for name in names:
        get_schedule(name)
    lookup = {name: k for k, name in enumerate(names)}
    schedule = torch.tensor([lookup[s] for s in frame["schedule"]], dtype=torch.int64)
    return RowTable(names=names, schedule=schedule, **columns)


def _start(
    model: nn.Module,
    pool: Tensor,
    rows: RowTable,
    schedules: list[str | Schedule],
    *,
    lr0: float,
    max_iter: int,
    targeted: bool,
    batch_size: int,
    precision: str,
    refine_tolerance: float | None,
    certify: bool,
    schedule_constants: Mapping[str, Mapping[str, float]],
    keep_images: bool,
    loss: str = LOSSES[0],
) -> Iterator[AttackResult]:
    """Check everything that can be checked before work, then return the running generator."""
    check_choice(loss, LOSSES, "loss")
    check_int(max_iter, "max_iter", low=1)
    check_int(batch_size, "batch_size", low=1)
    for flag, value in (("targeted", targeted), ("certify", certify)):
        if not isinstance(value, bool):
            raise ParameterError(f"{flag} must be True or False, got {value!r}")
    device, dtype = model_placement(model)
    unknown = sorted(set(schedule_constants) - set(rows.names))
    if unknown:
        raise ParameterError(
            f"schedule_constants names schedule(s) {', '.join(unknown)} that no row uses "
            f"(rows use {', '.join(rows.names)})"
        )
    rates = [bind(fn, lr0=lr0, **schedule_constants.get(name, {}))
             for fn, name in zip(schedules, rows.names, strict=True)]
    num_classes = count_classes(model, pool[rows.image[:1]], device=device, dtype=dtype)
    _check_rows(rows, num_classes, targeted=targeted)
    stop = prepare_stop(model, schedules, rows.names, rates=rates, lr0=lr0, max_iter=max_iter,
                        constants=schedule_constants, targeted=targeted) if certify else None
    options = LoopOptions(
        max_iter=max_iter, targeted=targeted, precision=_check_precision(precision, device, dtype),
        refine_tolerance=_check_tolerance(refine_tolerance), keep_images=keep_images, stop=stop,
        loss=loss,
    )
    return run_rows(model, pool, rows, rates, options, batch_size=batch_size, device=device,
                    dtype=dtype)


def _check_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    resolved = precision_lib.resolve(precision, device)
    if resolved == "bfloat16" and dtype != torch.float32:
        raise ParameterError(
            f"precision={precision!r} runs bfloat16 autocast, which needs a float32 model (this "
            f"one is {dtype}); use precision='float32' for float64 attacks"
        )
    return resolved


def _check_tolerance(tolerance: float | None) -> float | None:
    if tolerance is None:
        return None
    return float(check_positive(tolerance, "refine_tolerance (None for no refinement)",
                                unit="pixel units, e.g. 1e-4"))


def _check_rows(rows: RowTable, num_classes: int, *, targeted: bool) -> None:
    _check_range(rows.source, num_classes, "source (label)")
    if not targeted:
        return
    _check_range(rows.target, num_classes, "target")
    same = (rows.source == rows.target).nonzero().flatten()
    if len(same):
        ids = rows.row_id[same].tolist()
        shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        raise ParameterError(
            f"the target equals the label (the true class) in {len(ids)} row(s), row_id "
            f"{shown}: a targeted attack needs another class as target (for an attack away "
            "from the label, use targeted=False)"
        )


def _check_range(labels: Tensor, num_classes: int, name: str) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ParameterError(
            f"{name} classes must be in 0 .. {num_classes - 1} (the model has {num_classes} "
            f"outputs), got values in [{labels.min().item()}, {labels.max().item()}]"
        )
