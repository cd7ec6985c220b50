"""The attack engine: batched I-FGSM that stops every sample at its flip (METHOD.md, Attack).

For one image x with target t (``max_iter`` = N), the loop is exactly::

    x_0 = x
    for i = 1 .. N:
        if argmax f(x_{i-1}) == t: success, iterations = i - 1, stop
        L_i = CE(f(x_{i-1}), t)
        x_i = clip(x_{i-1} - lr_i sign(grad_x L_i), 0, 1)      # lr_i from the schedule
    success iff argmax f(x_N) == t (iterations = N)

Untargeted mode stops as soon as ``argmax f != source`` and ascends CE(f(x), source)
(``x_i = clip(x_{i-1} + lr_i sign(grad), 0, 1)``). The returned image is the first iterate that
crossed: a borderline image.

How the engine runs many attacks
--------------------------------
A job is a plain, stably ordered table of rows ``(row_id, image, source, target, schedule)``;
``image`` indexes a pool of images. The engine keeps up to ``batch_size`` rows "in flight" as
slots; every slot's state is a tensor row: current image, clean image, step index (updates
applied), loss and step-size history. One iteration is:

1. one forward pass of the whole batch with the input requiring grad. Its logits serve both the
   flip check (before the update, as in the loop above) and the loss;
2. a sample is *finished* when it has crossed, has used ``max_iter`` updates, or its logits or
   loss are not finite (status ``"nonfinite"``: it fails alone, the others go on);
3. one backward pass to the input for the whole batch (the loss of finished samples is masked
   out), then for each schedule present, that schedule's function gives the step sizes of its
   samples (selected by mask), and the unfinished samples take their signed step and are
   clipped to [0, 1];
4. finished samples are emitted (an :class:`AttackResult` chunk, moved to the CPU) and their
   slots are refilled in place (``index_copy_``) with the next rows of the queue, in row order.
   When the queue is empty, the batch shrinks to the rows still running.

So the batch stays full, and a row costs ``iterations + 1`` forward and backward passes, no
more. Memory is bounded by ``batch_size`` (plus the row table and the image pool): results
leave as they finish (:func:`iter_attack_rows`), and the caller writes or drops them.
Everything is deterministic: the same rows in the same order with the same batch size and
dtype give bit-identical results on the CPU, so a chunk of rows can be re-run from scratch
(the unit of resume and of sharding). Different batch sizes agree exactly in float64; in float32
convolutions round differently per batch size and ``sign()`` can turn that into a different
step on rare rows (TOOLCHAIN.md).

Precision: a success is a float32 success
-----------------------------------------
``precision="float32"`` (the default) is the loop above in ``dtype`` (float32, or float64 for
exactness tests). ``precision="bfloat16"`` runs the batched forward under autocast with a
channels-last input (:func:`lib.precision.forward`); its logits give the loss and the gradient,
so the steps follow the bfloat16 model. It never decides a result alone. The rule, per slot and
iteration:

- the slot is *checked* when its bfloat16 logits call it crossed, or put it within
  :data:`CONFIRM_MARGIN` logits of crossing (targeted: max over other classes minus the
  target's logit; untargeted: the source's logit minus the best other one), or when it has
  used its whole budget;
- a checked slot's current image goes through the model again without autocast, in ``dtype``;
  only that forward can say "crossed". A slot that bfloat16 calls crossed but float32 does not
  goes on (takes its step); a slot that float32 calls crossed stops;
- ``final_class``, ``target_prob`` and ``success`` of every finished slot come from that
  float32 forward, and the distances are computed in ``dtype`` from the images.

So every returned success is classified as the target (targeted) or off the source
(untargeted) by the float32 model. The margin only decides where float32 looks: a slot that
float32 would call crossed while bfloat16 keeps it more than the margin away goes on for a step
(its result is then a later, still float32-checked iterate). The loss and step-size traces are
those of the bfloat16 forward. ``"auto"`` resolves by :func:`lib.precision.resolve`.

Refinement: the boundary inside the last step
---------------------------------------------
A row that crosses at update k has overshot the boundary by up to one step. With
``refine_tolerance`` (pixel units, [0, 1] scale; None = off) each successful row with k >= 1 is
bisected on the segment x_{k-1} -> x_k: forward passes only, each midpoint checked in ``dtype``
without autocast, the crossed end of the bracket kept, until the bracket is at most
``refine_tolerance`` wide in Linf (``ceil(log2(|x_k - x_{k-1}|_inf / tolerance))`` forwards, 0
when the step is already that short). The path distances stay the primary result; the refined
point gives ``refined_l1``, ``refined_l2``, ``refined_linf`` (each the smaller of the refined
and the path point's distance, since both are crossed images) and ``refine_forwards``. Rows
that failed or crossed after 0 updates, and every row when refinement is off, report the path
distances there and 0 forwards.

During the attack the model is in eval mode with its weights frozen (:func:`lib.model.frozen`,
5-6x faster); the caller's flags and train/eval modes are restored afterwards. The model takes
images in [0, 1] (normalisation inside) and must already be on ``device`` in ``dtype``.

Adding a schedule: write ``fn(step, losses, *, lr0, **constants) -> Tensor[B]`` in
:mod:`lib.schedules` and add one line to ``SCHEDULES`` (see that module's docstring). The
engine then accepts its name in rows and in :func:`attack`, and its constants through
``schedule_constants``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib import precision as precision_lib
from lib import schedules as schedule_registry
from lib.errors import ParameterError
from lib.model import frozen

MODES = ("targeted", "untargeted")
STATUS_OK = "ok"  #: the loop ran as specified (successful or not)
STATUS_NONFINITE = "nonfinite"  #: logits, loss or gradient stopped being finite: failed
#: Low precision: a row whose low-precision logits are crossed, or within this many logits of
#: crossing (the gap between the best other class and the target, or between the source and
#: the best other class), is checked by a forward in the engine's dtype. bfloat16 keeps 8
#: mantissa bits: logits of a trained AlexNet move by a few tenths between the precisions.
CONFIRM_MARGIN = 1.0


class AttackRow(NamedTuple):
    """One attack of a job. ``target`` is ignored in untargeted mode (use -1)."""

    row_id: int
    image: int  #: index into the image pool
    source: int
    target: int
    schedule: str


ROW_COLUMNS = AttackRow._fields


@dataclass
class AttackResult:
    """Per-attack results; row ``k`` belongs to ``row_id[k]``. Tensors are on the CPU.

    Attributes:
        row_id: int64 [K].
        success: bool [K]: the final image is classified as the target (targeted) or not as
            the source (untargeted). Always False for status ``"nonfinite"``.
        iterations: int64 [K]: updates applied, 0 .. max_iter.
        status: K strings, ``"ok"`` or ``"nonfinite"``.
        final_class: int64 [K]: argmax of the model at the final image (-1 if not finite).
        target_prob: [K]: softmax probability at the final image of the target (targeted) or of
            ``final_class`` (untargeted); NaN if not finite.
        mean_lr: [K]: mean step size over the applied updates; NaN when none was applied.
        l1: [K]: mean ``|x* - x|`` over the C*H*W values (METHOD.md's L1, [0, 1] units).
        l2, linf: [K]: Euclidean and max norms of x* - x.
        refined_l1, refined_l2, refined_linf: [K]: the same distances after the boundary
            refinement (``refine_tolerance``), each the smaller of the refined point's and the
            path point's distance (both are crossed). Equal to l1, l2, linf when refinement is
            off, for failed rows and for rows that crossed after 0 updates.
        refine_forwards: int64 [K]: forward passes the refinement cost this row (0 where it
            did not run).
        lr_trace, loss_trace: [K, max_iter]: lr_i and L_i in column i - 1 for the applied
            updates, NaN after the stop.
        borderline: [K, C, H, W] in [0, 1], the final images, or None when not kept.
        refined: [K, C, H, W] in [0, 1], the refined images (the borderline image where
            refinement did not run), or None when images are not kept.
    """

    row_id: Tensor
    success: Tensor
    iterations: Tensor
    status: list[str]
    final_class: Tensor
    target_prob: Tensor
    mean_lr: Tensor
    l1: Tensor
    l2: Tensor
    linf: Tensor
    lr_trace: Tensor
    loss_trace: Tensor
    refined_l1: Tensor
    refined_l2: Tensor
    refined_linf: Tensor
    refine_forwards: Tensor
    borderline: Tensor | None = None
    refined: Tensor | None = None

    def __len__(self) -> int:
        return len(self.row_id)

    def take(self, index: Tensor) -> AttackResult:
        """The results at positions ``index`` (int64 [k]), in that order."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                values[f.name] = None
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in index.tolist()]
            else:
                values[f.name] = value[index]
        return AttackResult(**values)

    @staticmethod
    def concat(chunks: Sequence[AttackResult]) -> AttackResult:
        """One result from chunks (e.g. everything :func:`iter_attack_rows` yielded)."""
        if not chunks:
            raise ParameterError("AttackResult.concat needs at least one chunk")
        values: dict[str, Any] = {}
        for f in fields(AttackResult):
            parts = [getattr(c, f.name) for c in chunks]
            if any(p is None for p in parts):
                values[f.name] = None
            elif isinstance(parts[0], list):
                values[f.name] = [s for p in parts for s in p]
            else:
                values[f.name] = torch.cat(parts)
        return AttackResult(**values)

    def sorted(self) -> AttackResult:
        """The results ordered by ``row_id``."""
        return self.take(torch.argsort(self.row_id, stable=True))

    def to_frame(self) -> pd.DataFrame:
        """The per-attack scalars as a DataFrame (one row per attack, no traces or images)."""
        return pd.DataFrame(
            {
                "row_id": self.row_id.numpy(),
                "success": self.success.numpy(),
                "iterations": self.iterations.numpy(),
                "status": self.status,
                "final_class": self.final_class.numpy(),
                "target_prob": self.target_prob.double().numpy(),
                "mean_lr": self.mean_lr.double().numpy(),
                "l1": self.l1.double().numpy(),
                "l2": self.l2.double().numpy(),
                "linf": self.linf.double().numpy(),
                "refined_l1": self.refined_l1.double().numpy(),
                "refined_l2": self.refined_l2.double().numpy(),
                "refined_linf": self.refined_linf.double().numpy(),
                "refine_forwards": self.refine_forwards.numpy(),
            }
        )


