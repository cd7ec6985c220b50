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
crossed: a borderline image. With ``loss="logit_margin"`` the loop follows the logit margin
instead of CE, the same way (:mod:`lib.attack.losses`).

How the engine runs many attacks
--------------------------------
A job is a plain, stably ordered table of rows ``(row_id, image, source, target, schedule)``;
``image`` indexes a pool of images. The engine keeps up to ``batch_size`` rows "in flight" as
slots; every slot's state is a tensor row: current image, clean image, step index (updates
applied), loss and step-size history. One iteration is:

1. one forward pass of the whole batch with the input requiring grad. Its logits serve both the
   flip check (before the update, as in the loop above) and the loss;
2. a sample is *finished* when it has crossed, has used ``max_iter`` updates, or its logits or
   loss are not finite (status ``"nonfinite"``: it fails alone, the others go on); with the
   certified stop on (``certify``), also when interval bounds prove that it cannot cross within
   the steps it has left (:mod:`lib.attack.stop`): it then reports the full loop's outcome,
   failure after ``max_iter`` updates, and the update k of the proof as ``certified_at``;
3. one backward pass to the input for the whole batch (the loss of finished samples is masked
   out), then for each schedule present, that schedule's function gives the step sizes of its
   samples (selected by mask), and the unfinished samples take their signed step and are
   clipped to [0, 1];
4. finished samples are emitted (an :class:`~lib.attack.results.AttackResult` chunk, moved to
   the CPU) and their slots are refilled in place (``index_copy_``) with the next rows of the
   queue, in row order. When the queue is empty, the batch shrinks to the rows still running.

So the batch stays full, and a row costs ``iterations + 1`` forward and backward passes, no
more (``certified_at + 1`` and its checks when the certified stop finished it). Memory is
bounded by ``batch_size`` (plus the row table and the image pool): results leave as they
finish (:func:`~lib.attack.api.iter_attack_rows`), and the caller writes or drops them.
Everything is deterministic: the same rows in the same order with the same batch size and
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

Successful rows can be refined to the boundary inside their last step
(``refine_tolerance``, :mod:`lib.attack.boundary`).

During the attack the model is in eval mode with its weights frozen
(:func:`lib.model.network.frozen`, 5-6x faster); the caller's flags and train/eval modes are
restored afterwards. The model takes images in [0, 1] (normalisation inside); the engine
computes on its device and in its dtype (:func:`model_placement`).

