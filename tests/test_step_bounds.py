"""Remaining-step bounds of the schedules against the sums of their actual step sizes."""

from __future__ import annotations

import pytest
import torch

from lib.attack import schedules, step_bounds
from lib.errors import ParameterError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

CASES = [
    ("constant", {}),
    ("iteration", {}),
    ("iteration", {"decay": 0.1}),
    ("iteration", {"decay": 3.0}),
    ("iteration", {"decay": 0.0}),
    ("exponential", {}),
    ("exponential", {"decay": 0.05}),
    ("exponential", {"decay": 2.0}),
    ("exponential", {"decay": 0.0}),
    ("step", {}),
    ("step", {"drop": 0.7, "every": 3}),
    ("step", {"drop": 0.5, "every": 10}),
    ("step", {"drop": 1.0, "every": 2}),
    ("step", {"drop": 0.0, "every": 4}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_iter, lr0", [(1, 0.5), (7, 0.01), (100, 2 / 255), (250, 0.04)])
@pytest.mark.parametrize("name, constants", CASES)
def test_the_bound_is_the_sum_of_the_remaining_steps(name, constants, max_iter, lr0, device):
    steps = schedules.preview(name, lr0=lr0, steps=max_iter, **constants)
    actual = torch.cat([steps.flip(0).cumsum(0).flip(0), torch.zeros(2, dtype=torch.float64)])
    step = torch.arange(1, max_iter + 3, device=device)  # i = 1 .. N + 2: nothing left at N + 1
    losses = torch.rand(len(step), max_iter, device=device)
    bound = step_bounds.bind_remaining(name, lr0=lr0, max_iter=max_iter, **constants)
    found = bound(step, losses)
    assert found.dtype == torch.float64 and found.device.type == device
    found = found.cpu()
    assert (found >= actual).all()
    assert torch.allclose(found, actual, rtol=1e-9, atol=0)
    assert found[-2:].tolist() == [0.0, 0.0]


def test_the_bound_of_a_job_mixes_the_states_of_its_rows():
    bound = step_bounds.bind_remaining("exponential", lr0=0.008, max_iter=100)
    found = bound(torch.tensor([1, 26, 41, 101]), torch.zeros(4, 100))
    steps = schedules.preview("exponential", lr0=0.008, steps=100)
    expected = [steps[i - 1:].sum().item() for i in (1, 26, 41)] + [0.0]
    assert found.tolist() == pytest.approx(expected, rel=1e-9, abs=0)
    assert found[0].item() == pytest.approx(0.008 / (1 - 2.718281828459045**-0.5), rel=1e-6)


def test_the_loss_adaptive_schedule_declares_no_bound():
    assert step_bounds.bind_remaining("loss-adaptive", lr0=0.1, max_iter=10) is None
    assert step_bounds.get_remaining(schedules.loss_adaptive) is None


def test_a_schedule_function_finds_the_bound_of_its_registry_name():
    assert step_bounds.get_remaining(schedules.step_decay) is step_bounds.step_remaining
    assert step_bounds.get_remaining(schedules.exponential) is step_bounds.exponential_remaining


def test_a_new_schedule_without_a_bound_is_never_stopped(monkeypatch):
    def halving(step, losses, *, lr0):
        return lr0 * 0.5 ** (step - 1).to(losses.dtype)

    monkeypatch.setitem(schedules.SCHEDULES, "halving", halving)
    assert step_bounds.bind_remaining("halving", lr0=0.1, max_iter=5) is None
    assert step_bounds.get_remaining(halving) is None
    monkeypatch.setitem(step_bounds.REMAINING, "halving", step_bounds.step_remaining)
    bound = step_bounds.bind_remaining("halving", lr0=0.1, max_iter=5)
    assert bound(torch.tensor([1]), torch.zeros(1, 5)).item() == pytest.approx(0.19375, rel=1e-9)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("nosuch", {}, "not known"),
        ("exponential", {"drop": 0.5}, "takes no constant"),
        ("step", {"every": 0}, "every >= 1"),
        ("iteration", {"decay": -0.5}, "decay must be >= 0"),
        ("constant", {"max_iter": 0}, "max_iter"),
        ("constant", {"lr0": -1.0}, "lr0"),
    ],
)
def test_bad_arguments_are_refused(name, options, message):
    arguments = {"lr0": 0.1, "max_iter": 10, **options}
    with pytest.raises(ParameterError, match=message):
        bound = step_bounds.bind_remaining(name, **arguments)
        bound(torch.tensor([1]), torch.zeros(1, 10))
