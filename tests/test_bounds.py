"""Interval bounds of logit differences: soundness on random models (sampled points and every
corner of tiny boxes), the exact closed form of a linear model, the rounding slack against
float64, the float movement of the engine's updates, and the unsupported-layer error."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torchvision
from torch import nn

from lib.attack import bounds
from lib.errors import ParameterError
from lib.model.checkpoints import build_model
from lib.model.network import Normalize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]


def conv_model(seed: int, *, channels: int = 3) -> nn.Sequential:
    """Every supported layer type, on [B, channels, 10, 10] inputs; 4 classes."""
    torch.manual_seed(seed)
    means, stds = (0.4, 0.5, 0.6)[:channels], (0.2, 0.25, 0.3)[:channels]
    return nn.Sequential(
        Normalize(means, stds),
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 5 x 5
        nn.Conv2d(4, 5, 3), nn.ReLU(inplace=True), nn.AvgPool2d(2, stride=1),  # 2 x 2
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(0.5),  # 45 features
        nn.Sequential(nn.Linear(45, 8), nn.ReLU()), nn.Identity(), nn.Linear(8, 4),
    ).eval()


def random_boxes(count: int, *, generator: torch.Generator, channels: int = 3,
                 size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres in [0, 1] with some pixels at 0 and 1, radii from 0 to 0.3 (log-spread)."""
    images = torch.rand(count, channels, size, size, generator=generator, dtype=torch.float64)
    images[:, :, :2] = 0.0
    images[:, :, -1:] = 1.0
    radius = 10 ** torch.empty(count, dtype=torch.float64).uniform_(-7, -0.5,
                                                                    generator=generator)
    radius[0] = 0.0
    return images, radius


