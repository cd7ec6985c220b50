"""The step-size schedules: hand-computed values, batching, the registry and its errors."""

import doctest
import math

import pytest
import torch

from lib.attack import schedules
from lib.errors import ParameterError

# lr_1 .. lr_10 for lr0 = 0.1, computed by hand from the method chapter's table.
HAND_COMPUTED = {
    "constant": [0.1] * 10,
    # 0.1 / (1 + 0.5 (i - 1)) = 0.1 / 1, / 1.5, / 2, / 2.5, ...
    "iteration": [
        0.1,
        0.1 / 1.5,
        0.05,
        0.04,
        0.1 / 3,
        0.1 / 3.5,
        0.025,
        0.1 / 4.5,
        0.02,
        0.1 / 5.5,
    ],
    # 0.1 exp(-0.5 (i - 1))
    "exponential": [
        0.1,
        0.0606530660,
        0.0367879441,
        0.0223130160,
        0.0135335283,
        0.0082084999,
        0.0049787068,
        0.0030197383,
        0.0018315639,
        0.0011108997,
    ],
    # 0.1 * 0.5^(i - 1)
    "step": [
        0.1,
        0.05,
        0.025,
        0.0125,
        0.00625,
        0.003125,
        0.0015625,
        7.8125e-4,
        3.90625e-4,
        1.953125e-4,
    ],
}

# A loss history and its running maximum 2, 2, 2, 2.5, 2.5, 2.5, 2.5, 3, 3, 3.
LOSSES = [2.0, 1.5, 1.8, 2.5, 1.0, 0.5, 0.5, 3.0, 1.5, 0.0]
LOSS_ADAPTIVE_FACTORS = [1.0, 0.75, 0.9, 1.0, 0.4, 0.2, 0.2, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("name", sorted(HAND_COMPUTED))
def test_first_ten_values_match_hand_computed(name):
    values = schedules.preview(name, lr0=0.1, steps=10)
    assert values.tolist() == pytest.approx(HAND_COMPUTED[name], rel=1e-7)


def test_loss_adaptive_first_ten_values_on_a_loss_history():
    history = torch.tensor(LOSSES, dtype=torch.float64)
    values = schedules.preview("loss-adaptive", lr0=0.02, losses=history)
    assert values.tolist() == pytest.approx([0.02 * f for f in LOSS_ADAPTIVE_FACTORS], rel=1e-12)


def test_loss_adaptive_without_spread_takes_full_steps():
    values = schedules.preview("loss-adaptive", lr0=0.1, steps=3, losses=torch.zeros(3))
    assert values.tolist() == [0.1, 0.1, 0.1]


@pytest.mark.parametrize(
    ("name", "constants", "expected"),
    [
        ("iteration", {"decay": 1.0}, [0.1, 0.05, 0.1 / 3, 0.025]),
        ("exponential", {"decay": math.log(2)}, [0.1, 0.05, 0.025, 0.0125]),
        ("step", {"drop": 0.1, "every": 3}, [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]),
    ],
    ids=["iteration-decay", "exponential-decay", "step-drop-every"],
)
def test_constants_are_parameters(name, constants, expected):
    values = schedules.preview(name, lr0=0.1, steps=len(expected), **constants)
    assert values.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_batch_gives_each_row_its_own_value_and_ignores_future_losses(name, dtype):
    steps = torch.tensor([1, 4, 2, 10, 7])
    history = torch.tensor(LOSSES, dtype=dtype)
    losses = history.repeat(5, 1)
    for b, step in enumerate(steps.tolist()):  # columns >= step are not valid: fill with junk
        losses[b, step:] = 1e6 if b % 2 else math.nan
    batch = schedules.bind(name, lr0=0.1)(steps, losses)
    assert batch.dtype == dtype and batch.shape == (5,)
    alone = schedules.preview(name, lr0=0.1, steps=10, losses=history)
    assert batch.double().tolist() == pytest.approx(alone[steps - 1].tolist(), rel=1e-6)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ParameterError) as error:
        schedules.get_schedule("cosine")
    for name in schedules.SCHEDULES:
        assert name in str(error.value)


def test_unknown_constant_and_bad_lr0_are_parameter_errors():
    with pytest.raises(ParameterError, match="drop, every"):
        schedules.bind("step", lr0=0.1, decay=0.5)
    for lr0 in (0, -0.1, math.nan, math.inf):
        with pytest.raises(ParameterError, match="lr0"):
            schedules.bind("constant", lr0=lr0)


def test_the_docstring_example_adds_a_schedule_and_removes_it():
    result = doctest.testmod(schedules)
    assert result.attempted > 0 and result.failed == 0
    assert "cosine" not in schedules.SCHEDULES