# --------------------------------------------------------------------------- public API


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
        schedule: a name of :data:`lib.schedules.SCHEDULES` or a schedule function.
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
            or ``"auto"`` (:func:`lib.precision.resolve` for ``device``).
        refine_tolerance: None (off) or > 0, in [0, 1] pixel units: bisect each success's last
            step down to this Linf width (module docstring, "Refinement").
        progress: show a progress bar over finished attacks (:mod:`lib.progress`).
        **schedule_constants: the schedule's constants (e.g. ``decay=0.5``).

    Returns:
        :class:`AttackResult` with N rows in input order (``row_id`` = 0 .. N-1) and
        ``borderline`` images.
    """
    images = _check_images(images, "images")
    n = images.shape[0]
    _check_mode(mode)
    if sources is None and mode == "untargeted":
        sources = _predict(model, images, batch_size=batch_size, device=device, dtype=dtype)
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
    schedule_registry.get_schedule(schedule)
    rows = _RowTable(
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
    chunks = list(_with_progress(stream, n, progress))
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
            sequence of :class:`AttackRow` (or tuples in that order). ``row_id`` values are
            unique ints; ``schedule`` names are keys of :data:`lib.schedules.SCHEDULES`.
            The order of the rows is the order of work.
        lr0, max_iter, mode, batch_size, device, dtype, precision, refine_tolerance: as in
            :func:`attack`.
        schedule_constants: per schedule name, its constants, e.g. ``{"step": {"drop": 0.5}}``.
        keep_images: put the borderline (and refined) images into the results (else None).

    Yields:
        :class:`AttackResult` chunks on the CPU.
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


# --------------------------------------------------------------------------- checks


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ParameterError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


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


@dataclass
class _RowTable:
    """A job as column tensors on the CPU; ``schedule`` indexes ``names``."""

    row_id: Tensor
    image: Tensor
    source: Tensor
    target: Tensor
    schedule: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.row_id)


def _row_table(rows: pd.DataFrame | Sequence[Any], *, pool_size: int) -> _RowTable:
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
        schedule_registry.get_schedule(name)
    lookup = {name: k for k, name in enumerate(names)}
    schedule = torch.tensor([lookup[s] for s in frame["schedule"]], dtype=torch.int64)
    return _RowTable(names=names, schedule=schedule, **columns)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class _Options:
    """How the loop runs, fixed for a job."""

    max_iter: int
    targeted: bool
    precision: str  # resolved: "float32" or "bfloat16"
    refine_tolerance: float | None
    keep_images: bool


def _start(
    model: nn.Module,
    pool: Tensor,
    rows: _RowTable,
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
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ParameterError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ParameterError(f"dtype must be a torch float dtype, got {dtype!r}")
    device = torch.device(device)
    options = _Options(
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
        schedule_registry.bind(fn, lr0=lr0, **schedule_constants.get(name, {}))
        for fn, name in zip(schedules, rows.names, strict=True)
    ]
    _check_model(model, device, dtype)
    num_classes = _num_classes(model, pool[rows.image[:1]], device=device, dtype=dtype)
    _check_rows(rows, num_classes, targeted=options.targeted, sources_known=sources_known)
    return _run(model, pool, rows, bound, options, batch_size=batch_size, device=device,
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
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
        math.isfinite(tolerance) and tolerance > 0
    ):
        raise ParameterError(
            f"refine_tolerance must be None (no refinement) or a number > 0 in [0, 1] pixel "
            f"units (e.g. 1e-4), got {tolerance!r}"
        )
    return float(tolerance)


def _check_rows(rows: _RowTable, num_classes: int, *, targeted: bool,
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


def _check_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.device.type != device.type or (
            device.index is not None and p.device.index != device.index
        ):
            raise ParameterError(
                f"the model is on {p.device} but device={str(device)!r}; move it with "
                "model.to(device)"
            )
        if p.is_floating_point() and p.dtype != dtype:
            raise ParameterError(
                f"the model's weights are {p.dtype} but dtype={dtype}; convert with "
                "model.to(dtype)"
            )
        return


def _check_range(labels: Tensor, num_classes: int, name: str) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ParameterError(
            f"{name} classes must be in 0 .. {num_classes - 1} (the model has {num_classes} "
            f"outputs), got values in [{labels.min().item()}, {labels.max().item()}]"
        )


def _to_unit(images: Tensor, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Images as ``dtype`` in [0, 1] on ``device`` (uint8 is divided by 255)."""
    if images.dtype == torch.uint8:
        return images.to(device=device, dtype=dtype).div_(255)
    return images.to(device=device, dtype=dtype)


