"""The attack engine against a plain per-image loop, known flip points and its error handling."""

import functools
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.attack import api, engine, schedules
from lib.attack.results import MODES, AttackResult, AttackRow
from lib.errors import ParameterError
from lib.model import precision

SCHEDULE_NAMES = sorted(schedules.SCHEDULES)
NUM_CLASSES = 7
N_IMAGES = 20
MAX_ITER = 30
LR0 = {"targeted": 0.01, "untargeted": 0.002}  # both give finish times from 0 to MAX_ITER


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: 2 threads wait on each other (25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, NUM_CLASSES),
        )
        .to(dtype)
        .eval()
    )


@functools.cache
def problem():
    """A small CNN, random images, their predicted classes and one other class per image."""
    model = small_cnn()
    images = torch.rand(N_IMAGES, 3, 12, 12, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        sources = model(images).argmax(1)
    targets = (sources + 1 + torch.arange(N_IMAGES) % (NUM_CLASSES - 1)) % NUM_CLASSES
    return model, images, sources, targets


def reference_attack(model, image, *, target, source, schedule, lr0, max_iter, mode):
    """The method chapter's loop, line by line, for one image (model frozen by the caller)."""
    lr_of = schedules.bind(schedule, lr0=lr0)
    losses = torch.full((1, max_iter), math.nan, dtype=image.dtype)
    lrs = []
    x = image[None].clone()  # x_0 = x
    for i in range(1, max_iter + 1):  # for i = 1 .. N
        x.requires_grad_(True)
        logits = model(x)
        predicted = logits.argmax(1).item()
        if (predicted == target) if mode == "targeted" else (predicted != source):
            return True, i - 1, x.detach()[0], losses[0], lrs  # success, iterations = i - 1
        aim = target if mode == "targeted" else source
        loss = F.cross_entropy(logits, torch.tensor([aim]))  # L_i = CE(f(x_{i-1}), t)
        (grad,) = torch.autograd.grad(loss, x)
        losses[0, i - 1] = loss.item()
        lr = lr_of(torch.tensor([i]), losses).item()  # lr_i
        lrs.append(lr)
        direction = -1 if mode == "targeted" else 1
        x = (x.detach() + direction * lr * grad.sign()).clamp(0, 1)  # x_i = clip(...)
    predicted = model(x).argmax(1).item()  # success iff argmax f(x_N) == t
    success = (predicted == target) if mode == "targeted" else (predicted != source)
    return success, max_iter, x.detach()[0], losses[0], lrs


@functools.cache
def reference_results(schedule, mode):
    model, images, sources, targets = problem()
    model.requires_grad_(False)
    try:
        return [
            reference_attack(
                model,
                images[k],
                target=targets[k].item(),
                source=sources[k].item(),
                schedule=schedule,
                lr0=LR0[mode],
                max_iter=MAX_ITER,
                mode=mode,
            )
            for k in range(N_IMAGES)
        ]
    finally:
        model.requires_grad_(True)


def assert_matches_reference(result, reference):
    assert result.success.tolist() == [r[0] for r in reference]
    assert result.iterations.tolist() == [r[1] for r in reference]
    torch.testing.assert_close(result.borderline, torch.stack([r[2] for r in reference]))
    torch.testing.assert_close(
        result.loss_trace, torch.stack([r[3] for r in reference]), equal_nan=True
    )
    expected_lr = torch.full((len(reference), MAX_ITER), math.nan, dtype=torch.float64)
    for k, r in enumerate(reference):
        expected_lr[k, : len(r[4])] = torch.tensor(r[4], dtype=torch.float64)
    torch.testing.assert_close(result.lr_trace, expected_lr, equal_nan=True)
    torch.testing.assert_close(result.mean_lr, expected_lr.nanmean(1), equal_nan=True)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_engine_equals_the_per_image_reference_loop(schedule, mode, batch_size):
    model, images, sources, targets = problem()
    targeted = mode == "targeted"
    result = api.attack(
        model,
        images,
        sources,
        targeted=targeted,
        targets=targets if targeted else None,
        schedule=schedule,
        lr0=LR0[mode],
        max_iter=MAX_ITER,
        batch_size=batch_size,
        certify=False,
    )
    assert_matches_reference(result, reference_results(schedule, mode))


@pytest.mark.parametrize("mode", MODES)
def test_the_reference_problem_has_varied_finish_times(mode):
    iterations = [r[1] for s in SCHEDULE_NAMES for r in reference_results(s, mode)]
    successes = [r[0] for s in SCHEDULE_NAMES for r in reference_results(s, mode)]
    assert len(set(iterations)) >= 6 and min(iterations) <= 2 and max(iterations) == MAX_ITER
    assert 0 < sum(successes) < len(successes)


def mixed_rows(mode):
    """Every (image, schedule) pair, interleaved so that one batch mixes schedules."""
    _, _, sources, targets = problem()
    rows = [
        AttackRow(
            row_id=1000 + 10 * k + s,
            image=k,
            source=sources[k].item(),
            target=targets[k].item() if mode == "targeted" else -1,
            schedule=name,
        )
        for k in range(N_IMAGES)
        for s, name in enumerate(SCHEDULE_NAMES)
    ]
    return rows


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_mixing_schedules_equals_the_reference(mode):
    model, images, _, _ = problem()
    rows = mixed_rows(mode)
    chunks = list(
        api.iter_attack_rows(
            model,
            images,
            rows,
            targeted=mode == "targeted",
            lr0=LR0[mode],
            max_iter=MAX_ITER,
            batch_size=7,
            certify=False,
            keep_images=True,
        )
    )
    assert len(chunks) > 1
    result = AttackResult.concat(chunks).sorted()
    assert result.row_id.tolist() == sorted(r.row_id for r in rows)
    for s, name in enumerate(SCHEDULE_NAMES):
        mine = result.take(torch.arange(s, len(rows), len(SCHEDULE_NAMES)))
        assert_matches_reference(mine, reference_results(name, mode))


def test_streamed_results_without_images_and_as_a_frame():
    model, images, _, _ = problem()
    rows = pd.DataFrame(mixed_rows("targeted"))
    result = api.attack_rows(
        model, images, rows, targeted=True, lr0=0.01, max_iter=MAX_ITER, batch_size=16
    )
    assert result.borderline is None
    frame = result.to_frame()
    assert list(frame.row_id) == sorted(rows.row_id)
    assert set(frame.columns) >= {"success", "iterations", "status", "mean_lr", "l1", "l2"}
    assert (frame.status == "ok").all()


def test_a_chunk_rerun_from_scratch_is_bit_identical_in_float32():
    model = small_cnn(torch.float32)
    _, images, _, _ = problem()
    rows = mixed_rows("targeted")[17:61]
    runs = [
        api.attack_rows(
            model, images.float(), rows, targeted=True, lr0=0.01, max_iter=MAX_ITER, batch_size=6,
            keep_images=True,
        )
        for _ in range(2)
    ]
    for name in ("row_id", "success", "iterations", "borderline", "l1", "l2", "linf"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name
    for name in ("lr_trace", "loss_trace", "mean_lr", "target_prob"):
        assert torch.equal(
            getattr(runs[0], name).nan_to_num(-1), getattr(runs[1], name).nan_to_num(-1)
        ), name


def test_the_callers_tensors_are_left_unchanged():
    model, images, sources, targets = problem()
    inputs = [t.clone() for t in (images, sources, targets)]
    api.attack(
        model,
        images,
        sources,
        targeted=True,
        targets=targets,
        schedule="constant",
        lr0=0.01,
        max_iter=MAX_ITER,
        batch_size=3,
    )
    for before, after in zip(inputs, (images, sources, targets), strict=True):
        assert torch.equal(before, after)


def test_uint8_pool_is_read_as_pixel_values_over_255():
    model, _, _, _ = problem()
    pool8 = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        sources = model(pool8.double() / 255).argmax(1)
    rows = [(k, k, sources[k].item(), (sources[k].item() + 3) % 7, "constant") for k in range(4)]
    options = dict(targeted=True, lr0=0.01, max_iter=MAX_ITER, keep_images=True)
    from_uint8 = api.attack_rows(model, pool8, rows, **options)
    from_float = api.attack_rows(model, pool8.double() / 255, rows, **options)
    assert torch.equal(from_uint8.iterations, from_float.iterations)
    assert torch.equal(from_uint8.borderline, from_float.borderline)


# --------------------------------------------------------------------------- known answers


def two_class_linear(seed):
    """Softmax regression on 3x4x4 images: the sign of the gradient never changes."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 48, generator=generator, dtype=torch.float64) * 0.3)
        model[1].bias.zero_()
    images = torch.rand(24, 3, 4, 4, generator=generator, dtype=torch.float64)
    return model.eval(), images


def expected_flip(model, image, *, source, target, schedule, lr0, max_iter):
    """The first iterate past the boundary, in closed form along the fixed sign direction.

    With two classes the gradient of CE(target) is p_source (w_source - w_target), so every
    step moves by lr_i sign(w_target - w_source) and x_i = clip(x_0 + S_i sign(d), 0, 1), with
    S_i the sum of the first i step sizes.
    """
    weight = model[1].weight.detach().numpy()
    bias = model[1].bias.detach().numpy()
    d = weight[target] - weight[source]
    x0 = image.numpy().reshape(-1)
    lrs = schedules.preview(schedule, lr0=lr0, steps=max_iter).numpy()
    total = np.concatenate([[0.0], np.cumsum(lrs)])
    for i in range(max_iter + 1):
        x = np.clip(x0 + total[i] * np.sign(d), 0, 1)
        if d @ x + bias[target] - bias[source] > 0:
            return True, i, x
    return False, max_iter, x


@pytest.mark.parametrize("schedule", ["constant", "iteration", "step"])
def test_linear_model_stops_at_the_first_iterate_past_the_boundary(schedule):
    model, images = two_class_linear(seed=3)
    with torch.no_grad():
        sources = model(images).argmax(1)
    targets = 1 - sources
    result = api.attack(
        model,
        images,
        sources,
        targeted=True,
        targets=targets,
        schedule=schedule,
        lr0=0.02,
        max_iter=60,
        batch_size=5,
        certify=False,  # the final images of failures are compared
    )
    expected = [
        expected_flip(
            model,
            images[k],
            source=sources[k].item(),
            target=targets[k].item(),
            schedule=schedule,
            lr0=0.02,
            max_iter=60,
        )
        for k in range(len(images))
    ]
    assert result.iterations.tolist() == [e[1] for e in expected]
    assert result.success.tolist() == [e[0] for e in expected]
    np.testing.assert_allclose(
        result.borderline.reshape(len(images), -1).numpy(),
        np.stack([e[2] for e in expected]),
        atol=1e-12,
    )
    if schedule == "constant":
        assert result.success.all() and len(set(result.iterations.tolist())) > 5


def assert_refinement_left_alone(result, rows):
    """Failed rows and rows that crossed after 0 updates report the path distances, 0 cost."""
    assert rows.any()
    for name in ("l1", "l2", "linf"):
        assert torch.equal(getattr(result, f"refined_{name}")[rows], getattr(result, name)[rows])
    assert (result.refine_forwards[rows] == 0).all()
    assert torch.equal(result.refined[rows], result.borderline[rows])


def test_failures_use_the_whole_budget():
    model, images = two_class_linear(seed=3)
    with torch.no_grad():
        sources = model(images).argmax(1)
    result = api.attack(
        model,
        images,
        sources,
        targeted=True,
        targets=1 - sources,
        schedule="exponential",
        lr0=1e-4,
        max_iter=7,
        refine_tolerance=1e-6,
        certify=False,
    )
    assert not result.success.any()
    assert (result.iterations == 7).all()
    assert_refinement_left_alone(result, torch.ones(len(images), dtype=torch.bool))
    assert not result.lr_trace.isnan().any() and not result.loss_trace.isnan().any()
    assert (result.target_prob < 0.5).all()
    assert result.status == ["ok"] * len(images)


def test_images_stay_in_the_unit_cube_with_large_steps():
    model, images, sources, targets = problem()
    result = api.attack(
        model,
        images,
        sources,
        targeted=True,
        targets=targets,
        schedule="constant",
        lr0=0.4,
        max_iter=MAX_ITER,
        batch_size=3,
    )
    assert result.borderline.min() >= 0 and result.borderline.max() <= 1
    moved = result.iterations > 0
    clipped = (result.borderline[moved] == 0) | (result.borderline[moved] == 1)
    assert clipped.any()


def test_a_sample_already_in_the_target_class_costs_zero_updates():
    model, images, sources, targets = problem()
    aimed, labels = targets.clone(), sources.clone()
    aimed[::4] = sources[::4]  # targeted at what the model already says ...
    labels[::4] = (sources[::4] + 2) % NUM_CLASSES  # ... for images it misclassifies
    result = api.attack(
        model,
        images,
        labels,
        targeted=True,
        targets=aimed,
        schedule="loss-adaptive",
        lr0=0.01,
        max_iter=MAX_ITER,
        refine_tolerance=1e-3,
    )
    done = result.iterations[::4]
    assert (done == 0).all() and result.success[::4].all()
    assert_refinement_left_alone(result, result.iterations == 0)
    assert torch.equal(result.borderline[::4], images[::4])
    assert (result.l1[::4] == 0).all() and result.mean_lr[::4].isnan().all()
    assert result.lr_trace[::4].isnan().all() and result.loss_trace[::4].isnan().all()
    assert (result.iterations[1::4] > 0).all()


def test_untargeted_leaves_the_source_and_reports_the_new_class():
    model, images, sources, _ = problem()
    result = api.attack(
        model,
        images,
        sources,
        targeted=False,
        schedule="constant",
        lr0=0.002,
        max_iter=MAX_ITER,
    )
    ok = result.success
    assert ok.any()
    assert (result.final_class[ok] != sources[ok]).all()
    assert (result.final_class[~ok] == sources[~ok]).all()
    wrong = sources.clone()
    wrong[0] = (sources[0] + 1) % NUM_CLASSES  # the model does not say this source: flipped
    result = api.attack(
        model,
        images,
        wrong,
        targeted=False,
        schedule="constant",
        lr0=0.002,
        max_iter=MAX_ITER,
    )
    assert result.iterations[0] == 0 and result.success[0]


# --------------------------------------------------------------------------- robustness


class Poisoned(nn.Module):
    """Two-class linear model whose logits turn NaN for tagged images.

    The tag is pixel (2, 0, 0), whose weight is zero, so its gradient sign is 0 and it never
    moves. Tag 0.75: NaN from the start. Tag 1.0: NaN once pixel (0, 0, 0) has left 0.5, i.e.
    after the first update.
    """

    def __init__(self):
        super().__init__()
        self.linear, _ = two_class_linear(seed=5)
        with torch.no_grad():
            self.linear[1].weight[:, 32] = 0  # flat index of pixel (2, 0, 0)

    def forward(self, x):
        logits = self.linear(x)
        tag = x[:, 2, 0, 0]
        bad = (tag == 0.75) | ((tag == 1.0) & (x[:, 0, 0, 0] != 0.5))
        return torch.where(bad[:, None], math.nan, logits)


def test_nonfinite_logits_fail_one_sample_and_leave_the_others_alone():
    model = Poisoned()
    _, images = two_class_linear(seed=3)
    images[:, 2, 0, 0] = 0.0
    images[:, 0, 0, 0] = 0.5
    with torch.no_grad():
        sources = model(images).argmax(1)
    rows = [(k, k, sources[k].item(), 1 - sources[k].item(), "constant") for k in range(24)]
    options = dict(targeted=True, lr0=0.02, max_iter=60, batch_size=4, certify=False,
                   keep_images=True)
    clean = api.attack_rows(model, images, rows, **options)
    poisoned_images = images.clone()
    poisoned_images[5, 2, 0, 0] = 0.75
    poisoned_images[11, 2, 0, 0] = 1.0
    poisoned = api.attack_rows(model, poisoned_images, rows, **options)
    assert poisoned.status[5] == poisoned.status[11] == "nonfinite"
    assert not poisoned.success[5] and not poisoned.success[11]
    assert poisoned.iterations[5] == 0 and poisoned.iterations[11] == 1
    assert poisoned.target_prob[[5, 11]].isnan().all()
    others = torch.tensor([k for k in range(24) if k not in (5, 11)])
    assert all(poisoned.status[k] == "ok" for k in others.tolist())
    assert torch.equal(poisoned.iterations[others], clean.iterations[others])
    assert torch.equal(poisoned.success[others], clean.success[others])
    torch.testing.assert_close(poisoned.borderline[others], clean.borderline[others])


class FlagRecorder(nn.Module):
    """Records the weights' requires_grad flags and the training mode at each forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append(
            (self.training, [p.requires_grad for p in self.parameters()], torch.is_grad_enabled())
        )
        return self.inner(x)


def test_weights_are_frozen_during_the_attack_and_restored_after():
    model = FlagRecorder(small_cnn())
    model.train()
    model.inner[0].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    _, images, sources, targets = problem()
    with torch.no_grad():  # the engine computes input gradients even here
        result = api.attack(
            model,
            images[:5],
            sources[:5],
            targeted=True,
            targets=targets[:5],
            schedule="constant",
            lr0=0.01,
            max_iter=5,
            certify=False,
        )
    assert (result.iterations > 0).any()
    assert model.seen and all(not training for training, _, _ in model.seen)
    assert all(not any(flags) for _, flags, _ in model.seen)
    assert [p.requires_grad for p in model.parameters()] == before
    assert model.training and model.inner[0].training


# --------------------------------------------------------------------------- refinement


def closed_form_crossing(model, image, *, source, target, lr0, max_iter):
    """x_{k-1}, x_k and the exact boundary point between them for a two-class linear model.

    Every step moves along the fixed sign direction (see :func:`expected_flip`), and the
    target-minus-source logit g is affine along the segment x_{k-1} -> x_k, so the crossing is
    at the fraction -g(x_{k-1}) / (g(x_k) - g(x_{k-1})) of it.
    """
    crossed, k, end = expected_flip(
        model, image, source=source, target=target, schedule="constant", lr0=lr0,
        max_iter=max_iter,
    )
    assert crossed and k >= 1
    _, _, start = expected_flip(
        model, image, source=source, target=target, schedule="constant", lr0=lr0, max_iter=k - 1
    )
    weight = model[1].weight.detach().numpy()
    bias = model[1].bias.detach().numpy()
    d, b = weight[target] - weight[source], bias[target] - bias[source]
    g0, g1 = d @ start + b, d @ end + b
    return start, end, start + (-g0 / (g1 - g0)) * (end - start)


@pytest.mark.parametrize("tolerance", [1e-2, 1e-3, 1e-5])
def test_refinement_finds_the_boundary_within_the_tolerance(tolerance):
    model, images = two_class_linear(seed=3)
    with torch.no_grad():
        sources = model(images).argmax(1)
    targets = 1 - sources
    options = dict(targeted=True, targets=targets, schedule="constant", lr0=0.02, max_iter=60,
                   batch_size=5)
    plain = api.attack(model, images, sources, **options)
    result = api.attack(model, images, sources, refine_tolerance=tolerance, **options)
    assert result.success.all()
    # the path results are untouched by the refinement
    for name in ("iterations", "l1", "l2", "linf", "borderline", "target_prob"):
        assert torch.equal(getattr(result, name), getattr(plain, name)), name
    assert_refinement_left_alone(plain, torch.ones(len(images), dtype=torch.bool))
    weight = model[1].weight.detach()
    for k in range(len(images)):
        start, end, boundary = closed_form_crossing(
            model, images[k], source=sources[k].item(), target=targets[k].item(), lr0=0.02,
            max_iter=60,
        )
        refined = result.refined[k].reshape(-1).numpy()
        assert np.abs(refined - boundary).max() <= tolerance + 1e-12
        d = (weight[targets[k]] - weight[sources[k]]).numpy()
        assert d @ refined > d @ boundary - 1e-12  # on the crossed side
        step = np.abs(end - start).max()
        bound = max(math.ceil(math.log2(step / tolerance)), 0) + 1
        assert 0 <= result.refine_forwards[k].item() <= bound
        delta = result.refined[k] - images[k]
        assert result.refined_linf[k].item() == pytest.approx(delta.abs().max().item())
    for name in ("l1", "l2", "linf"):
        assert (getattr(result, f"refined_{name}") <= getattr(result, name)).all()
    moved = ~(result.refined == result.borderline).flatten(1).all(1)
    assert moved.float().mean() >= 0.5
    assert (result.refined_l1[moved] < result.l1[moved]).all()  # the overshoot is removed


def test_refined_distances_never_exceed_the_path_distances_on_a_cnn():
    model, images, sources, targets = problem()
    result = api.attack(
        model, images, sources, targeted=True, targets=targets, schedule="loss-adaptive",
        lr0=0.01, max_iter=MAX_ITER, batch_size=7, refine_tolerance=1e-4,
    )
    done = result.success & (result.iterations > 0)
    assert done.sum() >= 5
    for name in ("l1", "l2", "linf"):
        assert (getattr(result, f"refined_{name}") <= getattr(result, name)).all()
    with torch.no_grad():
        reached = model(result.refined[done]).argmax(1)
    assert torch.equal(reached, targets[done])  # every refined point is still crossed
    assert (result.refine_forwards[done] > 0).all() and (result.refine_forwards[~done] == 0).all()
    frame = result.to_frame()
    assert {"refined_l1", "refined_l2", "refined_linf", "refine_forwards"} <= set(frame.columns)


# --------------------------------------------------------------------------- precision


class AutocastShifted(nn.Module):
    """A float32 two-class linear model whose logits under autocast get a known shift.

    The product itself always runs in float32, so the two precisions differ by exactly
    ``shift`` (added to class 1's logit) and the steps (signs of the gradient) are the same.
    Records whether each call ran under autocast and got a channels-last input.
    """

    def __init__(self, linear: nn.Module, shift: float):
        super().__init__()
        self.linear = linear
        self.shift = shift
        self.calls = []

    def forward(self, x):
        autocast = torch.is_autocast_enabled(x.device.type)
        self.calls.append((autocast, x.is_contiguous(memory_format=torch.channels_last)))
        with torch.autocast(x.device.type, enabled=False):
            logits = self.linear(x.float().flatten(1))
        if autocast:
            logits = logits + torch.tensor([0.0, self.shift])
        return logits


def gap_to_class_1(model, x):
    """Class 0's logit minus class 1's, in float32 (> 0: not crossed toward class 1)."""
    with torch.no_grad():
        logits = model.linear(x.flatten(1))
    return (logits[:, 0] - logits[:, 1]).tolist()


@pytest.mark.parametrize("case", ["bf16 crosses one step early", "bf16 crosses late"])
def test_a_low_precision_crossing_counts_only_when_float32_confirms_it(case):
    linear = nn.Linear(48, 2)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, 48, generator=generator) * 0.3)
        linear.bias.zero_()
    images = torch.rand(40, 3, 4, 4, generator=generator)
    probe = AutocastShifted(linear, 0.0).eval()
    with torch.no_grad():
        sources = probe(images).argmax(1)
    image = images[(sources == 0).nonzero()[0]]  # attacked toward class 1
    options = dict(targeted=True, targets=torch.tensor([1]), schedule="constant", lr0=0.01,
                   batch_size=1, certify=False)
    reference = api.attack(probe, image, torch.tensor([0]), max_iter=60, **options)
    k = reference.iterations.item()
    assert reference.success.item() and k >= 2
    before = [api.attack(probe, image, torch.tensor([0]), max_iter=m, **options).borderline
              for m in (k - 2, k - 1)]
    gaps = gap_to_class_1(probe, torch.cat(before + [reference.borderline]))
    assert gaps[0] > gaps[1] > 0 > gaps[2]
    if case == "bf16 crosses one step early":
        shift = (gaps[0] + gaps[1]) / 2  # autocast says crossed at x_{k-1}, not at x_{k-2}
    else:
        shift = gaps[2] - engine.CONFIRM_MARGIN / 2  # autocast: not crossed at x_k, near it
    model = AutocastShifted(linear, shift).eval()
    assert model(before[1]).argmax().item() == 0  # float32: x_{k-1} is not crossed
    with torch.no_grad():
        low = precision.forward(model, before[1 if "early" in case else 0], precision="bfloat16")
        at_k = precision.forward(model, reference.borderline, precision="bfloat16")
    if "early" in case:
        assert low.argmax().item() == 1  # bfloat16 calls x_{k-1} crossed
    else:
        assert at_k.argmax().item() == 0  # bfloat16 does not call x_k crossed
    model.calls.clear()
    result = api.attack(model, image, torch.tensor([0]), max_iter=60, precision="bfloat16",
                        **options)
    assert (True, True) in model.calls and (False, False) in model.calls
    assert result.iterations.item() == k and result.success.item()
    assert torch.equal(result.borderline, reference.borderline)
    assert model.linear(result.borderline.flatten(1)).argmax().item() == 1  # crossed in float32
    assert result.final_class.item() == 1
    assert result.target_prob.item() == pytest.approx(reference.target_prob.item(), abs=1e-6)


