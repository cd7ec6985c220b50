"""Minimum-norm reference attacks from adv-lib, run on (image, target) pairs and checked here.

State-of-the-art targeted minimum-norm attacks from adv-lib (Rony et al.,
https://github.com/jeromerony/adversarial-library) search for the smallest perturbation that
makes the model predict the target:

- ``fmn_l1`` / ``fmn_l2`` / ``fmn_linf``: Fast Minimum-Norm (Pintor et al. 2021,
  arXiv:2102.12827) in L1, L2 and Linf (Linf is the geometry of the sign steps our schedules
  take);
- ``alma_l1``: Augmented Lagrangian Method for Adversarial attacks (Rony et al. 2021,
  arXiv:2011.11857) with the L1 distance;
- ``pdpgd_l1``: Primal-Dual Proximal Gradient Descent (Matyasko and Chau 2021,
  arXiv:2106.01538) with the L1 proximal operator.

Every returned image is classified again here (:func:`run_reference_attacks`), so "success"
means what it means for our own attacks (argmax == target), and its distances are ours: L1 the
mean ``|x* - x|`` over the C*H*W values, L2 the Euclidean norm, Linf the largest change, in
[0, 1] pixel units. How these distances compare with our schedules'
is :mod:`lib.analysis.minimality`.

Adding a reference attack is one small function ``fn(model, images, targets, *, steps) ->
adversarial images`` plus an entry in :data:`REFERENCE_ATTACKS`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lib.errors import ParameterError
from lib.model.network import frozen
from lib.progress import progress_bar

#: A reference attack: (model, images [B,C,H,W] in [0,1], targets [B], *, steps) -> images.
ReferenceAttack = Callable[..., Tensor]

#: Default key of one attacked pair when the caller gives none: its index in ``images``.
SAMPLE = "sample"

#: A perturbation value counts as changed above half a grey level (it survives uint8 storage).
CHANGED_THRESHOLD = 0.5 / 255


def _adv_lib_attacks():
    """Import adv-lib's attack module (lazily: the tables below do not need it).

    adv-lib 0.2.8 compares torch versions with ``distutils.version.LooseVersion`` at import,
    which warns on every import; the warning is about adv-lib, not about anything we can fix.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="distutils Version classes are deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="distutils")
        from adv_lib import attacks
    return attacks