def differences(model: nn.Module, points: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """z_j - z_anchor of the model at points [P, B, ...] for each of the B anchors."""
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).unflatten(0, points.shape[:2])
    return logits - logits.gather(2, anchor.expand(points.shape[0], -1)[..., None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_point_of_the_box_falls_outside_the_bounds(seed, dtype, device):
    model = conv_model(seed).to(device, dtype)
    generator = torch.Generator().manual_seed(100 + seed)
    images, radius = random_boxes(24, generator=generator)
    images, radius = images.to(device, dtype), radius.to(device, dtype)
    anchor = torch.randint(0, 4, (24,), generator=generator).to(device)
    found = bounds.IntervalNetwork(model).differences(images, radius, anchor=anchor)
    low, high = (images - radius.view(-1, 1, 1, 1)).clamp(0, 1), \
        (images + radius.view(-1, 1, 1, 1)).clamp(0, 1)
    share = torch.rand(200, *images.shape, generator=generator, dtype=torch.float64)
    share[:100] = share[:100].round()  # 100 random corners of each box
    points = low + share.to(device, dtype) * (high - low)
    values = differences(model, points, anchor)
    assert (values >= found.lower - found.slack).all()
    assert (values <= found.upper + found.slack).all()
    exact = differences(copy.deepcopy(model).double(), points.double(), anchor)
    assert (exact >= (found.lower - found.slack).double()).all()
    assert (exact <= (found.upper + found.slack).double()).all()
    # not vacuous: a box of radius 0 has bounds equal to the model's own differences
    assert torch.allclose(found.lower[0], values[0, 0], atol=float(found.slack[0].max()))
    assert found.upper[0].equal(found.lower[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_corner_of_a_tiny_box_lies_within_the_bounds(dtype):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.MaxPool2d((1, 2)), nn.Flatten(),
                          nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3)).eval().to(dtype)
    network = bounds.IntervalNetwork(model)
    generator = torch.Generator().manual_seed(6)
    checked = 0
    for radius in (1e-3, 0.05, 0.2, 0.6):
        image = torch.rand(1, 1, 2, 3, generator=generator, dtype=torch.float64).to(dtype)
        low, high = (image - radius).clamp(0, 1), (image + radius).clamp(0, 1)
        corners = torch.stack([torch.where(torch.tensor(bits, dtype=torch.bool).view(1, 2, 3),
                                           high[0], low[0])
                               for bits in itertools.product([0, 1], repeat=6)])
        for anchor in range(3):
            target = torch.tensor([anchor])
            found = network.differences(image, torch.tensor([radius], dtype=dtype),
                                        anchor=target)
            values = differences(model, corners[:, None], target)[:, 0]
            assert (values >= found.lower - found.slack).all()
            assert (values <= found.upper + found.slack).all()
            checked += len(corners)
    assert checked == 4 * 3 * 64


def test_a_linear_model_gets_the_exact_closed_form():
    """One affine map: min of (v_j - v_a) . x + (b_j - b_a) over a clipped box, v = w / std."""
    torch.manual_seed(7)
    mean, std = (0.3, 0.5), (0.2, 0.4)
    model = nn.Sequential(Normalize(mean, std), nn.Flatten(), nn.Linear(2 * 4 * 4, 5)).double()
    images = torch.rand(6, 2, 4, 4, dtype=torch.float64)
    radius = torch.tensor([0.0, 1e-4, 0.01, 0.1, 0.5, float("inf")], dtype=torch.float64)
    anchor = torch.tensor([0, 1, 2, 3, 4, 0])
    found = bounds.IntervalNetwork(model).differences(images, radius, anchor=anchor)

    weight, bias = model[2].weight.detach(), model[2].bias.detach()
    scale = torch.tensor(std, dtype=torch.float64).repeat_interleave(16)
    shift = (torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)) \
        .repeat_interleave(16)
    low = (images - radius.view(-1, 1, 1, 1)).clamp(0, 1).flatten(1)
    high = (images + radius.view(-1, 1, 1, 1)).clamp(0, 1).flatten(1)
    for b in range(6):
        pixel = (weight - weight[anchor[b]]) / scale  # [5, n]: per-pixel coefficient
        offset = bias - bias[anchor[b]] - (weight - weight[anchor[b]]) @ shift
        smallest = torch.where(pixel > 0, low[b], high[b])
        largest = torch.where(pixel > 0, high[b], low[b])
        assert torch.allclose(found.lower[b], (pixel * smallest).sum(1) + offset, atol=1e-12)
        assert torch.allclose(found.upper[b], (pixel * largest).sum(1) + offset, atol=1e-12)
    # bounding the two logits apart and subtracting is looser wherever the box is not a point
    logits_low = torch.stack([(weight / scale * torch.where(weight > 0, lo, hi)).sum(1)
                              for lo, hi in zip(low, high, strict=True)]) + bias - weight @ shift
    logits_high = torch.stack([(weight / scale * torch.where(weight > 0, hi, lo)).sum(1)
                               for lo, hi in zip(low, high, strict=True)]) + bias - weight @ shift
    apart = logits_low - logits_high.gather(1, anchor[:, None])
    others = torch.ones(6, 5, dtype=torch.bool).scatter_(1, anchor[:, None], False)
    assert (apart[1:][others[1:]] < found.lower[1:][others[1:]] - 1e-9).all()


@pytest.fixture(scope="module")
def alexnet64() -> nn.Module:
    """The project's classifier, randomly initialised, in float64 (eval mode)."""
    torch.manual_seed(3)
    return build_model().eval().double()


@pytest.mark.parametrize("kind", ["tool-classifier", "alexnet"])
def test_the_layer_order_reproduces_the_forward_of_the_project_model(kind, alexnet64):
    model = alexnet64 if kind == "tool-classifier" else nn.Sequential(alexnet64.normalize,
                                                                      alexnet64.alexnet)
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    anchor = torch.tensor([0, 6])
    found = bounds.IntervalNetwork(model).differences(images, torch.zeros(2,
                                                      dtype=torch.float64), anchor=anchor)
    values = differences(model, images[None], anchor)[0]
    assert torch.allclose(found.lower, values, atol=1e-9)
    assert found.upper.equal(found.lower)


def test_the_paths_name_every_layer_of_the_project_model(alexnet64):
    network = bounds.IntervalNetwork(alexnet64)
    assert network.paths[:3] == ["normalize", "alexnet.features.0", "alexnet.features.1"]
    assert network.paths[13:17] == ["alexnet.features.12", "alexnet.avgpool", "alexnet.flatten",
                                    "alexnet.classifier.0"]
    assert network.paths[-1] == "alexnet.classifier.5"  # the last linear layer is the head
    assert network.head is alexnet64.alexnet.classifier[6]


def test_the_slack_covers_float32_rounding_on_a_random_alexnet(alexnet64):
    """float32 bounds against float64 bounds of the same box, and float32 forwards at two
    batch sizes against the float64 forward: every error is far inside the slack."""
    model = copy.deepcopy(alexnet64).float()
    generator = torch.Generator().manual_seed(12)
    images = torch.rand(3, 3, 64, 64, generator=generator).float()
    images[:, :, :6] = 0.0
    anchor = torch.tensor([0, 3, 6])
    network, network64 = bounds.IntervalNetwork(model), bounds.IntervalNetwork(alexnet64)
    worst = 0.0
    for radius in (0.0, 1e-11, 1e-8, 1e-4):
        centre, spread = bounds.input_box(images, torch.full((3,), radius))
        found = network.box_differences(centre, spread, anchor=anchor)
        exact = network64.box_differences(centre.double(), spread.double(), anchor=anchor)
        unsound = torch.maximum(found.lower.double() - exact.lower,
                                exact.upper - found.upper.double())
        worst = max(worst, float((unsound / found.slack.double()).max()))
    slack = network.differences(images, torch.zeros(3), anchor=anchor).slack.double()
    exact = differences(alexnet64, images.double()[None], anchor)[0]
    for size in (1, 3):
        computed = torch.cat([differences(model, images[k:k + size][None], anchor[k:k + size])[0]
                              for k in range(0, 3, size)])
        worst = max(worst, float(((computed.double() - exact).abs() / slack).max()))
    assert worst < 0.25


def test_certify_targeted_and_untargeted_on_known_answers():
    """Class 0 beats class 2 by at least 1 on the whole cube; class 1 equals 0 at x = 0.5."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
        model[1].bias.copy_(torch.tensor([1.0, 1.5, 0.0]))
    image = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    small, whole = torch.tensor([0.1], dtype=torch.float64), torch.tensor([float("inf")],
                                                                          dtype=torch.float64)
    for radius in (small, whole):  # z_0 - z_2 >= 1 on the whole cube: 2 is never reached
        assert bounds.certify_unreachable(model, image, radius, target=torch.tensor([2])).item()
    # z_1 - z_0 = 0.5 - x_0: target 0 is unreachable near 0.5 (x_0 <= 0.6 < ... fails at 0.5)
    assert not bounds.certify_unreachable(model, image, small, target=torch.tensor([0])).item()
    low = torch.full((1, 1, 2, 2), 0.2, dtype=torch.float64)  # x_0 <= 0.3: z_1 - z_0 >= 0.2
    assert bounds.certify_unreachable(model, low, small, target=torch.tensor([0])).item()
    assert not bounds.certify_unreachable(model, low, small, target=torch.tensor([0]),
                                          margin=0.25).item()
    # untargeted: source 1 keeps winning only if it beats 0 and 2 on the whole box
    assert bounds.certify_unreachable(model, low, small, source=torch.tensor([1]),
                                      targeted=False).item()
    assert not bounds.certify_unreachable(model, image, small, source=torch.tensor([1]),
                                          targeted=False).item()
    assert not bounds.certify_unreachable(model, low, whole, source=torch.tensor([1]),
                                          targeted=False).item()


@pytest.mark.parametrize("targeted", [True, False])
def test_certify_agrees_with_the_exact_answer_of_a_linear_model(targeted):
    """For one linear layer the bounds are exact: certified iff the closed form says so."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    generator = torch.Generator().manual_seed(10)
    images, radius = random_boxes(400, generator=generator, channels=3, size=2)
    anchor = torch.randint(0, 4, (400,), generator=generator)
    answer = bounds.certify_unreachable(model, images, radius, target=anchor, source=anchor,
                                        targeted=targeted)
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    low = (images - radius.view(-1, 1, 1, 1)).clamp(0, 1).flatten(1)
    high = (images + radius.view(-1, 1, 1, 1)).clamp(0, 1).flatten(1)
    coefficient = weight[None] - weight[anchor][:, None]  # [B, K, n]
    offset = bias[None] - bias[anchor][:, None]
    smallest = (coefficient * torch.where(coefficient > 0, low[:, None], high[:, None])).sum(2)
    largest = (coefficient * torch.where(coefficient > 0, high[:, None], low[:, None])).sum(2)
    own = torch.zeros(400, 4, dtype=torch.bool).scatter_(1, anchor[:, None], True)
    if targeted:
        gap = (smallest + offset).masked_fill(own, -torch.inf).amax(1)
    else:
        gap = (-(largest + offset)).masked_fill(own, torch.inf).amin(1)
    clear = gap.abs() > 1e-9
    assert answer[clear].equal(gap[clear] > 0)
    assert 50 < int(answer.sum()) < 350  # both answers occur


@pytest.mark.parametrize(
    "model, where",
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "'1' (torch.nn.modules.batchnorm"),
        (nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(3, 3), nn.GELU())), "'1.1'"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), "'0': Conv2d"),
        (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), "'0': MaxPool2d"),
        (nn.Bilinear(2, 2, 2), "the model (torch.nn.modules.linear.Bilinear)"),
    ],
)
def test_an_unsupported_layer_is_named_with_its_path(model, where):
    with pytest.raises(ParameterError, match="certify=False") as error:
        bounds.IntervalNetwork(model)
    assert where in str(error.value)