def test_bfloat16_on_a_small_cnn_reports_only_float32_successes():
    model = small_cnn(torch.float32)
    _, images, sources, targets = problem()
    images, sources, targets = images[:6].float(), sources[:6], targets[:6]
    result = api.attack(model, images, sources, targeted=True, targets=targets,
                        schedule="constant", lr0=0.01, max_iter=MAX_ITER, batch_size=6,
                        precision="bfloat16", refine_tolerance=1e-3)
    assert result.success.sum() >= 3
    with torch.no_grad():
        logits = model(result.borderline)
    assert torch.equal(logits.argmax(1)[result.success], targets[result.success])
    assert torch.equal(result.final_class, logits.argmax(1))
    expected = torch.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(result.target_prob, expected)
    with torch.no_grad():
        refined = model(result.refined[result.success]).argmax(1)
    assert torch.equal(refined, targets[result.success])


def test_auto_precision_follows_the_capability_check(monkeypatch):
    model = small_cnn(torch.float32)
    _, images, sources, targets = problem()
    images, sources, targets = images[:4].float(), sources[:4], targets[:4]
    options = dict(targeted=True, targets=targets, schedule="constant", lr0=0.01, max_iter=5)
    plain = api.attack(model, images, sources, **options)
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: False)
    auto = api.attack(model, images, sources, precision="auto", **options)
    assert torch.equal(auto.borderline, plain.borderline)
    assert torch.equal(auto.loss_trace.nan_to_num(), plain.loss_trace.nan_to_num())
    seen = []
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    forward = precision.forward
    monkeypatch.setattr(precision, "forward",
                        lambda m, x, *, precision: seen.append(precision) or forward(
                            m, x, precision=precision))
    api.attack(model, images, sources, precision="auto", **options)
    assert set(seen) == {"bfloat16"}


