"""Step-size schedules of the attack: small pure functions and their registry.

A schedule gives, for every sample of a batch, the step size of the update about to be applied::

    fn(step: LongTensor[B], losses: Tensor[B, T], *, lr0: float, **constants) -> Tensor[B]

- ``step[b] = i`` (1-based) means update ``i`` of sample ``b`` comes next;
- ``losses[b, :i]`` holds that sample's loss history L_1 .. L_i, where L_i is the loss at the
  image update ``i`` starts from; columns ``>= i`` are unspecified (the engine keeps NaN there)
  and a schedule must not read them;
- the result has the dtype and device of ``losses``; ``lr0 > 0`` is the initial step in pixel
  units ([0, 1] images). Constants (``decay``, ``drop``, ``every``) are keyword parameters with
  the defaults of the method chapter's table (book/method.md, "The five step-size schedules").

Adding a schedule is one function and one registry line. In this module, define the function
and add ``"cosine": cosine,`` to :data:`SCHEDULES`; at run time the same works from outside:

>>> import math, torch
>>> from lib.attack import schedules
>>> def cosine(step, losses, *, lr0, period=100):
...     '''lr_i = lr0 (1 + cos(pi (i - 1) / period)) / 2.'''
...     return lr0 * (1 + torch.cos(math.pi * (step - 1).to(losses.dtype) / period)) / 2
>>> schedules.SCHEDULES["cosine"] = cosine
>>> schedules.preview("cosine", lr0=0.1, steps=3, period=2)
tensor([0.1000, 0.0500, 0.0000], dtype=torch.float64)
>>> del schedules.SCHEDULES["cosine"]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from lib.errors import ParameterError

#: A schedule: ``fn(step, losses, *, lr0, **constants) -> Tensor[B]`` (see the module docstring).
Schedule = Callable[..., Tensor]


def _index(step: Tensor, losses: Tensor) -> Tensor:
    """The 0-based update index ``i - 1`` in the dtype of ``losses``."""
    return (step - 1).to(losses.dtype)


def constant(step: Tensor, losses: Tensor, *, lr0: float) -> Tensor:
    """lr_i = lr0."""
    return torch.full(step.shape, lr0, dtype=losses.dtype, device=losses.device)


def iteration(step: Tensor, losses: Tensor, *, lr0: float, decay: float = 0.5) -> Tensor:
    """Iteration-based decay: lr_i = lr0 / (1 + decay (i - 1))."""
    return lr0 / (1 + decay * _index(step, losses))


def exponential(step: Tensor, losses: Tensor, *, lr0: float, decay: float = 0.5) -> Tensor:
    """Exponential decay: lr_i = lr0 exp(-decay (i - 1)). The sum of all steps is bounded."""
    return lr0 * torch.exp(-decay * _index(step, losses))


def step_decay(
    step: Tensor, losses: Tensor, *, lr0: float, drop: float = 0.5, every: int = 1
) -> Tensor:
    """Step decay: lr_i = lr0 drop^floor((i - 1) / every) (registry name ``"step"``).

    The paper prints ``lr0*0.5*floor((i-1)/1)``; the method chapter reads it as this standard
    decay ("Decisions where the paper is open").
    """
    drops = torch.div(step - 1, every, rounding_mode="floor").to(losses.dtype)
    return lr0 * torch.pow(drop, drops)


def loss_adaptive(step: Tensor, losses: Tensor, *, lr0: float) -> Tensor:
    """The paper's loss-adaptive step: lr_i = lr0 F_i.

    F_i is the newest value of the history {L_1, ..., L_i, 0} min-max rescaled to [0, 1]. For a
    non-negative loss such as cross-entropy this is L_i / max(L_1..L_i), so lr_1 = lr0. A
    history with no spread (all values equal, e.g. all zero) gives F_i = 1.
    """
    valid = torch.arange(losses.shape[1], device=losses.device) < step[:, None]
    newest = losses.gather(1, (step - 1)[:, None]).squeeze(1)
    low = losses.masked_fill(~valid, math.inf).amin(1).clamp(max=0)
    high = losses.masked_fill(~valid, -math.inf).amax(1).clamp(min=0)
    spread = high - low
    factor = torch.where(spread > 0, (newest - low) / spread.where(spread > 0, 1), 1)
    return lr0 * factor


#: name -> schedule function. The names are what run folders, CSVs and notebooks use.
SCHEDULES: dict[str, Schedule] = {
    "constant": constant,
    "iteration": iteration,
    "exponential": exponential,
    "step": step_decay,
    "loss-adaptive": loss_adaptive,
}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """The schedule function for a registry name (a callable is returned as it is).

    Raises:
        ParameterError: the name is not in :data:`SCHEDULES` (the message lists the known names).
    """
    if callable(schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]
    raise ParameterError(
        f"schedule {schedule!r} is not known; expected one of {', '.join(SCHEDULES)} "
        "(or a callable; add new schedules to lib.attack.schedules.SCHEDULES)"
    )


def bind(schedule: str | Schedule, *, lr0: float, **constants: float) -> Callable[..., Tensor]:
    """``fn(step, losses)`` with ``lr0`` and the constants fixed, after checking them.

    Raises:
        ParameterError: unknown schedule, ``lr0 <= 0`` or not finite, or a constant the
            schedule does not take (the message lists the ones it takes).
    """
    fn = get_schedule(schedule)
    if not isinstance(lr0, int | float) or not math.isfinite(lr0) or lr0 <= 0:
        raise ParameterError(f"lr0 must be a finite number > 0 (pixel units), got {lr0!r}")
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [
        n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "lr0"
    ]
    unknown = sorted(set(constants) - set(known))
    if unknown and not accepts_any:
        name = schedule if isinstance(schedule, str) else getattr(fn, "__name__", repr(fn))
        raise ParameterError(
            f"schedule {name!r} takes no constant(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(known) or 'none'}"
        )
    return partial(fn, lr0=float(lr0), **constants)


def preview(
    schedule: str | Schedule,
    *,
    lr0: float,
    steps: int = 10,
    losses: Tensor | None = None,
    **constants: float,
) -> Tensor:
    """lr_1 .. lr_steps of one sample, float64 [steps], e.g. to plot or check a schedule.

    ``losses`` is that sample's loss history L_1 .. L_steps (default: all ones).
    """
    history = torch.ones(steps, dtype=torch.float64) if losses is None else losses
    history = torch.as_tensor(history, dtype=torch.float64).reshape(1, -1)
    if history.shape[1] < steps:
        raise ParameterError(f"losses has {history.shape[1]} values; preview needs {steps}")
    fn = bind(schedule, lr0=lr0, **constants)
    index = torch.arange(1, steps + 1)
    if steps == 0:
        return torch.empty(0, dtype=torch.float64)
    return torch.cat([fn(index[k : k + 1], history) for k in range(steps)])