def test_a_subclass_with_its_own_forward_is_not_trusted():
    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x - 1)

    class Reordered(torchvision.models.AlexNet):
        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    with pytest.raises(ParameterError, match=r"'0' \(.*Shifted\)"):
        bounds.certify_unreachable(nn.Sequential(Shifted()), torch.zeros(1, 1, 1, 1),
                                   torch.zeros(1), target=torch.tensor([0]))
    with pytest.raises(ParameterError, match="Reordered"):
        bounds.IntervalNetwork(Reordered(num_classes=7))


def test_images_of_another_dtype_than_the_model_are_refused():
    network = bounds.IntervalNetwork(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double())
    with pytest.raises(ParameterError, match="float32 but the model's weights are torch.float64"):
        network.differences(torch.zeros(1, 1, 2, 2), torch.zeros(1), anchor=torch.tensor([0]))


@pytest.mark.parametrize("radius", [torch.tensor([-1e-3]), torch.tensor([float("nan")]),
                                    torch.zeros(2)])
def test_a_bad_radius_is_refused(radius):
    with pytest.raises(ParameterError, match="radius"):
        bounds.input_box(torch.zeros(1, 1, 2, 2), radius)


def test_the_unit_roundoff_follows_dtype_device_and_tf32(monkeypatch):
    assert bounds.unit_roundoff(torch.float32, "cpu") == 2.0**-24
    assert bounds.unit_roundoff(torch.float64, "cuda") == 2.0**-53
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert bounds.unit_roundoff(torch.float32, "cuda") == 2.0**-11
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert bounds.unit_roundoff(torch.float32, "cuda") == 2.0**-24
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    assert bounds.unit_roundoff(torch.float32, "cuda") == 2.0**-8


