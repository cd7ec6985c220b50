"""Linf projected gradient descent (Madry et al. 2018) from a uniform random start, and the
step count that matches a given cost per image.

The fixed-epsilon attack the PGD training arm trains on: ``steps`` signed ascent steps of
the true class's cross-entropy, each projected back to the ``epsilon`` ball and to [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.checking import is_number
from lib.errors import ParameterError
from lib.model import precision as precision_lib
from lib.model.network import frozen

#: Relative mismatch of passes per step allowed when matching the PGD arm to the borderline arm.
MATCH_TOLERANCE = 0.1


def pgd_images(model: nn.Module, images: Tensor, labels: Tensor, *, epsilon: float, steps: int,
               step_size: float, generator: torch.Generator,
               precision: str = "float32") -> Tensor:
    """Linf PGD from a uniform random start: K signed ascent steps of the true class's CE.

    Args:
        model: images [B, C, H, W] in [0, 1] -> logits [B, K]; run in eval mode with frozen
            weights (restored afterwards).
        images: float [B, C, H, W] in [0, 1]; labels: int64 [B].
        epsilon: the Linf radius > 0; steps: K >= 1; step_size: > 0 (pixel units).
        generator: a CPU generator for the start (drawn on the CPU, so every device starts
            from the same point).
        precision: "float32" or "bfloat16" forwards.

    Returns:
        [B, C, H, W] in [0, 1] within ``epsilon`` of ``images`` in Linf (detached).
    """
    noise = torch.rand(images.shape, generator=generator, dtype=torch.float64)
    start = images + (2 * noise - 1).to(images) * epsilon
    low, high = (images - epsilon).clamp(0, 1), (images + epsilon).clamp(0, 1)
    x = torch.minimum(torch.maximum(start, low), high).detach()
    with frozen(model), torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            logits = precision_lib.forward(model, x, precision=precision)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x)
            x = torch.minimum(torch.maximum(x.detach() + step_size * grad.sign(), low), high)
    return x.detach()


def pgd_steps_for(passes_per_image: float, *, tolerance: float = MATCH_TOLERANCE) -> int:
    """The PGD step count K whose passes per image (K + 1) match ``passes_per_image``.

    Args:
        passes_per_image: the borderline arm's measured mean
            :attr:`lib.train.borderline.Passes.total` per step, divided by the batch size (> 1).
        tolerance: the largest allowed relative mismatch ``|K + 1 - p| / p``.

    Raises:
        ParameterError: no K >= 1 matches within ``tolerance`` (the borderline arm costs
            under about two passes per image: attack a larger share, or compare at equal time).
    """
    if not is_number(passes_per_image) or not math.isfinite(passes_per_image) \
            or passes_per_image <= 1:
        raise ParameterError(
            f"passes_per_image must be a finite number > 1 (training pass plus attack), got "
            f"{passes_per_image!r}"
        )
    steps = max(1, math.floor(passes_per_image - 1 + 0.5))
    mismatch = abs(steps + 1 - passes_per_image) / passes_per_image
    if mismatch > tolerance:
        raise ParameterError(
            f"no PGD step count matches {passes_per_image:.3g} passes per image within "
            f"{tolerance:.0%} (K = {steps} costs {steps + 1}, {mismatch:.0%} off); attack a "
            "larger share in the borderline arm, or compare the arms at equal time"
        )
    return steps