Adding a schedule: write ``fn(step, losses, *, lr0, **constants) -> Tensor[B]`` in
:mod:`lib.attack.schedules` and add one line to ``SCHEDULES`` (see that module's docstring). The
engine then accepts its name in rows and in :func:`~lib.attack.api.attack`, and its constants
through ``constants`` (or ``schedule_constants`` for a row table). A bound of its remaining
steps in :data:`lib.attack.step_bounds.REMAINING` lets the certified stop finish its rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lib.attack.boundary import crossed, distances, gap, refine
from lib.attack.losses import attacked_loss
from lib.attack.results import STATUS_NONFINITE, STATUS_OK, AttackResult
from lib.attack.stop import CertifiedStop
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
    stop: CertifiedStop | None = None  # the certified stop (lib.attack.stop), None when off
    loss: str = "cross_entropy"  # the loss followed (lib.attack.losses.LOSSES)


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


def model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and float dtype the engine computes in: those of every parameter and buffer.

    Integer buffers count for the device only.

    Raises:
        ParameterError: the model has no parameter or buffer, or two of its tensors differ in
            device or float dtype (the message names both).
    """
    tensors = [*(("parameter", name, t) for name, t in model.named_parameters()),
               *(("buffer", name, t) for name, t in model.named_buffers())]
    floats = [entry for entry in tensors if entry[2].is_floating_point()]
    if not floats:
        raise ParameterError(
            "the model has no float parameter or buffer, so the engine cannot tell its device "
            "and dtype; register one (e.g. a buffer) or wrap the model in a module that has one"
        )
    first_kind, first_name, first = floats[0]
    for kind, name, tensor in tensors:
        if tensor.device != first.device:
            raise ParameterError(
                f"the model's {kind} {name!r} is on {tensor.device} but its {first_kind} "
                f"{first_name!r} is on {first.device}; move the whole model with "
                "model.to(device)"
            )
        if tensor.is_floating_point() and tensor.dtype != first.dtype:
            raise ParameterError(
                f"the model's {kind} {name!r} is {tensor.dtype} but its {first_kind} "
                f"{first_name!r} is {first.dtype}; convert the whole model with model.to(dtype)"
            )
    return first.device, first.dtype


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
    checks: Tensor  # int64 [B]: certified-stop checks made

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
        checks=torch.zeros(count, dtype=torch.int64, device=device),
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
            outcome = _iterate(model, slots, schedules, options)
            if not outcome.finished.any():
                continue
            index = outcome.finished.nonzero().flatten()
            yield _emit(model, slots, index, outcome, rows, options)
            refill = min(len(index), len(rows) - queued)
            if refill:
                slots.put(index[:refill], _load(pool, rows, queued, queued + refill, **load))
                queued += refill
            if refill < len(index):
                running = torch.ones(len(slots), dtype=torch.bool, device=device)
                running[index[refill:]] = False
                slots = slots.keep(running)


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
        return crossed(logits, **sides), logits
    distance = gap(logits, **sides)
    check = ~(distance > CONFIRM_MARGIN) | (slots.step >= options.max_iter)  # NaN is checked
    checked = logits.clone()
    index = check.nonzero().flatten()
    if len(index):
        with torch.no_grad():
            checked[index] = model(x[index]).to(logits.dtype)
    return check & crossed(checked, **sides), checked


class Outcome(NamedTuple):
    """What one iteration decided, per slot (all [B])."""

    finished: Tensor  # bool: crossed, out of budget, not finite or certified
    nonfinite: Tensor  # bool: logits, loss or gradient not finite
    certified: Tensor  # bool: the certified stop proved the attack cannot succeed
    logits: Tensor  # [B, K]: the logits to report, in the engine's dtype for finished slots


def _iterate(
    model: nn.Module, slots: _Slots, schedules: list[Callable[..., Tensor]], options: LoopOptions
) -> Outcome:
    """One forward, the stop checks, one backward and the update of the unfinished slots."""
    with torch.enable_grad():
        x = slots.x.requires_grad_(True)
        logits = precision_lib.forward(model, x, precision=options.precision)
        finite = torch.isfinite(logits).all(1)
        logits = torch.where(finite[:, None], logits, 0)
        aim = slots.target if options.targeted else slots.source
        loss = attacked_loss(logits, aim, kind=options.loss)
        finite = finite & torch.isfinite(loss)
        hit, checked = _check_crossing(model, x.detach(), logits.detach(), slots, options)
        finite = finite & torch.isfinite(checked).all(1)
        finished = ~finite | (finite & hit) | (slots.step >= options.max_iter)
        certified = _certify(model, x.detach(), checked, slots, ~finished, options)
        finished = finished | certified
        going = ~finished
        if not going.any():
            slots.x = x.detach()
            return Outcome(finished, ~finite, certified, checked)
        (grad,) = torch.autograd.grad(torch.where(going, loss, 0).sum(), x)
    bad_grad = _update(slots, x.detach(), grad, loss.detach(), going, schedules, options)
    return Outcome(finished | bad_grad, ~(finite & ~bad_grad), certified, checked)


def _certify(model: nn.Module, x: Tensor, checked: Tensor, slots: _Slots, going: Tensor,
             options: LoopOptions) -> Tensor:
    """bool [B]: the going slots the certified stop finishes now (:mod:`lib.attack.stop`).

    Counts the checks per slot. In low precision the certified slots' logits in ``checked``
    are replaced by a forward in the engine's dtype, which they are reported by (a slot that
    forward calls crossed is not stopped: it goes on as the full loop would).
    """
    stop = options.stop
    if stop is None:
        return torch.zeros_like(going)
    due, radius = stop.due(slots.step, slots.losses, slots.schedule, going)
    if not due.any():
        return due
    slots.checks += due
    certified = stop.certify(x, radius, due, target=slots.target, source=slots.source)
    index = certified.nonzero().flatten()
    if options.precision != "float32" and len(index):
        with torch.no_grad():
            exact = model(x[index]).to(checked.dtype)
        hit = crossed(exact, target=slots.target[index], source=slots.source[index],
                      targeted=options.targeted)
        checked[index] = exact
        certified[index[hit]] = False
    return certified


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


def _emit(
    model: nn.Module,
    slots: _Slots,
    index: Tensor,
    outcome: Outcome,
    rows: RowTable,
    options: LoopOptions,
) -> AttackResult:
    """The results of the finished slots at ``index``, on the CPU."""
    with torch.no_grad():
        bad = outcome.nonfinite[index]
        logits = outcome.logits[index]
        predicted = logits.argmax(1)
        aim = slots.target[index] if options.targeted else predicted
        probability = torch.softmax(logits, 1).gather(1, aim[:, None]).squeeze(1)
        success = crossed(logits, target=slots.target[index],
                           source=slots.source[index], targeted=options.targeted) & ~bad
        final, clean = slots.x[index].detach(), slots.clean[index]
        certified = outcome.certified[index]
        step = slots.step[index]
        iterations = torch.where(certified, options.max_iter, step)
        refined, forwards = refine(
            model, slots.previous[index], final, success & (iterations > 0),
            target=slots.target[index], source=slots.source[index], targeted=options.targeted,
            tolerance=options.refine_tolerance,
        )
        path = distances(final - clean)
        near = [torch.minimum(a, b) for a, b in zip(distances(refined - clean), path, strict=True)]
        lrs = slots.lrs[index]
        if certified.any():
            lrs = options.stop.fill_rates(lrs, step, slots.schedule[index], slots.losses[index],
                                          certified)
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
            certified_at=torch.where(certified, step, -1).cpu(),
            certify_checks=slots.checks[index].cpu(),
            borderline=final.cpu() if options.keep_images else None,
            refined=refined.cpu() if options.keep_images else None,
        )
