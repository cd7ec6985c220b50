"""The attack engine's entry points: attack images, or run a job of rows, with every input checked.

:func:`attack` attacks a batch of images with one schedule; :func:`iter_attack_rows` runs a job
of :class:`~lib.attack.results.AttackRow` rows (any mix of schedules) and yields results as the
attacks finish; :func:`attack_rows` collects them. Everything that can be checked is checked
before the first forward pass (shapes, value ranges, classes, the model's device and dtype);
the loop itself is :mod:`lib.attack.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from lib.attack.engine import (
    LoopOptions,
    RowTable,
    check_model,
    count_classes,
    run_rows,
    to_unit,
    with_progress,
)
from lib.attack.results import MODES, ROW_COLUMNS, AttackResult, AttackRow
from lib.attack.schedules import bind, get_schedule
from lib.checking import check_choice, check_int, check_positive
from lib.errors import ParameterError
from lib.model import precision as precision_lib
from lib.model.network import frozen


def attack(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None,
    *,
    schedule: str | Callable[..., Tensor],
    lr0: float,
    max_iter: int = 100,
    mode: str = "targeted",
    sources: Tensor | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str = "float32",
    refine_tolerance: float | None = None,
    progress: bool = False,
    **schedule_constants: float,
) -> AttackResult:
    """Attack every image with one schedule; results in input order, images kept.

    Args:
        model: maps images [B, C, H, W] in [0, 1] to logits [B, K]; on ``device`` in ``dtype``.
        images: [N, C, H, W], float in [0, 1] (or uint8 0-255).
        targets: int [N] in [0, K), the classes to reach (targeted); ignored (may be None) in
            untargeted mode.
        schedule: a name of :data:`lib.attack.schedules.SCHEDULES` or a schedule function.
        lr0: initial step size > 0, in [0, 1] pixel units (e.g. 2/255).
        max_iter: the update budget per attack, >= 1 (the paper: 100).
        mode: ``"targeted"`` (the paper) or ``"untargeted"`` (leave the source class).
        sources: int [N], the classes the images belong to. Targeted: used only to reject
            ``target == source``. Untargeted: the class to leave; default the model's
            prediction on the clean image.
        batch_size: samples per forward/backward pass.
        device, dtype: where and in which float type to compute (images, steps, distances
            and every float32 check).
        precision: ``"float32"`` (default: the model runs in ``dtype``, exactly the loop
            above), ``"bfloat16"`` (forwards under autocast with channels-last input; needs
            ``dtype=torch.float32``; crossings confirmed in float32, see the module docstring)
            or ``"auto"`` (:func:`lib.model.precision.resolve` for ``device``).
        refine_tolerance: None (off) or > 0, in [0, 1] pixel units: bisect each success's last
            step down to this Linf width (module docstring, "Refinement").
        progress: show a progress bar over finished attacks (:mod:`lib.progress`).
        **schedule_constants: the schedule's constants (e.g. ``decay=0.5``).

    Returns:
        :class:`~lib.attack.results.AttackResult` with N rows in input order (``row_id`` =
        0 .. N-1) and ``borderline`` images.
    """
    images = _check_images(images, "images")
    n = images.shape[0]
    _check_mode(mode)
    if sources is None and mode == "untargeted":
        sources = predict(model, images, batch_size=batch_size, device=device, dtype=dtype)
    if targets is None:
        if mode == "targeted":
            raise ParameterError("targets is required in targeted mode: int [N] class indices")
        targets = torch.full((n,), -1, dtype=torch.int64)
    targets = _check_labels(targets, n, "targets")
    sources = (
        torch.full((n,), -1, dtype=torch.int64)
        if sources is None
        else _check_labels(sources, n, "sources")
    )
    name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "custom")
    get_schedule(schedule)
    rows = RowTable(
        row_id=torch.arange(n),
        image=torch.arange(n),
        source=sources,
        target=targets,
        schedule=torch.zeros(n, dtype=torch.int64),
        names=[name],
    )
    stream = _start(
        model,
        images,
        rows,
        [schedule],
        lr0=lr0,
        max_iter=max_iter,
        mode=mode,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        precision=precision,
        refine_tolerance=refine_tolerance,
        schedule_constants={name: schedule_constants},
        keep_images=True,
        sources_known=sources.ge(0).all().item(),
    )
    chunks = list(with_progress(stream, n, progress))
    return AttackResult.concat(chunks).sorted()


def iter_attack_rows(
    model: nn.Module,
    pool: Tensor,
    rows: pd.DataFrame | Sequence[AttackRow] | Sequence[tuple],
    *,
    lr0: float,
    max_iter: int = 100,
    mode: str = "targeted",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str = "float32",
    refine_tolerance: float | None = None,
    schedule_constants: Mapping[str, Mapping[str, float]] | None = None,
    keep_images: bool = False,
) -> Iterator[AttackResult]:
    """Run a job of rows through one batched loop; yield results as attacks finish.

    Rows may mix schedules. The arguments are checked when this is called; the work happens
    as the iterator is consumed. Each yielded chunk holds the attacks that finished in one
    iteration (in slot order); ``AttackResult.concat(list(...)).sorted()`` gives the job's
    results in row order. Memory does not grow with the number of rows as long as the caller
    does not keep the chunks.

    Args:
        model: maps images [B, C, H, W] in [0, 1] to logits [B, K]; on ``device`` in ``dtype``.
        pool: the images the rows index, [M, C, H, W], float in [0, 1] or uint8 (0-255).
            It stays where it is; rows' images are copied to ``device`` as they enter.
        rows: a DataFrame with columns ``row_id, image, source, target, schedule`` or a
            sequence of :class:`~lib.attack.results.AttackRow` (or tuples in that order).
            ``row_id`` values are unique ints; ``schedule`` names are keys of
            :data:`lib.attack.schedules.SCHEDULES`. The order of the rows is the order of work.
        lr0, max_iter, mode, batch_size, device, dtype, precision, refine_tolerance: as in
            :func:`attack`.
        schedule_constants: per schedule name, its constants, e.g. ``{"step": {"drop": 0.5}}``.
        keep_images: put the borderline (and refined) images into the results (else None).

    Yields:
        :class:`~lib.attack.results.AttackResult` chunks on the CPU.
    """
    pool = _check_images(pool, "pool")
    _check_mode(mode)
    table = _row_table(rows, pool_size=pool.shape[0])
    return _start(
        model,
        pool,
        table,
        list(table.names),
        lr0=lr0,
        max_iter=max_iter,
        mode=mode,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        precision=precision,
        refine_tolerance=refine_tolerance,
        schedule_constants=schedule_constants or {},
        keep_images=keep_images,
        sources_known=True,
    )


def attack_rows(
    model: nn.Module, pool: Tensor, rows: pd.DataFrame | Sequence[AttackRow], **options: Any
) -> AttackResult:
    """:func:`iter_attack_rows`, collected and ordered by ``row_id`` (for small jobs)."""
    chunks = list(iter_attack_rows(model, pool, rows, **options))
    return AttackResult.concat(chunks).sorted()


def _check_mode(mode: str) -> None:
    check_choice(mode, MODES, "mode")


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
    schedules: list[str | Callable[..., Tensor]],
    *,
    lr0: float,
    max_iter: int,
    mode: str,
    batch_size: int,
    device: str | torch.device,
    dtype: torch.dtype,
    precision: str,
    refine_tolerance: float | None,
    schedule_constants: Mapping[str, Mapping[str, float]],
    keep_images: bool,
    sources_known: bool,
) -> Iterator[AttackResult]:
    """Check everything that can be checked before work, then return the running generator."""
    check_int(max_iter, "max_iter", low=1)
    check_int(batch_size, "batch_size", low=1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ParameterError(f"dtype must be a torch float dtype, got {dtype!r}")
    device = torch.device(device)
    options = LoopOptions(
        max_iter=max_iter,
        targeted=mode == "targeted",
        precision=_check_precision(precision, device, dtype),
        refine_tolerance=_check_tolerance(refine_tolerance),
        keep_images=keep_images,
    )
    unknown = sorted(set(schedule_constants) - set(rows.names))
    if unknown:
        raise ParameterError(
            f"schedule_constants names schedule(s) {', '.join(unknown)} that no row uses "
            f"(rows use {', '.join(rows.names)})"
        )
    bound = [
        bind(fn, lr0=lr0, **schedule_constants.get(name, {}))
        for fn, name in zip(schedules, rows.names, strict=True)
    ]
    check_model(model, device, dtype)
    num_classes = count_classes(model, pool[rows.image[:1]], device=device, dtype=dtype)
    _check_rows(rows, num_classes, targeted=options.targeted, sources_known=sources_known)
    return run_rows(model, pool, rows, bound, options, batch_size=batch_size, device=device,
                dtype=dtype)


def _check_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    resolved = precision_lib.resolve(precision, device)
    if resolved == "bfloat16" and dtype != torch.float32:
        raise ParameterError(
            f"precision={precision!r} runs bfloat16 autocast, which needs dtype=torch.float32 "
            f"(got {dtype}); use precision='float32' for float64 attacks"
        )
    return resolved


def _check_tolerance(tolerance: float | None) -> float | None:
    if tolerance is None:
        return None
    return float(check_positive(tolerance, "refine_tolerance (None for no refinement)",
                                unit="pixel units, e.g. 1e-4"))


def _check_rows(rows: RowTable, num_classes: int, *, targeted: bool,
                sources_known: bool) -> None:
    if targeted:
        _check_range(rows.target, num_classes, "target")
    if sources_known:
        _check_range(rows.source, num_classes, "source")
        if targeted:
            same = (rows.source == rows.target).nonzero().flatten()
            if len(same):
                raise ParameterError(
                    f"target equals source for {len(same)} row(s), first row_id "
                    f"{rows.row_id[same[0]].item()}: a targeted attack needs another class"
                )


def _check_range(labels: Tensor, num_classes: int, name: str) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ParameterError(
            f"{name} classes must be in 0 .. {num_classes - 1} (the model has {num_classes} "
            f"outputs), got values in [{labels.min().item()}, {labels.max().item()}]"
        )


def predict(
    model: nn.Module, images: Tensor, *, batch_size: int, device: str | torch.device, dtype
) -> Tensor:
    """The model's predicted class of every image: int64 [N] on the CPU (weights frozen)."""
    device = torch.device(device)
    check_model(model, device, dtype)
    with frozen(model), torch.no_grad():
        return torch.cat(
            [
                model(to_unit(images[k : k + batch_size], device=device, dtype=dtype))
                .argmax(1)
                .cpu()
                for k in range(0, images.shape[0], batch_size)
            ]
        )