def fmn_l1(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted FMN minimising the L1 norm (adv-lib defaults otherwise)."""
    return _adv_lib_attacks().fmn(model, images, targets, norm=1, targeted=True, steps=steps)


def fmn_l2(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted FMN minimising the L2 norm (adv-lib defaults otherwise)."""
    return _adv_lib_attacks().fmn(model, images, targets, norm=2, targeted=True, steps=steps)


def fmn_linf(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted FMN minimising the Linf norm (the geometry of sign-gradient steps)."""
    return _adv_lib_attacks().fmn(
        model, images, targets, norm=float("inf"), targeted=True, steps=steps
    )


def alma_l1(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted ALMA with the L1 distance (adv-lib defaults otherwise).

    adv-lib's targeted ALMA normalises its loss by the four largest logits, so the model needs
    at least four classes.
    """
    return _adv_lib_attacks().alma(
        model, images, targets, targeted=True, num_steps=steps, distance="l1"
    )


def pdpgd_l1(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted PDPGD with the L1 norm and its proximal operator (adv-lib defaults otherwise)."""
    return _adv_lib_attacks().pdpgd(model, images, targets, norm=1, targeted=True, num_steps=steps)


#: Reference minimum-norm attacks by name.
REFERENCE_ATTACKS: dict[str, ReferenceAttack] = {
    "fmn_l1": fmn_l1,
    "alma_l1": alma_l1,
    "pdpgd_l1": pdpgd_l1,
    "fmn_l2": fmn_l2,
    "fmn_linf": fmn_linf,
}

DEFAULT_ATTACKS: tuple[str, ...] = tuple(REFERENCE_ATTACKS)


def perturbation_sizes(original: Tensor, perturbed: Tensor) -> dict[str, Tensor]:
    """Sizes of ``perturbed - original`` per sample ([N,C,H,W] -> [N] each), in [0, 1] units.

    ``l1`` is the project's L1, mean ``|x* - x|`` over the C*H*W values; ``l2`` the Euclidean
    norm; ``linf`` the largest absolute change; ``changed_fraction`` the share of values
    changed by more than half a grey level (how sparse the perturbation is).
    """
    delta = (perturbed - original).flatten(1).abs()
    return {
        "l1": delta.mean(dim=1),
        "l2": delta.norm(dim=1),
        "linf": delta.amax(dim=1),
        "changed_fraction": (delta > CHANGED_THRESHOLD).float().mean(dim=1),
    }


def _check_inputs(
    images: Tensor,
    targets: Tensor,
    keys: pd.DataFrame | None,
    attacks: Sequence[str],
    steps: Sequence[int],
    batch_size: int,
) -> pd.DataFrame:
    if images.ndim != 4 or not images.is_floating_point():
        raise ParameterError(
            f"best_known_l1: images must be a float tensor [N, C, H, W]; got dtype {images.dtype}"
            f" and shape {tuple(images.shape)}. Convert uint8 frames with .float() / 255."
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ParameterError(
            f"best_known_l1: images must lie in [0, 1]; got values in "
            f"[{images.min().item():.3g}, {images.max().item():.3g}]. Pass pixel-space images; "
            "the model normalises them itself."
        )
    if targets.shape != (len(images),):
        raise ParameterError(
            f"best_known_l1: targets must have shape [{len(images)}] (one per image); got "
            f"{tuple(targets.shape)}."
        )
    unknown = [name for name in attacks if name not in REFERENCE_ATTACKS]
    if unknown:
        raise ParameterError(
            f"best_known_l1: unknown attack(s) {unknown}; expected names from "
            f"{sorted(REFERENCE_ATTACKS)}. Register a new one in REFERENCE_ATTACKS."
        )
    if not steps or any(int(s) < 2 for s in steps):
        raise ParameterError(
            f"best_known_l1: steps must be a non-empty list of budgets >= 2; got {list(steps)}."
        )
    if batch_size < 1:
        raise ParameterError(f"best_known_l1: batch_size must be >= 1; got {batch_size}.")
    if keys is None:
        return pd.DataFrame({SAMPLE: np.arange(len(images))})
    if len(keys) != len(images):
        raise ParameterError(
            f"best_known_l1: keys must have one row per image ({len(images)}); got {len(keys)}."
        )
    if keys.duplicated().any():
        raise ParameterError(
            "best_known_l1: keys must identify each attacked pair uniquely; rows "
            f"{np.flatnonzero(keys.duplicated()).tolist()[:5]} repeat an earlier row."
        )
    return keys.reset_index(drop=True)


def run_reference_attacks(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    keys: pd.DataFrame | None = None,
    steps: Sequence[int] = (1000,),
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every reference attack at every step budget; one row per (sample, attack, steps).

    Args:
        model: classifier taking images in [0, 1] and returning logits [B, K].
        images: float [N, C, H, W] in [0, 1], the clean images.
        targets: int64 [N], the target class of each pair.
        keys: optional [N]-row table identifying each pair (e.g. epoch, image_id, target);
            copied into the result. Default: a ``sample`` column 0..N-1.
        steps: step budgets; each attack runs once per budget.
        attacks: names from :data:`REFERENCE_ATTACKS`.
        device: where the attacks run (the model is moved there).
        batch_size: images per attack call.
        seed: torch is seeded with it before every (attack, steps) run; the caller's RNG state
            is restored afterwards.
        progress: show a progress bar (:mod:`lib.progress`).

    Returns:
        DataFrame: key columns, ``attack``, ``steps``, ``success`` (the returned image is
        classified as the target, checked here), ``l1``, ``l2``, ``linf``, ``changed_fraction`` (of
        the returned image, successful or not), ``seconds`` (attack time per sample).
    """
    keys = _check_inputs(images, targets, keys, attacks, steps, batch_size)
    device = torch.device(device)
    model = model.to(device)
    runs = [(name, int(budget)) for name in attacks for budget in steps]
    starts = range(0, len(images), batch_size)
    rows: list[pd.DataFrame] = []
    bar = progress_bar(len(runs) * len(starts), desc="reference attacks", unit="batch",
                       enabled=progress)
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with frozen(model), torch.random.fork_rng(devices=fork_devices):
        for name, budget in runs:
            torch.manual_seed(seed)
            for start in starts:
                clean = images[start : start + batch_size].to(device)
                wanted = targets[start : start + batch_size].to(device)
                began = time.perf_counter()
                perturbed = REFERENCE_ATTACKS[name](model, clean, wanted, steps=budget).detach()
                seconds = time.perf_counter() - began
                with torch.no_grad():
                    success = model(perturbed).argmax(dim=1) == wanted
                sizes = perturbation_sizes(clean, perturbed)
                chunk = (
                    keys.iloc[start : start + batch_size]
                    .reset_index(drop=True)
                    .assign(
                        attack=name,
                        steps=budget,
                        success=success.cpu().numpy(),
                        **{k: v.double().cpu().numpy() for k, v in sizes.items()},
                        seconds=seconds / len(clean),
                    )
                )
                rows.append(chunk)
                bar.update()
    bar.close()
    return pd.concat(rows, ignore_index=True)
