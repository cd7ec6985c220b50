"""How far each schedule can still move an image: bounds of the sum of its remaining steps.

For a sample about to apply update i (1-based) with a budget of ``max_iter`` = N updates, a
bound function gives an upper bound of ``lr_i + lr_{i+1} + ... + lr_N``, the largest Linf
distance (pixel units, before rounding) the remaining updates can move its image::

    fn(step: LongTensor[B], losses: Tensor[B, T], *, lr0: float, max_iter: int,
       **constants) -> Tensor[B] (float64, on step's device; 0 where step > max_iter)

with the arguments of the schedule it belongs to (:mod:`lib.attack.schedules`) and the same
constants and defaults. The closed forms are computed in float64 and rounded up by
:data:`ROUND_UP`, so each is at least the real sum and equal to it within float64 rounding.

A schedule declares its bound with one entry in :data:`REMAINING` under its registry name. A
schedule without one (the loss-adaptive schedule: its step can be as large as lr0 at any
update) has no bound, and the certified stop never stops its rows early.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from lib.attack import schedules
from lib.errors import ParameterError

#: Each closed form is multiplied by this: float64 rounding of a few operations (digamma's
#: error is below 1e-15 relative) cannot then put the bound below the real sum.
ROUND_UP = 1 + 2.0**-36

#: A bound of the remaining steps (see the module docstring).
RemainingBound = Callable[..., Tensor]


def _counts(step: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """(index i - 1 of the next update, number of updates left N - i + 1 >= 0), float64."""
    index = (step - 1).to(torch.float64)
    return index, (max_iter - index).clamp(min=0)


def constant_remaining(step: Tensor, losses: Tensor, *, lr0: float, max_iter: int) -> Tensor:
    """Constant: lr0 (N - i + 1)."""
    _, left = _counts(step, max_iter)
    return lr0 * left * ROUND_UP


def iteration_remaining(step: Tensor, losses: Tensor, *, lr0: float, max_iter: int,
                        decay: float = 0.5) -> Tensor:
    """Iteration decay: sum_{m=i}^{N} lr0 / (1 + d (m - 1)) = (lr0 / d) (psi(N + 1/d) -
    psi(i - 1 + 1/d)), psi the digamma function (lr0 (N - i + 1) when d = 0)."""
    if decay < 0:
        raise ParameterError(f"iteration decay must be >= 0 for a step bound, got {decay!r}")
    index, left = _counts(step, max_iter)
    if decay == 0:
        return lr0 * left * ROUND_UP
    shift = 1.0 / decay
    start = index + shift
    total = torch.special.digamma(start + left) - torch.special.digamma(start)
    return (lr0 / decay) * total.clamp(min=0) * ROUND_UP


def exponential_remaining(step: Tensor, losses: Tensor, *, lr0: float, max_iter: int,
                          decay: float = 0.5) -> Tensor:
    """Exponential decay: lr0 e^{-d (i - 1)} (1 - e^{-d (N - i + 1)}) / (1 - e^{-d})."""
    index, left = _counts(step, max_iter)
    if decay == 0:
        return lr0 * left * ROUND_UP
    ratio = torch.expm1(-decay * left) / math.expm1(-decay)
    return lr0 * torch.exp(-decay * index) * ratio * ROUND_UP


def _block_sum(count: Tensor, drop: float, every: int) -> Tensor:
    """sum_{n=0}^{count-1} drop^floor(n / every), float64 [B]."""
    blocks = torch.div(count, every, rounding_mode="floor")
    rest = count - blocks * every
    full = blocks if drop == 1 else (1 - drop**blocks) / (1 - drop)
    return every * full + rest * drop**blocks


def step_remaining(step: Tensor, losses: Tensor, *, lr0: float, max_iter: int,
                   drop: float = 0.5, every: int = 1) -> Tensor:
    """Step decay, lr_m = lr0 drop^floor((m - 1) / every): whole blocks of ``every`` equal
    steps form a geometric sum. From the block of update i on, the sum is drop^floor((i - 1) /
    every) times the sum of the first N - every floor((i - 1) / every) steps, less the steps
    of that block already taken."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1 or drop < 0:
        raise ParameterError(
            f"step decay needs an int every >= 1 and drop >= 0, got every={every!r}, "
            f"drop={drop!r}"
        )
    index, left = _counts(step, max_iter)
    block = torch.div(index, every, rounding_mode="floor")
    taken = index - block * every
    ahead = max_iter - block * every
    total = _block_sum(ahead, drop, every) - taken
    return torch.where(left > 0, lr0 * drop**block * total * ROUND_UP, 0.0)


#: schedule name -> bound of its remaining steps. A schedule missing here is never stopped
#: early by the certified stop.
REMAINING: dict[str, RemainingBound] = {
    "constant": constant_remaining,
    "iteration": iteration_remaining,
    "exponential": exponential_remaining,
    "step": step_remaining,
}


def get_remaining(schedule: str | schedules.Schedule) -> RemainingBound | None:
    """The bound declared for a schedule (a registry name or a registered function), or None."""
    if callable(schedule):
        names = [name for name, fn in schedules.SCHEDULES.items() if fn is schedule]
        return REMAINING.get(names[0]) if names else None
    schedules.get_schedule(schedule)
    return REMAINING.get(schedule)


def bind_remaining(schedule: str | schedules.Schedule, *, lr0: float, max_iter: int,
                   **constants: float) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``fn(step, losses)`` with lr0, max_iter and the constants fixed, or None (no bound).

    The arguments are checked as :func:`lib.attack.schedules.bind` checks them.
    """
    schedules.bind(schedule, lr0=lr0, **constants)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ParameterError(f"max_iter must be an int >= 1, got {max_iter!r}")
    bound = get_remaining(schedule)
    if bound is None:
        return None
    return partial(bound, lr0=float(lr0), max_iter=max_iter, **constants)
