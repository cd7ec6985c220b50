"""Robustness of a trained model measured by attacks it was not trained on, and its guards.

Per test image:

- :func:`minimum_norm_margins`: the margin, the smallest perturbation that changes the
  model's class, from adv-lib's untargeted Fast Minimum-Norm attack (Pintor et al. 2021,
  arXiv:2102.12827) in Linf or L2. A misclassified image has margin 0; an image FMN could
  not move off its class within its budget has margin ``inf``. Robust accuracy at epsilon is
  the share of images whose margin exceeds epsilon.
- :func:`fixed_epsilon_robustness`: whether the image survives adv-lib's APGD (Croce and Hein
  2020, arXiv:2003.01690) at a fixed epsilon, with restarts and with each loss of ``losses``
  in turn (cross-entropy and the difference-of-logits ratio, as AutoAttack runs them).

The guards against a robustness that only hides the gradient (gradient masking), each a
function returning a :class:`GuardOutcome`:

(a) :func:`success_guard`: the minimum-norm attack reaches every correctly classified image
    (success 100 % as epsilon grows);
(b) :func:`transfer_distances` + :func:`transfer_guard`: perturbations found on another model
    (e.g. control's borderline images), scaled along their direction, do not move images off
    their class with less than the white-box margin;
(c) :func:`input_gradients` + :func:`gradient_guard`: the gradient of the logit gap at test
    images does not vanish (and its distribution per model is reported);
(d) :func:`modes_during` + :func:`eval_mode_guard`: every forward of an attack ran with every
    module in eval mode, and the model's modes are as before afterwards.

Distances are in [0, 1] pixel units: Linf the largest change, L2 the Euclidean norm over the
C*H*W values. Every attack runs with the model in eval mode and its weights frozen
(:func:`lib.model.network.frozen`); the global RNG is seeded for adv-lib's random starts and
restored.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lib.errors import ParameterError
from lib.model.network import frozen

#: The norms of the reference attacks, by name.
NORMS: dict[str, float] = {"linf": math.inf, "l2": 2.0}
#: APGD losses: "ce" (cross-entropy) and "dlr" (difference of logits ratio; >= 3 classes).
APGD_LOSSES: tuple[str, ...] = ("ce", "dlr")
#: A found adversarial image counts only within epsilon times this (adv-lib's projection
#: rounds in float32).
EPSILON_SLACK = 1 + 1e-5


def adv_lib_attacks() -> Any:
    """adv-lib's attack module, imported lazily (it warns about distutils at import)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="distutils Version classes are deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="distutils")
        from adv_lib import attacks
    return attacks