def _num_classes(
    model: nn.Module, probe: Tensor, *, device: torch.device, dtype: torch.dtype
) -> int:
    with frozen(model), torch.no_grad():
        logits = model(_to_unit(probe, device=device, dtype=dtype))
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise ParameterError(
            f"the model must return logits [B, K]; for one image it gave {tuple(logits.shape)}"
        )
    return logits.shape[1]


def _predict(
    model: nn.Module, images: Tensor, *, batch_size: int, device: str | torch.device, dtype
) -> Tensor:
    device = torch.device(device)
    _check_model(model, device, dtype)
    with frozen(model), torch.no_grad():
        return torch.cat(
            [
                model(_to_unit(images[k : k + batch_size], device=device, dtype=dtype))
                .argmax(1)
                .cpu()
                for k in range(0, images.shape[0], batch_size)
            ]
        )


def _with_progress(stream: Iterator[AttackResult], total: int, progress: bool):
    if not progress:
        yield from stream
        return
    from lib.progress import progress_bar

    with progress_bar(total, desc="attacks", unit="attack") as bar:
        for chunk in stream:
            bar.update(len(chunk))
            yield chunk


@dataclass
class _Slots:
    """The rows in flight: one tensor row per slot, all on the compute device."""

    position: Tensor  # int64 [B]: index into the row table
    x: Tensor  # [B, C, H, W]: current iterate
    previous: Tensor  # [B, C, H, W]: the iterate before the last update (kept when refining)
    clean: Tensor  # [B, C, H, W]: the original image
    source: Tensor  # int64 [B]
    target: Tensor  # int64 [B]
    schedule: Tensor  # int64 [B]
    step: Tensor  # int64 [B]: updates applied so far
    losses: Tensor  # [B, max_iter]: L_i in column i - 1, NaN beyond
    lrs: Tensor  # [B, max_iter]: lr_i in column i - 1, NaN beyond

    def __len__(self) -> int:
        return len(self.position)

    def put(self, index: Tensor, other: _Slots) -> None:
        """Overwrite the slots at ``index`` with ``other``'s rows, in place."""
        for f in fields(self):
            getattr(self, f.name).index_copy_(0, index, getattr(other, f.name))

    def keep(self, mask: Tensor) -> _Slots:
        return _Slots(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})