def test_a_float_update_can_move_a_pixel_by_almost_twice_its_step():
    """At 0.75 floats are 2^-24 apart: a step just over half of that rounds to a full one."""
    x = torch.tensor([0.75], dtype=torch.float32)
    step = torch.tensor([2.0**-25 * 1.01], dtype=torch.float32)
    moved = float((x + step).clamp(0, 1) - x)
    assert moved == 2.0**-24
    assert step.item() < moved <= 2 * step.item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_iterates_stay_in_the_box_of_the_reachable_radius(dtype):
    """Random signed float updates with exponential steps from 1e-2 down to far below the
    spacing of floats stay within reachable_radius(remaining sum) and inside the box."""
    generator = torch.Generator().manual_seed(13)
    start = torch.rand(400, generator=generator, dtype=torch.float64)
    start[:50], start[50:100] = 0.0, 1.0
    start[100:150] = 0.5 - torch.rand(50, generator=generator, dtype=torch.float64) * 1e-7
    start = start.to(dtype)
    steps = (0.01 * torch.exp(-0.5 * torch.arange(60, dtype=torch.float64))).to(dtype)
    for first in (0, 20, 35, 50):
        remaining = steps[first:].double().sum() * (1 + 1e-12)
        radius = bounds.reachable_radius(remaining.expand(400), dtype=dtype)
        low, high = (start - radius).clamp(0, 1), (start + radius).clamp(0, 1)
        x = start.clone()
        for step in steps[first:]:
            signs = torch.randint(0, 2, (400,), generator=generator).to(dtype) * 2 - 1
            x = (x + step * signs).clamp_(0, 1)
            assert ((x - start).abs() <= radius).all()
            assert ((x >= low) & (x <= high)).all()
