"""The attack engine: batched I-FGSM that stops every sample at its flip (the method chapter,
book/method.md, "The attack: targeted, stopped at the flip").

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
4. finished samples are emitted (an :class:`~lib.attack.results.AttackResult` chunk, moved to
   the CPU) and their slots are refilled in place (``index_copy_``) with the next rows of the
   queue, in row order. When the queue is empty, the batch shrinks to the rows still running.

So the batch stays full, and a row costs ``iterations + 1`` forward and backward passes, no
more. Memory is bounded by ``batch_size`` (plus the row table and the image pool): results
leave as they finish (:func:`~lib.attack.api.iter_attack_rows`), and the caller writes or drops
them. Everything is deterministic: the same rows in the same order with the same batch size and
dtype give bit-identical results on the CPU, so a chunk of rows can be re-run from scratch
(the unit of resume and of sharding). Different batch sizes agree exactly in float64; in float32
convolutions round differently per batch size and ``sign()`` can turn that into a different
step on rare rows (the method chapter, "Batched, and exact").

Precision: a success is a float32 success
-----------------------------------------
``precision="float32"`` (the default) is the loop above in ``dtype`` (float32, or float64 for
exactness tests). ``precision="bfloat16"`` runs the batched forward under autocast with a
channels-last input (:func:`lib.model.precision.forward`); its logits give the loss and the
gradient, so the steps follow the bfloat16 model. It never decides a result alone. The rule, per
slot and iteration:

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
those of the bfloat16 forward. ``"auto"`` resolves by :func:`lib.model.precision.resolve`.

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

During the attack the model is in eval mode with its weights frozen
(:func:`lib.model.network.frozen`, 5-6x faster); the caller's flags and train/eval modes are
restored afterwards. The model takes images in [0, 1] (normalisation inside) and must already
be on ``device`` in ``dtype``.

Adding a schedule: write ``fn(step, losses, *, lr0, **constants) -> Tensor[B]`` in
:mod:`lib.attack.schedules` and add one line to ``SCHEDULES`` (see that module's docstring). The
engine then accepts its name in rows and in :func:`~lib.attack.api.attack`, and its constants
through ``schedule_constants``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.attack.results import STATUS_NONFINITE, STATUS_OK, AttackResult
from lib.errors import ParameterError
from lib.model import precision as precision_lib
from lib.model.network import frozen

#: Low precision: a row whose low-precision logits are crossed, or within this many logits of
#: crossing (the gap between the best other class and the target, or between the source and
#: the best other class), is checked by a forward in the engine's dtype. bfloat16 keeps 8
#: mantissa bits: logits of a trained AlexNet move by a few tenths between the precisions.
CONFIRM_MARGIN = 1.0


@dataclass
class RowTable:
    """A job as column tensors on the CPU; ``schedule`` indexes ``names``."""

    row_id: Tensor
    image: Tensor
    source: Tensor
    target: Tensor
    schedule: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.row_id)


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs, fixed for a job."""

    max_iter: int
    targeted: bool
    precision: str  # resolved: "float32" or "bfloat16"
    refine_tolerance: float | None
    keep_images: bool


def to_unit(images: Tensor, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Images as ``dtype`` in [0, 1] on ``device`` (uint8 is divided by 255)."""
    if images.dtype == torch.uint8:
        return images.to(device=device, dtype=dtype).div_(255)
    return images.to(device=device, dtype=dtype)


def count_classes(
    model: nn.Module, probe: Tensor, *, device: torch.device, dtype: torch.dtype
) -> int:
    """The number of outputs K of the model, from one forward of one image."""
    with frozen(model), torch.no_grad():
        logits = model(to_unit(probe, device=device, dtype=dtype))
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise ParameterError(
            f"the model must return logits [B, K]; for one image it gave {tuple(logits.shape)}"
        )
    return logits.shape[1]


def check_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """ParameterError unless the model's weights are on ``device`` in ``dtype``."""
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


def with_progress(stream: Iterator[AttackResult], total: int, progress: bool):
    """The stream of result chunks, counted on a progress bar (:mod:`lib.progress`) of
    ``total`` attacks when asked."""
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
    rows: RowTable,
    start: int,
    stop: int,
    *,
    max_iter: int,
    device: torch.device,
    dtype: torch.dtype,
) -> _Slots:
    """Fresh slots for rows ``start .. stop - 1`` of the job."""
    clean = to_unit(pool[rows.image[start:stop]], device=device, dtype=dtype)
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


def run_rows(
    model: nn.Module,
    pool: Tensor,
    rows: RowTable,
    schedules: list[Callable[..., Tensor]],
    options: LoopOptions,
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
    model: nn.Module, x: Tensor, logits: Tensor, slots: _Slots, options: LoopOptions
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
    model: nn.Module, slots: _Slots, schedules: list[Callable[..., Tensor]], options: LoopOptions
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
    options: LoopOptions,
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
    options: LoopOptions,
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
    rows: RowTable,
    options: LoopOptions,
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
