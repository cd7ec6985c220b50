"""The certified early stop in the engine: every outcome equals the full loop's.

Jobs mix all five schedules at an lr0 where exponential and step decay fail on many rows, so
the stop finishes rows early; each job runs with the stop and without it (the paper's loop to
the end), and every row's ``success`` and ``iterations`` must be equal.
"""

import math

import pytest
import torch
from torch import nn

from lib.attack import api, bounds, schedules, step_bounds, stop
from lib.attack.results import AttackResult, AttackRow
from lib.errors import ParameterError

NUM_CLASSES = 7
N_IMAGES = 24
MAX_ITER = 40
LR0 = {"targeted": 0.01, "untargeted": 0.004}
SCHEDULE_NAMES = list(schedules.SCHEDULES)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: 2 threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, NUM_CLASSES),
    ).to(dtype).eval()


def job(mode: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, list[AttackRow]]:
    """Every (image, target, schedule), images interleaved so that batches mix schedules."""
    model = small_cnn(dtype)
    images = torch.rand(N_IMAGES, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    images = images.to(dtype)
    with torch.no_grad():
        sources = model(images).argmax(1).tolist()
    rows = []
    for k, source in enumerate(sources):
        targets = [(source + 1 + k % 3) % NUM_CLASSES] if mode == "targeted" else [-1]
        for target in targets:
            for name in SCHEDULE_NAMES:
                rows.append(AttackRow(len(rows), k, source, target, name))
    return model, images, rows


def both(model, images, rows, *, mode, batch_size, precision="float32", keep_images=True):
    options = dict(targeted=mode == "targeted", lr0=LR0[mode], max_iter=MAX_ITER,
                   batch_size=batch_size, precision=precision, keep_images=keep_images)
    full = api.attack_rows(model, images, rows, certify=False, **options)
    stopped = api.attack_rows(model, images, rows, certify=True, **options)
    return full, stopped


def assert_same_outcomes(full: AttackResult, stopped: AttackResult) -> torch.Tensor:
    """Equal success, iterations and status for every row; returns the certified rows."""
    assert torch.equal(stopped.row_id, full.row_id)
    assert torch.equal(stopped.success, full.success)
    assert torch.equal(stopped.iterations, full.iterations)
    assert stopped.status == full.status
    certified = stopped.certified_at >= 0
    assert (full.certified_at == -1).all() and (full.certify_checks == 0).all()
    return certified


@pytest.mark.parametrize("batch_size", [5, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("mode", ["targeted", "untargeted"])
def test_the_stop_changes_no_outcome(mode, dtype, batch_size):
    model, images, rows = job(mode, dtype)
    full, stopped = both(model, images, rows, mode=mode, batch_size=batch_size)
    certified = assert_same_outcomes(full, stopped)
    names = [rows[k].schedule for k in full.row_id.tolist()]
    by_schedule = {name: sum(c for c, n in zip(certified.tolist(), names, strict=True)
                             if n == name) for name in SCHEDULE_NAMES}
    assert by_schedule["exponential"] >= 3 and by_schedule["step"] >= 3, by_schedule
    assert by_schedule["loss-adaptive"] == 0  # no bound of its remaining steps
    assert not stopped.success[certified].any()
    assert (stopped.iterations[certified] == MAX_ITER).all()
    at = stopped.certified_at[certified]
    assert ((at % stop.CHECK_EVERY == 0) & (at > 0) & (at < MAX_ITER)).all()
    # every row not stopped ends where the full loop's does (up to the rounding of the model's
    # sums, which depends on the batch it shares)
    others = ~certified
    for name in ("l1", "l2", "linf", "target_prob", "borderline", "refined_l1"):
        torch.testing.assert_close(getattr(stopped, name)[others], getattr(full, name)[others],
                                   msg=name)
    saved = int((full.iterations - stopped.certified_at).clamp(min=0)[certified].sum())
    assert saved >= 0.2 * int((full.iterations + 1).sum())  # a fifth of the passes or more


@pytest.mark.parametrize("mode", ["targeted", "untargeted"])
def test_a_certified_row_reports_its_iterate_and_the_full_loops_steps(mode):
    model, images, rows = job(mode, torch.float64)
    full, stopped = both(model, images, rows, mode=mode, batch_size=16)
    certified = (stopped.certified_at >= 0).nonzero().flatten()
    assert len(certified) >= 6
    for k in certified.tolist():
        at = stopped.certified_at[k].item()
        row = rows[stopped.row_id[k].item()]
        remaining = step_bounds.bind_remaining(row.schedule, lr0=LR0[mode], max_iter=MAX_ITER)
        radius = bounds.reachable_radius(remaining(torch.tensor([at + 1]), None),
                                         dtype=torch.float64).item()
        # the full loop's last image lies within R_k of the reported iterate x_k
        moved = (full.borderline[k] - stopped.borderline[k]).abs().max().item()
        assert moved <= radius
        # the lr trace is the full loop's (these schedules do not read the loss) ...
        assert torch.equal(stopped.lr_trace[k], full.lr_trace[k])
        assert stopped.mean_lr[k] == full.mean_lr[k]
        # ... the loss trace ends at x_k
        torch.testing.assert_close(stopped.loss_trace[k, :at], full.loss_trace[k, :at])
        assert stopped.loss_trace[k, at:].isnan().all()
        with torch.no_grad():
            logits = model(stopped.borderline[k : k + 1])
        assert stopped.final_class[k].item() == logits.argmax(1).item()
        assert stopped.l1[k] == (stopped.borderline[k] - images[row.image]).abs().mean()
    assert (stopped.certify_checks[certified] >= 1).all()
    checked = stopped.certify_checks > 0
    assert int(stopped.certify_checks.sum()) >= len(certified) and checked.sum() >= len(certified)


def test_the_stop_in_bfloat16_changes_no_outcome():
    model, images, rows = job("targeted", torch.float32)
    rows = rows[: 8 * len(SCHEDULE_NAMES)]
    full, stopped = both(model, images, rows, mode="targeted", batch_size=16,
                         precision="bfloat16")
    certified = assert_same_outcomes(full, stopped)
    assert certified.sum() >= 3
    with torch.no_grad():  # certified rows report float32 classes
        logits = model(stopped.borderline[certified])
    assert torch.equal(stopped.final_class[certified], logits.argmax(1))


def test_a_frame_holds_certified_at_as_an_optional_integer():
    model, images, rows = job("targeted", torch.float64)
    result = api.attack_rows(model, images, rows[:20], targeted=True, lr0=LR0["targeted"],
                             max_iter=MAX_ITER)
    frame = result.to_frame()
    assert str(frame["certified_at"].dtype) == "Int64"
    stopped = result.certified_at >= 0
    assert stopped.any() and (~stopped).any()
    assert frame["certified_at"].isna().tolist() == (~stopped).tolist()
    assert frame["certified_at"].dropna().tolist() == result.certified_at[stopped].tolist()


class Scaled(nn.Module):
    """A layer the interval bounds do not know."""

    def forward(self, x):
        return 2 * x


def test_an_unsupported_layer_is_named_unless_the_stop_is_off():
    model = nn.Sequential(nn.Flatten(), Scaled(), nn.Linear(3 * 12 * 12, NUM_CLASSES)).double()
    images = torch.rand(4, 3, 12, 12, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    options = dict(targeted=True, targets=(labels + 1) % NUM_CLASSES, lr0=0.01, max_iter=5)
    with pytest.raises(ParameterError, match=r"layer '1' .*Scaled.*certify=False"):
        api.attack(model, images, labels, schedule="step", **options)
    result = api.attack(model, images, labels, schedule="step", certify=False, **options)
    assert (result.certified_at == -1).all()
    # a schedule without a step bound never needs the bounds
    adaptive = api.attack(model, images, labels, schedule="loss-adaptive", **options)
    assert (adaptive.certify_checks == 0).all()


def test_checks_wait_for_a_small_radius_and_every_eighth_update():
    model = small_cnn(torch.float64)
    rates = [schedules.bind(name, lr0=0.01) for name in SCHEDULE_NAMES]
    certified_stop = stop.prepare_stop(model, SCHEDULE_NAMES, SCHEDULE_NAMES, rates=rates,
                                       lr0=0.01, max_iter=100, constants={}, targeted=True)
    steps = torch.arange(0, 101).repeat(len(SCHEDULE_NAMES))
    schedule = torch.arange(len(SCHEDULE_NAMES)).repeat_interleave(101)
    losses = torch.ones(len(steps), 100, dtype=torch.float64)
    due, radius = certified_stop.due(steps, losses, schedule, torch.ones_like(steps).bool())
    chosen = {name: steps[due & (schedule == k)].tolist()
              for k, name in enumerate(SCHEDULE_NAMES)}
    # R_k, twice the remaining steps' sum (float rounding), is 0.0508 e^{-k/2} (exponential)
    # and 0.04 2^{-k} (step): at most 1e-5 from update 18 and 12 on; checks at multiples of 8
    assert chosen["exponential"] == list(range(24, 100, 8))
    assert chosen["step"] == list(range(16, 100, 8))
    assert chosen["constant"] == chosen["iteration"] == chosen["loss-adaptive"] == []
    assert math.isinf(radius[schedule == SCHEDULE_NAMES.index("loss-adaptive")][16].item())
