"""Where an attack meets the decision boundary: the crossing test, the gap to it, and the
bisection of the last step.

:func:`crossed` is the engine's stop test (:mod:`lib.attack.engine`); :func:`gap` how far
logits are from it.

Refinement: the boundary inside the last step
---------------------------------------------
A row that crosses at update k has overshot the boundary by up to one step. With
``refine_tolerance`` (pixel units, [0, 1] scale; None = off) each successful row with k >= 1 is
bisected on the segment x_{k-1} -> x_k (:func:`refine`): forward passes only, each midpoint
checked in the engine's dtype without autocast, the crossed end of the bracket kept, until the
bracket is at most ``refine_tolerance`` wide in Linf (``ceil(log2(|x_k - x_{k-1}|_inf /
tolerance))`` forwards, 0 when the step is already that short). The path distances stay the
primary result; the refined point gives ``refined_l1``, ``refined_l2``, ``refined_linf`` (each
the smaller of the refined and the path point's distance, since both are crossed images) and
``refine_forwards``. Rows that failed or crossed after 0 updates, and every row when refinement
is off, report the path distances there and 0 forwards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def crossed(logits: Tensor, *, target: Tensor, source: Tensor, targeted: bool) -> Tensor:
    """[B] bool: the logits classify as ``target`` (targeted) or not as ``source``."""
    predicted = logits.argmax(1)
    return predicted == target if targeted else predicted != source


def gap(logits: Tensor, *, target: Tensor, source: Tensor, targeted: bool) -> Tensor:
    """[B]: how far the logits are from crossing (<= 0 at or past the boundary)."""
    aim = target if targeted else source
    own = logits.gather(1, aim[:, None]).squeeze(1)
    others = logits.scatter(1, aim[:, None], -math.inf).amax(1)
    return others - own if targeted else own - others


def refine(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    todo: Tensor,
    *,
    target: Tensor,
    source: Tensor,
    targeted: bool,
    tolerance: float | None,
) -> tuple[Tensor, Tensor]:
    """Bisect the segment ``start`` -> ``end`` of the rows in ``todo`` to the boundary.

    ``start`` [k, C, H, W] is the last iterate not crossed and ``end`` the first crossed one;
    ``target``, ``source`` int64 [k]; ``tolerance`` in Linf pixel units, None for no refinement.
    The bracket [low, high] (fractions of the segment; high always crossed, checked by a
    forward in the engine's dtype without autocast) halves until its width in Linf pixel
    units, ``(high - low) * max |end - start|``, is at most the tolerance: ``ceil(log2(step /
    tolerance))`` forwards for a last step of Linf length ``step`` > tolerance, none otherwise.

    Returns (the points at ``high`` [k, C, H, W], ``end`` where not refined; forwards int64 [k]).
    """
    refined = end.clone()
    forwards = torch.zeros(len(end), dtype=torch.int64, device=end.device)
    rows = todo.nonzero().flatten()
    if tolerance is None or len(rows) == 0:
        return refined, forwards
    low_point, change = start[rows], end[rows] - start[rows]
    span = change.flatten(1).abs().amax(1)
    low = torch.zeros(len(rows), dtype=end.dtype, device=end.device)
    high = torch.ones_like(low)
    target, source = target[rows], source[rows]
    while True:
        active = ((high - low) * span > tolerance).nonzero().flatten()
        if len(active) == 0:
            break
        middle = (low[active] + high[active]) / 2
        point = low_point[active] + middle[:, None, None, None] * change[active]
        hit = crossed(model(point.clamp(0, 1)), target=target[active],
                       source=source[active], targeted=targeted)
        high[active] = torch.where(hit, middle, high[active])
        low[active] = torch.where(hit, low[active], middle)
        forwards[rows[active]] += 1
    moved = high < 1
    inner = (low_point + high[:, None, None, None] * change).clamp(0, 1)
    refined[rows] = torch.where(moved[:, None, None, None], inner, end[rows])
    return refined, forwards


def distances(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean-absolute L1, L2 and Linf of ``delta`` [k, C, H, W], each [k]."""
    flat = delta.flatten(1)
    return flat.abs().mean(1), flat.norm(dim=1), flat.abs().amax(1)