def _load(
    pool: Tensor,
    rows: _RowTable,
    start: int,
    stop: int,
    *,
    max_iter: int,
    device: torch.device,
    dtype: torch.dtype,
) -> _Slots:
    """Fresh slots for rows ``start .. stop - 1`` of the job."""
    clean = _to_unit(pool[rows.image[start:stop]], device=device, dtype=dtype)
    count = stop - start
    return _Slots(
        position=torch.arange(start, stop, device=device),
        x=clean.clone(),
        previous=clean.clone(),
        clean=clean,
        # copies: refills write into these slots in place, never into the caller's tensors
        source=rows.source[start:stop].to(device, copy=True),
        target=rows.target[start:stop].to(device, copy=True),
        schedule=rows.schedule[start:stop].to(device, copy=True),
        step=torch.zeros(count, dtype=torch.int64, device=device),
        losses=torch.full((count, max_iter), math.nan, dtype=dtype, device=device),
        lrs=torch.full((count, max_iter), math.nan, dtype=dtype, device=device),
    )


def _run(
    model: nn.Module,
    pool: Tensor,
    rows: _RowTable,
    schedules: list[Callable[..., Tensor]],
    options: _Options,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[AttackResult]:
    """The batched loop (see the module docstring); yields finished rows per iteration."""
    load = dict(max_iter=options.max_iter, device=device, dtype=dtype)
    queued = min(batch_size, len(rows))
    slots = _load(pool, rows, 0, queued, **load)
    with frozen(model):
        while len(slots):
            finished, nonfinite, logits = _iterate(model, slots, schedules, options)
            if not finished.any():
                continue
            index = finished.nonzero().flatten()
            yield _emit(model, slots, index, nonfinite, logits, rows, options)
            refill = min(len(index), len(rows) - queued)
            if refill:
                slots.put(index[:refill], _load(pool, rows, queued, queued + refill, **load))
                queued += refill
            if refill < len(index):
                running = torch.ones(len(slots), dtype=torch.bool, device=device)
                running[index[refill:]] = False
                slots = slots.keep(running)


def _crossed(logits: Tensor, *, target: Tensor, source: Tensor, targeted: bool) -> Tensor:
    """[B] bool: the logits classify as ``target`` (targeted) or not as ``source``."""
    predicted = logits.argmax(1)
    return predicted == target if targeted else predicted != source


def _gap(logits: Tensor, *, target: Tensor, source: Tensor, targeted: bool) -> Tensor:
    """[B]: how far the logits are from crossing (<= 0 at or past the boundary)."""
    aim = target if targeted else source
    own = logits.gather(1, aim[:, None]).squeeze(1)
    others = logits.scatter(1, aim[:, None], -math.inf).amax(1)
    return others - own if targeted else own - others


def _check_crossing(
    model: nn.Module, x: Tensor, logits: Tensor, slots: _Slots, options: _Options
) -> tuple[Tensor, Tensor]:
    """Which slots have crossed, by a check in the engine's dtype; and logits to report.

    float32 precision: the forward's own logits decide, as in the loop of the module
    docstring. Low precision: every slot that the low-precision logits call crossed or put
    within :data:`CONFIRM_MARGIN` of crossing, and every slot at the end of its budget, is
    evaluated again without autocast; only that forward can say "crossed", and its logits
    replace the low-precision ones (so reported classes and probabilities are float32).
    """
    sides = dict(target=slots.target, source=slots.source, targeted=options.targeted)
    if options.precision == "float32":
        return _crossed(logits, **sides), logits
    gap = _gap(logits, **sides)
    check = ~(gap > CONFIRM_MARGIN) | (slots.step >= options.max_iter)  # NaN gaps are checked
    checked = logits.clone()
    index = check.nonzero().flatten()
    if len(index):
        with torch.no_grad():
            checked[index] = model(x[index]).to(logits.dtype)
    return check & _crossed(checked, **sides), checked


def _iterate(
    model: nn.Module, slots: _Slots, schedules: list[Callable[..., Tensor]], options: _Options
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward, the stop check, one backward and the update of the unfinished slots.

    Returns (finished [B] bool, nonfinite [B] bool, the logits of the checked images [B, K],
    in the engine's dtype for every finished slot).
    """
    with torch.enable_grad():
        x = slots.x.requires_grad_(True)
        logits = precision_lib.forward(model, x, precision=options.precision)
        finite = torch.isfinite(logits).all(1)
        logits = torch.where(finite[:, None], logits, 0)
        aim = slots.target if options.targeted else slots.source
        loss = F.cross_entropy(logits, aim, reduction="none")
        finite = finite & torch.isfinite(loss)
        crossed, checked = _check_crossing(model, x.detach(), logits.detach(), slots, options)
        finite = finite & torch.isfinite(checked).all(1)
        finished = ~finite | (finite & crossed) | (slots.step >= options.max_iter)
        going = ~finished
        if not going.any():
            slots.x = x.detach()
            return finished, ~finite, checked
        (grad,) = torch.autograd.grad(torch.where(going, loss, 0).sum(), x)
    bad_grad = _update(slots, x.detach(), grad, loss.detach(), going, schedules, options)
    return finished | bad_grad, ~(finite & ~bad_grad), checked


def _update(
    slots: _Slots,
    x: Tensor,
    grad: Tensor,
    loss: Tensor,
    going: Tensor,
    schedules: list[Callable[..., Tensor]],
    options: _Options,
) -> Tensor:
    """The signed step of the ``going`` slots; returns the slots whose gradient is not finite.

    Those take no step (they fail as ``"nonfinite"``); the others record L_i and lr_i.
    """
    with torch.no_grad():
        bad_grad = going & ~torch.isfinite(grad).flatten(1).all(1)
        going = going & ~bad_grad
        rows = going.nonzero().flatten()
        step = slots.step[rows]
        slots.losses[rows, step] = loss[rows]
        lr = torch.zeros(len(slots), dtype=x.dtype, device=x.device)
        for k, fn in enumerate(schedules):
            group = going & (slots.schedule == k)
            if group.any():
                lr[group] = fn(slots.step[group] + 1, slots.losses[group])
        slots.lrs[rows, step] = lr[rows]
        direction = -1.0 if options.targeted else 1.0
        stepped = (x + (direction * lr)[:, None, None, None] * grad.sign()).clamp_(0, 1)
        moving = going[:, None, None, None]
        if options.refine_tolerance is not None:
            slots.previous = torch.where(moving, x, slots.previous)
        slots.x = torch.where(moving, stepped, x)
        slots.step += going
    return bad_grad


def _refine(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    todo: Tensor,
    *,
    target: Tensor,
    source: Tensor,
    options: _Options,
) -> tuple[Tensor, Tensor]:
    """Bisect the segment ``start`` -> ``end`` of the rows in ``todo`` to the boundary.

    ``start`` [k, C, H, W] is the last iterate not crossed and ``end`` the first crossed one.
    The bracket [low, high] (fractions of the segment; high always crossed, checked by a
    forward in the engine's dtype without autocast) halves until its width in Linf pixel
    units, (high - low) * max |end - start|, is at most the tolerance: ceil(log2(step /
    tolerance)) forwards for a last step of Linf length ``step`` > tolerance, none otherwise.

    Returns (the points at ``high`` [k, C, H, W], ``end`` where not refined; forwards int64 [k]).
    """
    refined = end.clone()
    forwards = torch.zeros(len(end), dtype=torch.int64, device=end.device)
    rows = todo.nonzero().flatten()
    if options.refine_tolerance is None or len(rows) == 0:
        return refined, forwards
    low_point, change = start[rows], end[rows] - start[rows]
    span = change.flatten(1).abs().amax(1)
    low = torch.zeros(len(rows), dtype=end.dtype, device=end.device)
    high = torch.ones_like(low)
    target, source = target[rows], source[rows]
    while True:
        active = ((high - low) * span > options.refine_tolerance).nonzero().flatten()
        if len(active) == 0:
            break
        middle = (low[active] + high[active]) / 2
        point = low_point[active] + middle[:, None, None, None] * change[active]
        hit = _crossed(model(point.clamp(0, 1)), target=target[active],
                       source=source[active], targeted=options.targeted)
        high[active] = torch.where(hit, middle, high[active])
        low[active] = torch.where(hit, low[active], middle)
        forwards[rows[active]] += 1
    moved = high < 1
    inner = (low_point + high[:, None, None, None] * change).clamp(0, 1)
    refined[rows] = torch.where(moved[:, None, None, None], inner, end[rows])
    return refined, forwards


def _distances(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean-absolute L1, L2 and Linf of ``delta`` [k, C, H, W], each [k]."""
    flat = delta.flatten(1)
    return flat.abs().mean(1), flat.norm(dim=1), flat.abs().amax(1)


def _emit(
    model: nn.Module,
    slots: _Slots,
    index: Tensor,
    nonfinite: Tensor,
    logits: Tensor,
    rows: _RowTable,
    options: _Options,
) -> AttackResult:
    """The results of the finished slots at ``index``, on the CPU."""
    with torch.no_grad():
        bad = nonfinite[index]
        predicted = logits[index].argmax(1)
        aim = slots.target[index] if options.targeted else predicted
        probability = torch.softmax(logits[index], 1).gather(1, aim[:, None]).squeeze(1)
        success = _crossed(logits[index], target=slots.target[index],
                           source=slots.source[index], targeted=options.targeted) & ~bad
        final, clean = slots.x[index].detach(), slots.clean[index]
        iterations = slots.step[index]
        refined, forwards = _refine(
            model, slots.previous[index], final, success & (iterations > 0),
            target=slots.target[index], source=slots.source[index], options=options,
        )
        path = _distances(final - clean)
        near = [torch.minimum(a, b) for a, b in zip(_distances(refined - clean), path, strict=True)]
        lrs = slots.lrs[index]
        mean_lr = torch.where(
            iterations > 0, lrs.nansum(1) / iterations.clamp(min=1).to(lrs.dtype), math.nan
        )
        position = slots.position[index].cpu()
        return AttackResult(
            row_id=rows.row_id[position],
            success=success.cpu(),
            iterations=iterations.cpu(),
            status=[STATUS_NONFINITE if b else STATUS_OK for b in bad.cpu().tolist()],
            final_class=torch.where(bad, -1, predicted).cpu(),
            target_prob=torch.where(bad, math.nan, probability).cpu(),
            mean_lr=mean_lr.cpu(),
            l1=path[0].cpu(),
            l2=path[1].cpu(),
            linf=path[2].cpu(),
            lr_trace=lrs.cpu(),
            loss_trace=slots.losses[index].cpu(),
            refined_l1=near[0].cpu(),
            refined_l2=near[1].cpu(),
            refined_linf=near[2].cpu(),
            refine_forwards=forwards.cpu(),
            borderline=final.cpu() if options.keep_images else None,
            refined=refined.cpu() if options.keep_images else None,
        )
