"""The loss an attack follows: the paper's cross-entropy, or the logit margin (Carlini-Wagner).

The engine (:mod:`lib.attack.engine`) takes the sign of this loss's gradient with respect to
the image: targeted attacks descend it, untargeted attacks ascend it. ``aim`` is the target
(targeted) or the source class (untargeted).

``"cross_entropy"`` (the paper's, the default)
    ``L = CE(z, aim) = logsumexp(z) - z_aim``. Near a confident wrong class its gradient with
    respect to the logits, softmax minus one-hot, is spread over every class that still holds
    probability, and the loss of an attack far from its target can sit on a high plateau.
``"logit_margin"``
    ``L = max_{j != aim} z_j - z_aim``, the margin loss of Carlini and Wagner (2017,
    arXiv:1608.04644) without its confidence cap: the attack stops at the flip, where the loss
    of a targeted attack reaches 0 (it is > 0 before it, since another class is ahead). Its
    gradient is the difference of two logit gradients, so it pushes only the target against
    the strongest competitor, whatever the probabilities.

Both are computed per sample ([B] from logits [B, K]); the loss-adaptive schedule rescales the
history of whichever loss is chosen.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from lib.errors import ParameterError

#: The losses an attack can follow; the first is the default.
LOSSES = ("cross_entropy", "logit_margin")


def logit_margin(logits: Tensor, aim: Tensor) -> Tensor:
    """``max_{j != aim} z_j - z_aim`` per sample: logits [B, K], aim int64 [B] -> [B]."""
    own = logits.gather(1, aim[:, None]).squeeze(1)
    others = logits.scatter(1, aim[:, None], -math.inf).amax(1)
    return others - own


def attacked_loss(logits: Tensor, aim: Tensor, *, kind: str = LOSSES[0]) -> Tensor:
    """The per-sample loss the attack follows (see the module docstring).

    Args:
        logits: [B, K] model outputs.
        aim: int64 [B] in [0, K): the target (targeted) or the source (untargeted).
        kind: one of :data:`LOSSES`.

    Returns:
        [B] in the dtype of ``logits``: >= 0 for cross-entropy; for the logit margin > 0 while
        another class is ahead of ``aim``.
    """
    if kind == "cross_entropy":
        return F.cross_entropy(logits, aim, reduction="none")
    if kind == "logit_margin":
        return logit_margin(logits, aim)
    raise ParameterError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {kind!r}")
