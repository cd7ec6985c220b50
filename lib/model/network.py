"""AlexNet with the ImageNet normalisation inside; the device it runs on; frozen weights.

The classifier takes images in [0, 1] (float, shape [N, 3, S, S], S >= :data:`MIN_IMAGE_SIZE`)
and normalises them itself, so attacks step in pixel space and distances are in pixel units.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torchvision
from torch import nn

from lib import NUM_CLASSES
from lib.errors import ParameterError, first_line

#: Per-channel mean and standard deviation of ImageNet (RGB, [0, 1] units), torchvision's values.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Smallest square input AlexNet's feature stack accepts. conv 11/4 (pad 2), then three 3x3/2
#: max-pools with 5x5 and 3x3 same-padded convolutions between: the last pool needs a 3x3 map,
#: so the second pool needs 7x7, the first 15x15, and the first conv ((S - 7) // 4 + 1 >= 15)
#: needs S >= 63. Checked in tests/test_model.py against the network itself.
MIN_IMAGE_SIZE: int = 63

#: The ImageNet head that pretrained weights do not share with a 7-class model.
HEAD_PREFIX = "classifier.6."


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers, so they follow ``.to()``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class ToolClassifier(nn.Module):
    """torchvision AlexNet behind an ImageNet normalisation layer.

    ``forward(images)``: images float [N, 3, S, S] in [0, 1], S >= :data:`MIN_IMAGE_SIZE`
    -> logits [N, num_classes]. The network has dropout and no batch norm: ``train()`` for
    training, ``eval()`` for evaluation and attacks.
    """

    def __init__(self, *, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.alexnet = torchvision.models.alexnet(weights=None, num_classes=num_classes)
        he_initialise(self.alexnet)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ParameterError(
                f"the classifier expects images of shape [N, 3, S, S], got {tuple(images.shape)}"
            )
        check_image_size(min(images.shape[-2:]))
        return self.alexnet(self.normalize(images))


def he_initialise(network: nn.Module) -> None:
    """He (Kaiming) normal initialisation of every conv and linear layer, zero biases.

    torchvision's AlexNet keeps PyTorch's per-layer default (uniform, variance 1 / (3 fan_in)),
    under which the activations' variance drops about 6-fold per layer (ReLU halves it, the
    weights take two thirds): the logits start nearly independent of the image, and training
    from scratch stalls for many steps. He et al. (2015) scale each layer to keep the variance
    through ReLUs, as torchvision does for VGG and ResNet. The architecture is unchanged.
    Draws from torch's global RNG.
    """
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        else:
            continue
        nn.init.zeros_(module.bias)


def check_image_size(size: int) -> None:
    """Raise :class:`ParameterError` if square images of side ``size`` are too small for AlexNet."""
    if size < MIN_IMAGE_SIZE:
        raise ParameterError(
            f"image size {size} px is too small for AlexNet: its feature stack needs at least "
            f"{MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE} px; choose image_size >= {MIN_IMAGE_SIZE} "
            "(the default build uses 64, the paper 224)"
        )


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for ``name`` ("cpu", "cuda", "cuda:1", "mps"), checked to be usable.

    Raises:
        ParameterError: unknown device type, or a device this machine does not have.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ParameterError(
            f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N' ({first_line(error)})"
        ) from error
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(
                f"device {name!r} requested but CUDA is not available here; use device='cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ParameterError(
                f"device {name!r} requested but this machine has {count} CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1}); pick one of those or 'cpu'"
            )
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ParameterError(f"device {name!r} requested but MPS is not available; use 'cpu'")
        return device
    raise ParameterError(f"unsupported device {name!r}; use 'cpu', 'cuda' or 'cuda:N'")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and weights not requiring grad inside the block; both restored afterwards.

    Attacks and speed measurements need gradients with respect to the input only: frozen
    weights skip the weight gradients, several times faster on the CPU (the attack benchmark,
    ``make bench``, measures it). Each parameter's ``requires_grad`` flag and each submodule's
    train/eval mode is restored as it was, even when the block raises.
    """
    requires_grad = [p.requires_grad for p in model.parameters()]
    training = [m.training for m in model.modules()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad, strict=True):
            parameter.requires_grad_(flag)
        for module, flag in zip(model.modules(), training, strict=True):
            module.training = flag