def distances(delta: Tensor, norm: str) -> Tensor:
    """Per-image ``norm`` ("linf" or "l2") of ``delta`` [N, C, H, W], float64 [N]."""
    flat = delta.detach().flatten(1).double()
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def minimum_norm_attack(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    norm: str = "linf",
    steps: int = 200,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[pd.DataFrame, Tensor]:
    """Each image's margin from untargeted FMN in ``norm``, and FMN's images.

    Args:
        model: images [B, C, H, W] in [0, 1] -> logits [B, K], already on ``device``.
        images: float [N, C, H, W] in [0, 1]; labels: int64 [N], the true classes.
        norm: "linf" or "l2".
        steps: FMN's budget (forward + backward passes per image), >= 2.
        batch_size: images per FMN call.
        device: where the attack runs.
        seed: seeds the global RNG during the attack (restored afterwards).

    Returns:
        One row per image: ``sample`` (0 .. N-1), ``label``, ``correct`` (clean prediction),
        ``success`` (FMN's image is off the true class, checked here), ``margin`` (float64:
        0 if not correct, the distance of FMN's image if success, else ``inf``), ``seconds``
        (attack time per image); and FMN's images, float [N, C, H, W] on the CPU (e.g. for
        :func:`transfer_distances` on another model).
    """
    _check_batch(images, labels, norm=norm, budget=steps, batch_size=batch_size)
    fmn = adv_lib_attacks().fmn
    parts, found_images = [], []
    with _attacking(model, device, seed):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            began = time.perf_counter()
            adversarial = fmn(model, x, y, norm=NORMS[norm], steps=steps).detach()
            seconds = (time.perf_counter() - began) / len(x)
            found_images.append(adversarial.cpu())
            with torch.no_grad():
                correct = (model(x).argmax(1) == y).cpu()
                success = (model(adversarial).argmax(1) != y).cpu()
            found = torch.where(success, distances(adversarial - x, norm).cpu(), math.inf)
            parts.append(pd.DataFrame({
                "sample": np.arange(start, start + len(x)), "label": y.cpu().numpy(),
                "correct": correct.numpy(), "success": success.numpy(),
                "margin": torch.where(correct, found, 0.0).numpy(), "seconds": seconds,
            }))  # fmt: skip
    return pd.concat(parts, ignore_index=True), torch.cat(found_images)


def minimum_norm_margins(model: nn.Module, images: Tensor, labels: Tensor,
                         **options: Any) -> pd.DataFrame:
    """The table of :func:`minimum_norm_attack` (same arguments): each image's margin."""
    return minimum_norm_attack(model, images, labels, **options)[0]


def fixed_epsilon_robustness(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epsilon: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    losses: Sequence[str] = APGD_LOSSES,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> pd.DataFrame:
    """Whether each image keeps its class under APGD within ``epsilon``.

    An image is robust when it is classified correctly and no APGD run (each loss of
    ``losses``, each with ``restarts`` random restarts of ``steps`` iterations) finds an image
    within ``epsilon`` (checked here) that the model classifies otherwise.

    Args:
        epsilon: the radius > 0 in ``norm`` ("linf" or "l2"), pixel units.
        steps, restarts: APGD's iterations (>= 2) and restarts (>= 1) per loss.
        losses: names of :data:`APGD_LOSSES`; "dlr" needs at least 3 classes.
        model, images, labels, batch_size, device, seed: as in :func:`minimum_norm_margins`.

    Returns:
        One row per image: ``sample``, ``label``, ``correct``, ``robust``, ``distance`` (of
        the adversarial image found, NaN where none was), ``seconds`` per image.
    """
    _check_batch(images, labels, norm=norm, budget=steps, batch_size=batch_size)
    _check_apgd(epsilon, restarts, losses)
    parts = []
    with _attacking(model, device, seed):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            began = time.perf_counter()
            robust, found = _apgd_survivors(model, x, y, epsilon=epsilon, norm=norm,
                                            steps=steps, restarts=restarts, losses=losses)
            parts.append(pd.DataFrame({
                "sample": np.arange(start, start + len(x)), "label": y.cpu().numpy(),
                "correct": _correct(model, x, y).numpy(), "robust": robust.numpy(),
                "distance": found.numpy(), "seconds": (time.perf_counter() - began) / len(x),
            }))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def _apgd_survivors(model: nn.Module, x: Tensor, y: Tensor, *, epsilon: float, norm: str,
                    steps: int, restarts: int, losses: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(robust bool [B], distance float64 [B] of the adversarial image found, NaN if none)."""
    apgd = adv_lib_attacks().apgd
    robust = _correct(model, x, y)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    if "dlr" in losses and num_classes < 3:
        raise ParameterError(
            f"APGD's 'dlr' loss needs at least 3 classes; the model has {num_classes}: use "
            "losses=('ce',)"
        )
    found = torch.full((len(x),), math.nan, dtype=torch.float64)
    for loss in losses:
        alive = robust.nonzero().flatten()
        if len(alive) == 0:
            break
        adversarial = apgd(model, x[alive], y[alive], eps=epsilon, norm=NORMS[norm],
                           n_iter=steps, n_restarts=restarts, loss_function=loss).detach()
        size = distances(adversarial - x[alive], norm).cpu()
        with torch.no_grad():
            fooled = (model(adversarial).argmax(1) != y[alive]).cpu()
        fooled &= size <= epsilon * EPSILON_SLACK
        robust[alive[fooled]] = False
        found[alive[fooled]] = size[fooled]
    return robust, found


# ------------------------------------------------------------------------------- guards


@dataclass(frozen=True)
class GuardOutcome:
    """One guard's result: what was measured, against what, on how many images."""

    guard: str
    passed: bool
    value: float  #: the measured share or quantity
    threshold: float  #: what ``value`` was compared with
    images: int  #: the images the value is over
    detail: str  #: one sentence for the book


def guards_table(outcomes: Sequence[GuardOutcome]) -> pd.DataFrame:
    """The outcomes as a table, one row each."""
    return pd.DataFrame([asdict(o) for o in outcomes],
                        columns=["guard", "passed", "value", "threshold", "images", "detail"])


def success_guard(margins: pd.DataFrame, *, required: float = 1.0) -> GuardOutcome:
    """(a) The minimum-norm attack moves every correctly classified image off its class.

    ``margins`` is a table of :func:`minimum_norm_margins`; the guard passes when the share of
    correct images with a finite margin is at least ``required``. Robust accuracy then reaches
    0 at the largest margin.
    """
    correct = margins[margins["correct"].astype(bool)]
    if len(correct) == 0:
        raise ParameterError("success_guard: no correctly classified image in the table")
    finite = np.isfinite(correct["margin"].to_numpy())
    share = float(finite.mean())
    if finite.all():
        detail = (f"the minimum-norm attack moved all {len(correct)} correctly classified "
                  f"images off their class; robust accuracy is 0 from epsilon "
                  f"{float(correct['margin'].max()):.4g} on")
    else:
        detail = (f"the minimum-norm attack failed on {int((~finite).sum())} of "
                  f"{len(correct)} correctly classified images within its budget")
    return GuardOutcome(
        "reference success", share >= required, share, required, len(correct), detail,
    )  # fmt: skip


def transfer_distances(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    perturbed: Tensor,
    *,
    norm: str = "linf",
    max_scale: float = 4.0,
    grid: int = 32,
    bisections: int = 10,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """(b) How far along another model's perturbations this model changes its class.

    For each image the direction ``perturbed - images`` (found on another model) is scaled by
    ``max_scale * j / grid`` (j = 1 .. grid, clipped to [0, 1]); between the last scale that
    keeps the class and the first that changes it the scale is bisected ``bisections`` times.
    Forwards only: a black-box search along a transferred direction.

    Args:
        perturbed: float [N, C, H, W] in [0, 1], e.g. control's borderline images of the
            same test images.
        norm: the distance reported ("linf" or "l2").
        max_scale: the largest multiple of the perturbation tried (> 0); grid: scales on the
            way (>= 1); bisections: >= 0.
        model, images, labels, batch_size, device: as in :func:`minimum_norm_margins`.

    Returns:
        One row per image: ``sample``, ``correct``, ``success`` (some scale changed the class),
        ``scale`` (the smallest such scale found, NaN if none) and ``distance`` (0 if not
        correct, that image's distance, else ``inf``).
    """
    _check_batch(images, labels, norm=norm, budget=2, batch_size=batch_size)
    if perturbed.shape != images.shape or not (_is_positive(max_scale) and grid >= 1
                                               and bisections >= 0):
        raise ParameterError(
            "transfer_distances: perturbed must have the images' shape, max_scale > 0, "
            f"grid >= 1 and bisections >= 0; got {tuple(perturbed.shape)}, {max_scale!r}, "
            f"{grid!r}, {bisections!r}"
        )
    parts = []
    with frozen(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            delta = perturbed[start : start + batch_size].to(device) - x
            scale = _first_crossing(model, x, y, delta, max_scale=max_scale, grid=grid,
                                    bisections=bisections)
            point = (x + scale.nan_to_num(0).to(x)[:, None, None, None] * delta).clamp(0, 1)
            correct = _correct(model, x, y)
            size = torch.where(scale.isnan(), math.inf, distances(point - x, norm).cpu())
            parts.append(pd.DataFrame({
                "sample": np.arange(start, start + len(x)), "correct": correct.numpy(),
                "success": (~scale.isnan()).numpy(), "scale": scale.numpy(),
                "distance": torch.where(correct, size, 0.0).numpy(),
            }))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def _first_crossing(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, *,
                    max_scale: float, grid: int, bisections: int) -> Tensor:
    """float64 [B]: the smallest scale found that changes the class (NaN where none)."""
    def off_class(scale: Tensor) -> Tensor:
        point = (x + scale.to(x)[:, None, None, None] * delta).clamp(0, 1)
        return (model(point).argmax(1) != y).cpu()

    low = torch.zeros(len(x), dtype=torch.float64)
    high = torch.full((len(x),), math.nan, dtype=torch.float64)
    for j in range(1, grid + 1):
        scale = torch.full((len(x),), max_scale * j / grid, dtype=torch.float64)
        fresh = high.isnan() & off_class(scale)
        high[fresh] = scale[fresh]
        low[high.isnan()] = scale[high.isnan()]
    found = ~high.isnan()
    for _ in range(bisections):
        middle = (low + high) / 2
        hit = found & off_class(middle.nan_to_num(0))
        high = torch.where(hit, middle, high)
        low = torch.where(found & ~hit, middle, low)
    return high


def transfer_guard(white_box: pd.DataFrame, transfer: pd.DataFrame, *,
                   tolerance: float = 0.05, allowed_share: float = 0.05) -> GuardOutcome:
    """(b) The transfer attack is not stronger than the white-box one.

    Pairs by ``sample`` the white-box margins (:func:`minimum_norm_margins`) and the transfer
    distances (:func:`transfer_distances`) of one model. An image counts against the guard
    when it is correctly classified and the transfer distance is below ``(1 - tolerance)``
    times its white-box margin (a minimum-norm attack is itself approximate, hence the
    tolerance); the guard passes when such images are at most ``allowed_share``.
    """
    joined = white_box[["sample", "correct", "margin"]].merge(
        transfer[["sample", "distance"]], on="sample", validate="one_to_one")
    correct = joined[joined["correct"].astype(bool)]
    if len(correct) == 0:
        raise ParameterError("transfer_guard: no correctly classified image to compare")
    stronger = correct["distance"] < (1 - tolerance) * correct["margin"]
    share = float(stronger.mean())
    return GuardOutcome(
        "transfer not stronger", share <= allowed_share, share, allowed_share, len(correct),
        f"the transferred perturbations beat the white-box margin by more than "
        f"{tolerance:.0%} on {int(stronger.sum())} of {len(correct)} images",
    )


def input_gradients(model: nn.Module, images: Tensor, labels: Tensor, *,
                    batch_size: int = 64, device: str | torch.device = "cpu") -> pd.DataFrame:
    """(c) The gradient of the logit gap at each image (eval mode, weights frozen).

    The logit gap is the true class's logit minus the largest other one (> 0 when correct);
    unlike the cross-entropy it does not saturate on confidently classified images.

    Returns:
        One row per image: ``sample``, ``correct``, ``logit_gap``, ``grad_l1`` and
        ``grad_l2`` (norms of its gradient over the C*H*W values), ``first_order_linf`` and
        ``first_order_l2`` (the gap over the dual norm: the distance to the boundary if the
        model were linear; compare them with the measured margins).
    """
    _check_batch(images, labels, norm="linf", budget=2, batch_size=batch_size)
    parts = []
    with frozen(model), torch.enable_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device).requires_grad_(True)
            y = labels[start : start + batch_size].to(device)
            logits = model(x)
            own = logits.gather(1, y[:, None]).squeeze(1)
            gap = own - logits.scatter(1, y[:, None], -math.inf).amax(1)
            (grad,) = torch.autograd.grad(gap.sum(), x)
            flat = grad.flatten(1).double().cpu()
            gap = gap.detach().double().cpu()
            l1, l2 = flat.abs().sum(1), flat.norm(dim=1)
            parts.append(pd.DataFrame({
                "sample": np.arange(start, start + len(y)), "correct": (gap > 0).numpy(),
                "logit_gap": gap.numpy(), "grad_l1": l1.numpy(), "grad_l2": l2.numpy(),
                "first_order_linf": (gap / l1).numpy(), "first_order_l2": (gap / l2).numpy(),
            }))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def gradient_guard(gradients: pd.DataFrame, *, floor: float = 1e-6,
                   allowed_share: float = 0.0) -> GuardOutcome:
    """(c) The gradient does not vanish: at most ``allowed_share`` of the correctly classified
    images have a logit-gap gradient with L1 norm at or below ``floor`` (or not finite)."""
    correct = gradients[gradients["correct"].astype(bool)]
    if len(correct) == 0:
        raise ParameterError("gradient_guard: no correctly classified image in the table")
    norms = correct["grad_l1"].to_numpy()
    vanishing = ~(np.isfinite(norms) & (norms > floor))
    share = float(vanishing.mean())
    return GuardOutcome(
        "gradient not vanishing", share <= allowed_share, share, allowed_share, len(correct),
        f"{int(vanishing.sum())} of {len(correct)} images have a gradient L1 norm at or below "
        f"{floor:g}; median {float(np.median(norms)):.4g}",
    )


@dataclass(frozen=True)
class ModeCheck:
    """The modes an attack ran the model in."""

    forwards: int  #: forward calls of the model during the attack
    train_forwards: int  #: of those, calls with some module in train mode
    restored: bool  #: every module's mode afterwards equals its mode before


def modes_during(model: nn.Module, attack: Callable[[], Any]) -> ModeCheck:
    """(d) Run ``attack()`` and record, at every forward of ``model``, whether any of its
    modules was in train mode (e.g. dropout active); and whether the modes came back."""
    before = [m.training for m in model.modules()]
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(
        lambda module, args: seen.append(any(m.training for m in module.modules())))
    try:
        attack()
    finally:
        handle.remove()
    restored = [m.training for m in model.modules()] == before
    return ModeCheck(len(seen), sum(seen), restored)


def eval_mode_guard(check: ModeCheck, *, name: str = "attacks in eval mode") -> GuardOutcome:
    """(d) Passes when the attack ran forwards, none in train mode, and modes were restored."""
    passed = check.forwards > 0 and check.train_forwards == 0 and check.restored
    return GuardOutcome(
        name, passed, float(check.train_forwards), 0.0, check.forwards,
        f"{check.train_forwards} of {check.forwards} forwards ran with a module in train "
        f"mode; modes {'restored' if check.restored else 'NOT restored'} afterwards",
    )


# ---------------------------------------------------------------------------- internals


@contextmanager
def _attacking(model: nn.Module, device: str | torch.device, seed: int):
    """Eval mode, frozen weights and a seeded, forked global RNG for adv-lib's draws."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with frozen(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) == y).cpu()


def _check_batch(images: Tensor, labels: Tensor, *, norm: str, budget: int,
                 batch_size: int) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ParameterError("images must be a float tensor [N, C, H, W] in [0, 1]")
    if len(images) == 0 or images.min() < 0 or images.max() > 1:
        raise ParameterError("images must be non-empty and lie in [0, 1] (pixel values / 255)")
    if not isinstance(labels, Tensor) or labels.shape != (len(images),) \
            or labels.is_floating_point():
        raise ParameterError(f"labels must be int64 [{len(images)}], one class per image")
    if norm not in NORMS:
        raise ParameterError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if not isinstance(budget, int) or budget < 2:
        raise ParameterError(f"steps must be an int >= 2, got {budget!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _check_apgd(epsilon: float, restarts: int, losses: Sequence[str]) -> None:
    if not _is_positive(epsilon):
        raise ParameterError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ParameterError(f"restarts must be an int >= 1, got {restarts!r}")
    unknown = [loss for loss in losses if loss not in APGD_LOSSES]
    if not losses or unknown:
        raise ParameterError(f"losses must be names from {APGD_LOSSES}, got {list(losses)}")


def _is_positive(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
