"""The loss an attack follows (lib/attack/losses.py) and the engine's loss option, on a linear
model whose gradients are known in closed form."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from lib.attack import api
from lib.attack.losses import LOSSES, attacked_loss, logit_margin
from lib.errors import ParameterError

CLASSES = 4
SIZE = 3  # images [1, SIZE, SIZE]: 9 values


def linear_model() -> nn.Module:
    """z = W x + b with fixed, distinct weights (float64): every gradient is a row of W."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, CLASSES)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(CLASSES, SIZE * SIZE, dtype=torch.float64))
        model[1].bias.copy_(torch.tensor([2.0, 0.5, 0.0, -1.0], dtype=torch.float64))
    return model


def test_logit_margin_by_hand() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0], [0.0, 4.0, 4.5, 1.0]])
    aim = torch.tensor([1, 2])
    # sample 0: best other 3.0 - own 1.0; sample 1: best other 4.0 - own 4.5
    assert logit_margin(logits, aim).tolist() == [2.0, -0.5]
    assert torch.equal(attacked_loss(logits, aim, kind="logit_margin"), logit_margin(logits, aim))
    expected = torch.logsumexp(logits, 1) - logits.gather(1, aim[:, None]).squeeze(1)
    assert torch.allclose(attacked_loss(logits, aim), expected)


def test_the_margin_gradient_is_a_difference_of_two_weight_rows() -> None:
    model = linear_model()
    x = torch.rand(1, 1, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([3])
    logits = model(x)
    strongest = int(logits[0, :3].argmax())  # the best class other than the target
    (grad,) = torch.autograd.grad(attacked_loss(logits, target, kind="logit_margin").sum(), x)
    weight = model[1].weight.detach()
    assert torch.allclose(grad.flatten(), weight[strongest] - weight[3])
    # cross-entropy's gradient: W^T (softmax - one-hot)
    x.grad = None
    logits = model(x)
    (grad,) = torch.autograd.grad(attacked_loss(logits, target).sum(), x)
    weights = torch.softmax(logits.detach(), 1)[0] - torch.nn.functional.one_hot(target, CLASSES)[0]
    assert torch.allclose(grad.flatten(), weights @ weight)


@pytest.mark.parametrize("loss", LOSSES)
def test_the_engine_steps_along_the_sign_of_the_chosen_loss(loss: str) -> None:
    model = linear_model()
    image = torch.full((1, 1, SIZE, SIZE), 0.5, dtype=torch.float64)
    with torch.no_grad():
        source = int(model(image).argmax())
    target = 3 if source != 3 else 2
    rows = pd.DataFrame({"row_id": [0], "image": [0], "source": [source], "target": [target],
                         "schedule": ["constant"]})
    lr0 = 0.01
    result = api.attack_rows(model, image, rows, targeted=True, lr0=lr0, max_iter=1,
                             certify=False, keep_images=True, loss=loss)
    x = image.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(attacked_loss(model(x), torch.tensor([target]), kind=loss).sum(),
                                  x)
    assert int(result.iterations[0]) == 1 and not bool(result.success[0])
    assert torch.allclose(result.borderline, (image - lr0 * grad.sign()).clamp(0, 1))
    with torch.no_grad():
        first = attacked_loss(model(image), torch.tensor([target]), kind=loss)
    assert torch.allclose(result.loss_trace[0, 0], first[0])


def test_an_unknown_loss_is_named() -> None:
    model = linear_model()
    image = torch.full((1, 1, SIZE, SIZE), 0.5, dtype=torch.float64)
    rows = pd.DataFrame({"row_id": [0], "image": [0], "source": [0], "target": [1],
                         "schedule": ["constant"]})
    with pytest.raises(ParameterError, match="loss must be one of 'cross_entropy'"):
        api.attack_rows(model, image, rows, targeted=True, lr0=0.01, loss="hinge")
    with pytest.raises(ParameterError, match="got 'hinge'"):
        attacked_loss(torch.zeros(1, 2), torch.tensor([0]), kind="hinge")