# --------------------------------------------------------------------------- bad input


def call_attack(**changes):
    model, images, sources, targets = problem()
    arguments = dict(
        model=model,
        inputs=images,
        labels=sources,
        targeted=True,
        targets=targets,
        schedule="constant",
        lr0=0.01,
        max_iter=5,
    )
    arguments.update(changes)
    return api.attack(**arguments)


def call_rows(rows, pool=None, **changes):
    model, images, _, _ = problem()
    arguments = dict(targeted=True, lr0=0.01, max_iter=5)
    arguments.update(changes)
    return api.iter_attack_rows(model, images if pool is None else pool, rows, **arguments)


class MixedPrecision(nn.Module):
    """A float64 linear model with one float32 buffer (a half-converted model)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, NUM_CLASSES)).double()
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x):
        return self.linear(x)


_, _IMAGES, _SOURCES, _TARGETS = problem()
BAD_INPUTS = {
    "unknown schedule": (lambda: call_attack(schedule="cosine"), "loss-adaptive"),
    "lr0 zero": (lambda: call_attack(lr0=0.0), "lr0"),
    "lr0 negative": (lambda: call_attack(lr0=-0.01), "lr0"),
    "max_iter zero": (lambda: call_attack(max_iter=0), "max_iter"),
    "clean labels as targets": (lambda: call_attack(targets=_SOURCES),
                                r"target equals the label .* in 20 row\(s\), row_id 0, 1, 2"),
    "targeted without targets": (lambda: call_attack(targets=None), "targets is required"),
    "untargeted with targets": (lambda: call_attack(targeted=False), "targeted=False"),
    "targeted not a flag": (lambda: call_attack(targeted="yes"), "True or False"),
    "image above 1": (lambda: call_attack(inputs=_IMAGES * 2), r"\[0, 1\]"),
    "image below 0": (lambda: call_attack(inputs=_IMAGES - 0.5), r"\[0, 1\]"),
    "image nan": (lambda: call_attack(inputs=_IMAGES.clone().fill_(math.nan)), r"\[0, 1\]"),
    "image without batch axis": (lambda: call_attack(inputs=_IMAGES[0]), r"\[N, C, H, W\]"),
    "target too large": (lambda: call_attack(targets=_TARGETS * 0 + 7), "0 .. 6"),
    "target negative": (lambda: call_attack(targets=_TARGETS * 0 - 1), "0 .. 6"),
    "label too large": (lambda: call_attack(labels=_SOURCES * 0 + 9), "label"),
    "targets wrong length": (lambda: call_attack(targets=_TARGETS[:3]), "shape"),
    "targets float": (lambda: call_attack(targets=_TARGETS.double()), "integer"),
    "unknown constant": (lambda: call_attack(schedule="step", constants={"decay": 0.1}),
                         "drop, every"),
    "lr0 inside a partial": (
        lambda: call_attack(schedule=functools.partial(schedules.step_decay, lr0=0.1)), "lr0"),
    "model in two dtypes": (lambda: call_attack(model=MixedPrecision()), "buffer 'scale'"),
    "unknown precision": (
        lambda: call_attack(precision="float16"), "'float32', 'bfloat16', 'auto'"
    ),
    "bfloat16 with float64": (lambda: call_attack(precision="bfloat16"), "float32 model"),
    "refine tolerance zero": (lambda: call_attack(refine_tolerance=0.0), "refine_tolerance"),
    "refine tolerance negative": (lambda: call_rows([(0, 0, 1, 2, "constant")],
                                                    refine_tolerance=-1e-3), "None"),
    "rows unknown precision": (
        lambda: call_rows([(0, 0, 1, 2, "constant")], precision="fp8"), "precision must be"
    ),
    "rows unknown schedule": (lambda: call_rows([(0, 0, 1, 2, "warmup")]), "constant"),
    "rows image outside pool": (lambda: call_rows([(0, 99, 1, 2, "constant")]), "pool"),
    "rows duplicate id": (
        lambda: call_rows([(0, 0, 1, 2, "constant"), (0, 1, 1, 2, "constant")]),
        "unique",
    ),
    "rows missing column": (
        lambda: call_rows(pd.DataFrame({"row_id": [0], "image": [0]})),
        "source",
    ),
    "rows target out of range": (lambda: call_rows([(0, 0, 1, 9, "constant")]), "0 .. 6"),
    "rows target equals source": (
        lambda: call_rows([(0, 0, 1, 2, "constant"), (7, 0, 3, 3, "step")]), "row_id 7"),
    "rows constants for unused schedule": (
        lambda: call_rows([(0, 0, 1, 2, "constant")], schedule_constants={"step": {"drop": 1}}),
        "no row uses",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_parameter_error(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ParameterError, match=message):
        call()


@pytest.mark.parametrize("keyword", ["max_iters", "mode", "decay", "sources", "dtype"])
def test_a_misspelt_or_removed_keyword_is_a_type_error_naming_it(keyword):
    with pytest.raises(TypeError, match=keyword):
        call_attack(**{keyword: 50})


def test_a_partial_schedule_brings_its_constants():
    model, images, sources, targets = problem()
    options = dict(targeted=True, targets=targets, lr0=0.01, max_iter=MAX_ITER, certify=False)
    named = api.attack(model, images, sources, schedule="exponential",
                       constants={"decay": 0.2}, **options)
    bound = api.attack(model, images, sources,
                       schedule=functools.partial(schedules.exponential, decay=0.2), **options)
    plain = api.attack(model, images, sources, schedule="exponential", **options)
    assert torch.equal(named.lr_trace.nan_to_num(-1), bound.lr_trace.nan_to_num(-1))
    assert torch.equal(named.iterations, bound.iterations)
    assert named.lr_trace[:, 1].nan_to_num(0).amax() > plain.lr_trace[:, 1].nan_to_num(0).amax()


def test_the_unknown_schedule_error_names_every_known_schedule():
    with pytest.raises(ParameterError) as error:
        call_attack(schedule="cosine")
    assert all(name in str(error.value) for name in schedules.SCHEDULES)


# --------------------------------------------------------------------------- the field's call


def two_class_problem():
    """A float32 two-class linear model and images in the middle of the cube.

    Every sign step moves along sign(w_1 - w_0), so the smallest Linf perturbation that
    flips an image is exact: |g(x)| / ||w_1 - w_0||_1 for the logit gap g (no clipping: the
    images keep 0.3 from the cube's faces and every such distance is below 0.3).
    """
    generator = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 48, generator=generator) * 0.3)
        model[1].bias.zero_()
    images = 0.3 + 0.4 * torch.rand(16, 3, 4, 4, generator=generator)
    with torch.no_grad():
        logits = model(images)
    labels = logits.argmax(1)
    d = (model[1].weight[1] - model[1].weight[0]).detach()
    minimal = (logits[:, 1] - logits[:, 0]).abs() / d.abs().sum()
    assert minimal.max() < 0.3
    return model, images, labels, minimal


def test_a_constant_schedule_finds_the_minimal_linf_distance_within_one_step():
    model, images, labels, minimal = two_class_problem()
    lr0 = 0.002
    result = api.attack(model, images, labels, targeted=False, schedule="constant", lr0=lr0,
                        max_iter=200)
    assert result.success.all()
    assert (result.linf >= minimal - 1e-6).all()
    assert (result.linf <= minimal + lr0 + 1e-6).all()


def test_the_engine_runs_through_adv_libs_call_shape_beside_fmn():
    from lib.attack.evaluation import adv_lib_attacks

    model, images, labels, minimal = two_class_problem()
    before = images.clone()
    lr0 = 0.002
    attacks = {
        "engine": api.adv_lib_form(schedule="constant", lr0=lr0, max_iter=200),
        "fmn": functools.partial(adv_lib_attacks().fmn, norm=math.inf, steps=200),
    }
    torch.manual_seed(0)
    for name, attack_fn in attacks.items():
        for targeted, aim in ((False, labels), (True, 1 - labels)):
            adversarial = attack_fn(model, images, aim, targeted=targeted)
            assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
            with torch.no_grad():
                predicted = model(adversarial).argmax(1)
            reached = predicted == aim if targeted else predicted != aim
            assert reached.all(), (name, targeted)
            linf = (adversarial - images).flatten(1).abs().amax(1)
            assert (linf >= minimal - 1e-5).all(), (name, targeted)
            if name == "engine":
                assert (linf <= minimal + lr0 + 1e-6).all()
    # adv-lib's convention: an image already in its target class comes back as it is
    already = attacks["engine"](model, images, labels, targeted=True)
    assert torch.equal(already, images)
    assert torch.equal(images, before)  # the caller's images are left alone
