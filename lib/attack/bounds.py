"""Interval bounds of a classifier's logit differences over a box of images (the certified stop).

An attack whose remaining steps sum to at most R can only reach images within R (Linf) of its
current iterate x_k, and inside [0, 1]. Interval bound propagation (IBP) pushes that box
through the network layer by layer in centre-radius form:

- an affine layer (convolution, linear, the per-channel normalisation, average pooling) maps
  centre c and radius r to ``W c + b`` and ``|W| r``: the exact interval hull of its image;
- ReLU maps active units to (c, r) and dead ones to (0, 0); a unit whose interval may hold 0
  gets the centre of [relu(c - r), relu(c + r)] and keeps the radius r (see ``_relu``);
- max-pooling maps each window to (max c, max r), an interval that holds the exact hull;
- dropout (the eval-mode network: identity) and flatten change nothing but the shape.

The last linear layer is not bounded on its own: for an anchor class a (the target, or the
source in untargeted mode) the difference ``z_j - z_a = (W_j - W_a) h + (b_j - b_a)`` is bounded
directly from the box of its input h. Subtracting two separately bounded logits would count the
shared part of ``W_j`` and ``W_a`` twice.

If some class j != t keeps ``z_j - z_t`` above 0 on the whole box, no image the attack can
still reach is classified as the target t: the attack fails whatever its remaining steps are.
In untargeted mode the source s must beat every other class on the whole box. The bounds hold
in exact arithmetic; :func:`rounding_slack` covers floating-point rounding (see there).

Supported networks: :class:`lib.model.ToolClassifier` (normalisation, then torchvision's
AlexNet), torchvision's ``AlexNet`` and ``nn.Sequential`` stacks of the layers above, nested
freely. Any other module (or a subclass with its own ``forward``) raises a
:class:`~lib.errors.ParameterError` naming it: the certified stop must then be off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from lib.errors import ParameterError
from lib.model.network import Normalize, ToolClassifier

#: Rounding allowance relative to the magnitude of the last layer's sums, in units of the unit
#: roundoff of the arithmetic (see :func:`rounding_slack`).
RELATIVE_SLACK_UNITS = 2.0**8
#: Absolute part of the allowance, in the same units (logits): it covers results near zero.
ABSOLUTE_SLACK_UNITS = 2.0**8
#: Bound of the rounding error of a computed activation, in units of the unit roundoff times
#: the largest activation of the layer (see :func:`centre_error`).
CENTRE_ERROR_UNITS = 2.0**8

#: A float update ``clip(x - lr sign(g), 0, 1)`` rounded to nearest moves a pixel by at most
#: twice its step: a step below half the spacing of the floats at x leaves x unchanged, and a
#: larger one rounds to within half a spacing (at most the step, also where the spacing
#: doubles past a power of two) of ``x - lr``; clipping to
#: [0, 1] only shortens a move. The extra 2^-8 covers the rounding of the step sizes themselves
#: (float32 ``exp`` of an argument up to ~50 is off by ~50 units of 2^-24) and of the radius.
UPDATE_ROUNDING_FACTOR = 2.0 * (1 + 2.0**-8)

_UNITS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
          torch.bfloat16: 2.0**-8}
_TF32_UNIT = 2.0**-11

#: The layer types the bounds cover (exact classes or subclasses that keep their ``forward``).
SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten, nn.Identity, Normalize)
#: Centre-radius map of one layer: (centre, radius) -> (centre, radius).
Propagation = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class DifferenceBounds(NamedTuple):
    """Bounds of ``z_j - z_a`` over a box, for every class j and one anchor class a per row:
    ``lower - slack <= z_j - z_a <= upper + slack`` on the box, for the exact differences and
    for the computed ones (:func:`rounding_slack` says what is proven and what measured)."""

    #: [B, K], in logits, as computed (before the slack); column a is 0.
    lower: Tensor
    #: [B, K], in logits, as computed (before the slack); column a is 0.
    upper: Tensor
    #: [B, K], ``(|W_j| + |W_a|)(|h| + r) + |b_j| + |b_a|`` at the last layer (or ``|z_j| +
    #: |z_a|`` bounds when the network does not end in a linear layer): the scale of the sums
    #: whose rounding the slack allows for.
    magnitude: Tensor
    #: [B, K], >= 0: how far rounding may have moved ``lower`` and ``upper``, or may move the
    #: model's own computed difference.
    slack: Tensor


class IntervalNetwork:
    """A network prepared for interval bounds: its layers in order, ``|W|`` computed once.

    Build it once the weights are final (a job's model is frozen); it keeps references to the
    weights and a copy of their absolute values. Device and dtype are the model's.

    Raises:
        ParameterError: the model holds a layer the bounds do not cover (named with its path).
    """

    def __init__(self, model: nn.Module) -> None:
        layers = interval_layers(model)
        while layers and isinstance(layers[-1][1], nn.Dropout | nn.Identity):
            layers = layers[:-1]
        self.head: nn.Linear | None = None
        if layers and isinstance(layers[-1][1], nn.Linear):
            self.head = layers.pop()[1]
            self._head_abs = self.head.weight.detach().abs()
            self._head_bias = _bias(self.head, self.head.out_features)
        self.paths = [path for path, _ in layers]
        weights = [p for p in model.parameters() if p.is_floating_point()]
        self._dtype = weights[0].dtype if weights else None
        self._layers = [(module, _propagation(module)) for _, module in layers]

    @torch.no_grad()
    def differences(self, images: Tensor, radius: Tensor, *, anchor: Tensor) -> DifferenceBounds:
        """Bounds of ``z_j - z_anchor`` over every image within ``radius`` (Linf) of ``images``
        and inside [0, 1].

        Args:
            images: [B, C, H, W] in [0, 1], the box centres (the model's device and dtype).
            radius: [B], >= 0 (inf allowed: the whole cube), in [0, 1] pixel units.
            anchor: int64 [B], the class each row's differences are taken against.

        Returns:
            :class:`DifferenceBounds` with [B, K] tensors.
        """
        centre, spread = input_box(images, radius)
        return self.box_differences(centre, spread, anchor=anchor)

    @torch.no_grad()
    def box_differences(self, centre: Tensor, radius: Tensor, *,
                        anchor: Tensor) -> DifferenceBounds:
        """:meth:`differences` for the input box ``centre ± radius`` (both [B, C, H, W], e.g.
        from :func:`input_box`)."""
        dtype, device = centre.dtype, centre.device
        if self._dtype is not None and dtype != self._dtype:
            raise ParameterError(
                f"the images are {dtype} but the model's weights are {self._dtype}; convert "
                "one of them (the bounds compute in the model's dtype)"
            )
        units = 0
        for module, step in self._layers:
            units += _radius_units(module, centre)
            centre, radius = step(centre, radius)
        if self.head is None:
            bounds = _subtracted(centre, radius, anchor)
        elif centre.dim() != 2:
            raise ParameterError(
                f"the last linear layer gets a {centre.dim()}-d input; the bounds need logits "
                "[B, K] from a [B, F] input (flatten before it)"
            )
        else:
            units += self.head.in_features + 2
            bounds = _elided(self.head.weight.detach(), self._head_abs, self._head_bias,
                             centre, radius, anchor)
        slack = rounding_slack(bounds.magnitude, (bounds.upper - bounds.lower) / 2,
                               radius_units=units, dtype=dtype, device=device)
        return bounds._replace(slack=slack)


def interval_layers(model: nn.Module, path: str = "") -> list[tuple[str, nn.Module]]:
    """The model's layers in the order its forward applies them, with their paths.

    Containers are opened (``ToolClassifier``, torchvision ``AlexNet``, ``nn.Sequential``);
    AlexNet's flatten between pooling and classifier appears as ``<path>.flatten``.

    Raises:
        ParameterError: a module is neither a supported container nor a supported layer; the
            message gives its path and type and says to turn the certified stop off.
    """
    prefix = f"{path}." if path else ""
    kind = type(model)
    if _keeps_forward(model, ToolClassifier):
        return [(f"{prefix}normalize", model.normalize),
                *interval_layers(model.alexnet, f"{prefix}alexnet")]
    if _keeps_forward(model, torchvision.models.AlexNet):
        return [*interval_layers(model.features, f"{prefix}features"),
                (f"{prefix}avgpool", model.avgpool), (f"{prefix}flatten", nn.Flatten(1)),
                *interval_layers(model.classifier, f"{prefix}classifier")]
    if _keeps_forward(model, nn.Sequential):
        return [layer for name, child in model.named_children()
                for layer in interval_layers(child, f"{prefix}{name}")]
    if any(_keeps_forward(model, base) for base in SUPPORTED_LAYERS):
        _check_options(model, path)
        return [(path, model)]
    where = f"layer {path!r}" if path else "the model"
    raise ParameterError(
        f"{where} ({kind.__module__}.{kind.__qualname__}) is not covered by the interval bounds "
        f"of the certified stop, which support {', '.join(c.__name__ for c in SUPPORTED_LAYERS)} "
        "inside nn.Sequential, AlexNet or ToolClassifier; turn the certified stop off for this "
        "model (certify=False)"
    )


def input_box(images: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Centre and radius [B, C, H, W] of ``{x' : |x' - images|_inf <= radius} ∩ [0, 1]^n``.

    Raises:
        ParameterError: ``radius`` is not [B] or holds a negative or NaN value.
    """
    if radius.shape != images.shape[:1]:
        raise ParameterError(
            f"radius must be [B] = [{images.shape[0]}] (one Linf radius per image), got "
            f"{tuple(radius.shape)}"
        )
    if not bool((radius >= 0).all()):
        raise ParameterError("radius must be >= 0 (NaN is not a radius), in [0, 1] pixel units")
    spread = radius.to(images.dtype).view(-1, *([1] * (images.dim() - 1)))
    low = (images - spread).clamp(0, 1)
    high = (images + spread).clamp(0, 1)
    centre = (low + high) / 2
    # the rounded centre may sit off the middle: the radius reaches the farther end
    return centre, torch.maximum(high - centre, centre - low)


def unit_roundoff(dtype: torch.dtype, device: torch.device | str) -> float:
    """The unit roundoff of the products a model of ``dtype`` computes on ``device``.

    float32 on CUDA counts as TF32 (2^-11) when PyTorch lets cuDNN convolutions or matrix
    products use it (``torch.backends.cudnn.allow_tf32``, the default, or a float32 matmul
    precision below "highest"; "medium" counts as bfloat16).
    """
    unit = _UNITS.get(dtype)
    if unit is None:
        raise ParameterError(f"interval bounds need a float dtype, got {dtype}")
    if dtype != torch.float32 or torch.device(device).type != "cuda":
        return unit
    matmul = torch.get_float32_matmul_precision()
    if matmul == "medium":
        return _UNITS[torch.bfloat16]
    if matmul == "high" or torch.backends.cudnn.allow_tf32:
        return _TF32_UNIT
    return unit


def centre_error(centre: Tensor) -> Tensor:
    """A bound of the rounding error of computed centres (or of the forward's activations):
    ``CENTRE_ERROR_UNITS u max |c|`` per image, [B, 1, ...] broadcastable to ``centre``.

    Measured on trained and random AlexNets (float32 against float64, every layer): at most
    about 25 u times the layer's largest value, so 2^8 leaves a factor of 10. A larger value
    costs little: it only decides which ReLU units keep their full radius.
    """
    unit = unit_roundoff(centre.dtype, centre.device)
    largest = centre.abs().flatten(1).amax(1).view(-1, *([1] * (centre.dim() - 1)))
    return CENTRE_ERROR_UNITS * unit * largest


def rounding_slack(magnitude: Tensor, half_width: Tensor, *, radius_units: int,
                   dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """How far rounding may move a computed bound or the model's computed ``z_j - z_a``.

    With u the unit roundoff (:func:`unit_roundoff`), [B, K] like ``magnitude``::

        slack = u (RELATIVE_SLACK_UNITS magnitude + radius_units half_width
                   + ABSOLUTE_SLACK_UNITS)

    The propagation keeps two kinds of error apart:

    - radii: every radius is a sum of non-negative terms (``|W| r``, pooling), or a copy or
      max of radii, and never depends on the centres (``_relu`` and max-pooling are
      built so). A sum of n non-negative rounded products, in any order, is off by at most
      about n u relative; ``radius_units`` counts the terms summed along the path, so
      ``radius_units u half_width`` bounds the radius error (to first order in u). Proven,
      given that no centre error exceeds :func:`centre_error` (which decides a ReLU's case);
    - centres: computed like the model's forward pass (affine maps, then 1-Lipschitz maps),
      they round like it; so does the engine's own forward, whose logits decide a crossing.
      Such errors reach the logits through the last layer's sums, so the allowance is a
      multiple of u times their ``magnitude``, plus the same multiple of u for results near
      zero. A worst-case bound (n u per n-term sum, amplified through every later layer)
      would be far too wide to certify anything, and none holds for every convolution
      algorithm a library may pick (Winograd and FFT kernels round differently): this part
      is measured. In float32 against float64, on the default run's trained AlexNet and on
      random ones, over boxes of radius 0 to 1e-3 and forwards at batch sizes 1 to 64 with
      and without autograd, computed differences (forwards and bound centres) stayed within
      11 u magnitude; RELATIVE_SLACK_UNITS = 2^8 leaves a factor of over 20. A float32
      bound beyond its float64 value (on the unsound side) was so by at most 1/20 of the
      slack (tests/test_bounds.py checks the slack against float64 on random models).

    The movement of the engine's float updates is covered apart (:func:`reachable_radius`).
    """
    unit = unit_roundoff(dtype, device)
    return unit * (RELATIVE_SLACK_UNITS * magnitude + radius_units * half_width
                   + ABSOLUTE_SLACK_UNITS)


def reachable_radius(remaining: Tensor, *, dtype: torch.dtype) -> Tensor:
    """The Linf radius [B] in ``dtype`` that holds every float iterate an attack can still
    reach, from an upper bound ``remaining`` [B] of the sum of its remaining step sizes (pixel
    units; see :data:`UPDATE_ROUNDING_FACTOR`)."""
    return (remaining.double() * UPDATE_ROUNDING_FACTOR).to(dtype)


@torch.no_grad()
def certified_gap(network: IntervalNetwork, images: Tensor, radius: Tensor, *,
                  target: Tensor | None = None, source: Tensor | None = None,
                  targeted: bool = True) -> Tensor:
    """How far from crossing every image of the box provably is, after the rounding slack, [B].

    Targeted: ``max_{j != t} (lower(z_j - z_t) - slack_j)``; untargeted:
    ``min_{j != s} (lower(z_s - z_j) - slack_j)``. A value > 0 proves that no image within
    ``radius`` of ``images`` (and in [0, 1]) is classified as ``target`` (targeted) or as
    anything but ``source`` (untargeted). NaN (never > 0) where the bounds are not finite.

    Args:
        network: the prepared model (:class:`IntervalNetwork`).
        images, radius: as in :meth:`IntervalNetwork.differences`.
        target: int64 [B], the classes to reach (targeted).
        source: int64 [B], the classes to leave (untargeted).
        targeted: which of the two questions.
    """
    anchor = target if targeted else source
    if anchor is None:
        raise ParameterError(f"certified_gap needs {'target' if targeted else 'source'} [B]")
    anchor = anchor.to(images.device)
    bounds = network.differences(images, radius, anchor=anchor)
    own = torch.zeros_like(bounds.lower, dtype=torch.bool).scatter_(1, anchor[:, None], True)
    if targeted:
        return (bounds.lower - bounds.slack).masked_fill(own, -torch.inf).amax(1)
    return (-bounds.upper - bounds.slack).masked_fill(own, torch.inf).amin(1)


def certify_unreachable(model: nn.Module | IntervalNetwork, images: Tensor, radius: Tensor, *,
                        target: Tensor | None = None, source: Tensor | None = None,
                        targeted: bool = True, margin: float = 0.0) -> Tensor:
    """bool [B]: True where it is proven that no image in the box crosses (see
    :func:`certified_gap`) with ``margin`` logits to spare beyond the rounding slack.

    Args:
        model: the classifier (prepared here) or an :class:`IntervalNetwork` made from it.
        images: [B, C, H, W] in [0, 1], the current iterates, on the model's device and dtype.
        radius: [B], >= 0, the Linf radius around each (e.g. :func:`reachable_radius`).
        target, source, targeted: as in :func:`certified_gap`.
        margin: >= 0, an extra margin in logits.
    """
    if not margin >= 0:
        raise ParameterError(f"margin must be >= 0 (logits), got {margin!r}")
    network = model if isinstance(model, IntervalNetwork) else IntervalNetwork(model)
    gap = certified_gap(network, images, radius, target=target, source=source,
                        targeted=targeted)
    return gap > margin


# --------------------------------------------------------------------------- layers


def _keeps_forward(module: nn.Module, base: type) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def _check_options(module: nn.Module, path: str) -> None:
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise ParameterError(
            f"layer {path!r}: Conv2d with padding_mode={module.padding_mode!r} is not covered by "
            "the interval bounds (only 'zeros'); turn the certified stop off for this model "
            "(certify=False)"
        )
    if isinstance(module, nn.MaxPool2d) and module.return_indices:
        raise ParameterError(
            f"layer {path!r}: MaxPool2d with return_indices=True returns a tuple; turn the "
            "certified stop off for this model (certify=False)"
        )


def _bias(module: nn.Module, size: int) -> Tensor:
    weight = module.weight
    if module.bias is None:
        return torch.zeros(size, dtype=weight.dtype, device=weight.device)
    return module.bias.detach()


def _propagation(module: nn.Module) -> Propagation:
    """The centre-radius map of one supported layer."""
    if isinstance(module, nn.Conv2d):
        weight, magnitude = module.weight.detach(), module.weight.detach().abs()
        bias = None if module.bias is None else module.bias.detach()
        options = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                       groups=module.groups)
        return lambda c, r: (F.conv2d(c, weight, bias, **options),
                             F.conv2d(r, magnitude, None, **options))
    if isinstance(module, nn.Linear):
        weight, magnitude = module.weight.detach(), module.weight.detach().abs()
        bias = None if module.bias is None else module.bias.detach()
        return lambda c, r: (F.linear(c, weight, bias), F.linear(r, magnitude))
    if isinstance(module, Normalize):
        mean, std = module.mean, module.std
        return lambda c, r: ((c - mean) / std, r / std.abs())
    if isinstance(module, nn.ReLU):
        return _relu
    if isinstance(module, nn.Dropout | nn.Identity):
        return lambda c, r: (c, r)
    # AvgPool2d, AdaptiveAvgPool2d (linear, non-negative weights), Flatten, and MaxPool2d:
    # the exact hull [max(c - r), max(c + r)] of a window lies inside max c ± max r. The
    # hull's width depends on near-ties of the centres, which rounding can reorder; this
    # width does not depend on the centres at all (as in _relu), and its centre is a max
    # like the forward's
    return lambda c, r: (module(c), module(r))


def _relu(centre: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU on centre ± radius, with a radius that rounding of the centres cannot shrink.

    A unit whose interval stays more than tau (:func:`centre_error`) away from 0 keeps
    (c, r) if active and gives (0, 0) if dead: a centre error below tau cannot change its
    case. A unit nearer to 0 gives the centre of [relu(c - r), relu(c + r)] and keeps the
    radius r, at least the exact hull's. So the radii never depend on how the centres were
    rounded; had a unit near 0 taken the hull's radius, a centre error would become a radius
    error, and radius errors grow through every later layer like the radius itself does.
    ``c ± r`` is formed only for those units (|c| < r + tau): a radius below the spacing of
    floats at a large c would vanish in it.
    """
    tau = centre_error(centre)
    active, dead = centre >= radius + tau, centre <= -(radius + tau)
    hull = (torch.relu(centre - radius) + torch.relu(centre + radius)) / 2
    return (torch.where(active, centre, torch.where(dead, 0, hull)),
            torch.where(dead, 0, radius))


def _radius_units(module: nn.Module, inputs: Tensor) -> int:
    """Terms a layer sums per output on the radius path, plus one for its other roundings."""
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel() + 1
    if isinstance(module, nn.Linear):
        return module.in_features + 1
    if isinstance(module, nn.AvgPool2d):
        kernel = _pair(module.kernel_size)
        return kernel[0] * kernel[1] + 1
    if isinstance(module, nn.AdaptiveAvgPool2d):
        sizes = [inputs.shape[-2], inputs.shape[-1]]
        outputs = _pair(module.output_size)
        window = [-(-size // (out or size)) + 1 for size, out in zip(sizes, outputs, strict=True)]
        return window[0] * window[1] + 1
    if isinstance(module, nn.ReLU | Normalize):
        return 1
    return 0


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _elided(weight: Tensor, magnitude: Tensor, bias: Tensor, centre: Tensor, radius: Tensor,
            anchor: Tensor) -> DifferenceBounds:
    """Bounds of ``(W_j - W_a) h + (b_j - b_a)`` for h in ``centre ± radius`` ([B, F])."""
    difference = weight.unsqueeze(0) - weight[anchor].unsqueeze(1)  # [B, K, F]
    middle = torch.bmm(difference, centre.unsqueeze(2)).squeeze(2) + (bias - bias[anchor, None])
    spread = torch.bmm(difference.abs(), radius.unsqueeze(2)).squeeze(2)
    sums = F.linear(centre.abs() + radius, magnitude)  # [B, K]: |W_j| (|h| + r)
    scale = sums + bias.abs()
    return DifferenceBounds(lower=middle - spread, upper=middle + spread,
                            magnitude=scale + scale.gather(1, anchor[:, None]),
                            slack=torch.zeros_like(middle))


def _subtracted(centre: Tensor, radius: Tensor, anchor: Tensor) -> DifferenceBounds:
    """Differences of logit intervals, for a network that does not end in a linear layer."""
    if centre.dim() != 2:
        raise ParameterError(f"the model must return logits [B, K], got {centre.dim()}-d output")
    low, high = centre - radius, centre + radius
    size = torch.maximum(low.abs(), high.abs())
    index = anchor[:, None]
    own = torch.zeros_like(low, dtype=torch.bool).scatter_(1, index, True)
    return DifferenceBounds(lower=(low - high.gather(1, index)).masked_fill(own, 0),
                            upper=(high - low.gather(1, index)).masked_fill(own, 0),
                            magnitude=size + size.gather(1, index),
                            slack=torch.zeros_like(low))
