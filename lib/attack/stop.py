"""The certified early stop: finish, as failed, the attacks that provably cannot succeed.

An attack that has applied k updates sits at x_k. Its remaining updates k + 1 .. N can move it
by at most R_k in Linf, the sum of its remaining step sizes (:mod:`lib.attack.step_bounds`,
widened for float rounding by :func:`lib.attack.bounds.reachable_radius`), and never out of
[0, 1]. If interval bounds of the logits over that box (:mod:`lib.attack.bounds`) prove that no
image in it is classified as the target (targeted) or as anything but the source (untargeted),
every later iterate of the full loop is not crossed either: the attack fails with all N
updates, whatever its steps are. The engine then finishes the row at once and reports exactly
what the full loop reports for its outcome (``success`` False, ``iterations`` = N), with the
distances, class and probability of x_k and the update k as ``certified_at``
(:class:`~lib.attack.results.AttackResult`).

When to check. A check costs about one forward + backward pass (1.1-1.5 on AlexNet at 64 px)
and can only succeed once R_k is small against the row's distance from the boundary. A row is
checked after update k when

- its schedule declares a bound of its remaining steps (:data:`lib.attack.step_bounds.REMAINING`:
  constant, iteration, exponential and step; never the loss-adaptive schedule);
- k is a positive multiple of :data:`CHECK_EVERY`; and
- R_k <= :data:`CHECK_RADIUS` (the cheap test: a closed form per row).

On the default run's last checkpoint every failed exponential and step row was certified at an
update between 14 and 43 (of 100), and none crossed later; the constant and iteration
schedules' radii stay above the threshold, so their rows cost no check.

The stop changes no outcome: a certified row's ``success`` and ``iterations`` are the full
loop's by the proof above, and the other rows' results do not depend on which rows share
their batch (the method chapter, book/method.md, says where float32 arithmetic makes that an
assumption about the convolution kernels, and how it is tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lib.attack import bounds, step_bounds

#: The cheap test: a row is checked only while its reachable radius R_k is at most this (pixel
#: units). At the default lr0 (0.008), R_k falls below it after update 12 (step decay) and 17
#: (exponential decay); checks at larger radii almost never certify.
CHECK_RADIUS = 1e-5
#: Rows are checked after updates k = 8, 16, 24, ...: checking after every update saves 39.4 %
#: of the default attack job's passes before the checks' cost, every 8 updates 35.8 % net.
CHECK_EVERY = 8


@dataclass(frozen=True)
class CertifiedStop:
    """The certified stop of one engine job (see the module docstring).

    Attributes:
        network: the job's model prepared for interval bounds.
        rates: per schedule of the job (the row table's schedule index), its step-size function
            ``fn(step, losses) -> lr`` with lr0 and constants bound.
        remaining: per schedule, the bound of its remaining steps ``fn(step, losses)``, or
            None (its rows are never stopped early).
        max_iter: the update budget N.
        targeted: targeted (the target must win) or untargeted (the source must lose).
    """

    network: bounds.IntervalNetwork
    rates: tuple[Callable[[Tensor, Tensor], Tensor], ...]
    remaining: tuple[Callable[[Tensor, Tensor], Tensor] | None, ...]
    max_iter: int
    targeted: bool

    def due(self, step: Tensor, losses: Tensor, schedule: Tensor,
            going: Tensor) -> tuple[Tensor, Tensor]:
        """Which rows to check now, and their reachable radius.

        Args:
            step: int64 [B], updates applied so far (k).
            losses: [B, N], the loss history (NaN beyond k).
            schedule: int64 [B], each row's schedule index.
            going: bool [B], rows that are neither crossed nor at the end of their budget.

        Returns:
            (bool [B]: rows to check; [B] in the dtype of ``losses``: R_k, inf where not
            computed).
        """
        due = going & (step > 0) & (step % CHECK_EVERY == 0)
        radius = torch.full(step.shape, math.inf, dtype=torch.float64, device=step.device)
        for k, bound in enumerate(self.remaining):
            group = due & (schedule == k)
            if bound is not None and bool(group.any()):
                radius[group] = bound(step[group] + 1, losses[group]).to(radius)
        radius = bounds.reachable_radius(radius, dtype=losses.dtype)
        return due & (radius <= CHECK_RADIUS), radius

    def certify(self, x: Tensor, radius: Tensor, due: Tensor, *, target: Tensor,
                source: Tensor) -> Tensor:
        """bool [B]: the rows of ``due`` proven unable to cross within ``radius`` of ``x``.

        Args:
            x: [B, C, H, W] in [0, 1], the current iterates (the model's device and dtype).
            radius: [B], R_k of each row.
            due: bool [B], the rows to check (from :meth:`due`).
            target, source: int64 [B], the rows' classes.
        """
        certified = torch.zeros_like(due)
        index = due.nonzero().flatten()
        if len(index):
            gap = bounds.certified_gap(self.network, x[index], radius[index],
                                       target=target[index], source=source[index],
                                       targeted=self.targeted)
            certified[index[gap > 0]] = True
        return certified

    def fill_rates(self, lrs: Tensor, step: Tensor, schedule: Tensor, losses: Tensor,
                   rows: Tensor) -> Tensor:
        """The lr traces with the steps the full loop would take after update k filled in.

        Args:
            lrs: [R, N], lr_i in column i - 1 for the applied updates, NaN beyond.
            step: int64 [R], updates applied (k).
            schedule: int64 [R], schedule indices.
            losses: [R, N], the loss histories (NaN beyond k): a schedule that reads the loss
                of a later update gets NaN there and its trace stays NaN.
            rows: bool [R], the rows to fill (the certified ones).

        Returns:
            [R, N]: ``lrs`` with columns k .. N - 1 of the chosen rows replaced.
        """
        filled = lrs.clone()
        updates = torch.arange(1, self.max_iter + 1, device=step.device)  # i
        for k, rate in enumerate(self.rates):
            chosen = (rows & (schedule == k)).nonzero().flatten()
            if len(chosen) == 0:
                continue
            count = len(chosen)
            values = rate(updates.repeat(count),
                          losses[chosen].repeat_interleave(self.max_iter, 0))
            later = updates[None, :] > step[chosen, None]
            filled[chosen] = torch.where(later, values.view(count, -1).to(lrs), lrs[chosen])
        return filled


def prepare_stop(model: nn.Module, schedules: Sequence[object], names: Sequence[str], *,
                 rates: Sequence[Callable[[Tensor, Tensor], Tensor]], lr0: float,
                 max_iter: int, constants: Mapping[str, Mapping[str, float]],
                 targeted: bool) -> CertifiedStop | None:
    """The certified stop of a job, or None when no schedule of the job has a step bound.

    Args:
        model: the job's model (its weights final).
        schedules: per schedule index, the name or function the rows use.
        names: per schedule index, its name (the key of ``constants``).
        rates: per schedule index, its bound step-size function.
        lr0, max_iter: the job's.
        constants: per schedule name, its constants.
        targeted: the job's mode.

    Raises:
        ParameterError: the model holds a layer the interval bounds do not cover (named, with
            the advice to turn the stop off).
    """
    remaining = tuple(
        step_bounds.bind_remaining(schedule, lr0=lr0, max_iter=max_iter,
                                   **constants.get(name, {}))
        for schedule, name in zip(schedules, names, strict=True)
    )
    if all(bound is None for bound in remaining):
        return None
    return CertifiedStop(network=bounds.IntervalNetwork(model), rates=tuple(rates),
                         remaining=remaining, max_iter=max_iter, targeted=targeted)
