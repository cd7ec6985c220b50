"""The precision concept: names, the capability check, "auto" and the bfloat16 forward."""

import pytest
import torch
from torch import nn

from lib.errors import ParameterError
from lib.model import precision


@pytest.mark.parametrize("name", ["float16", "bf16", "FLOAT32", ""])
def test_an_unknown_precision_names_the_allowed_values(name):
    with pytest.raises(ParameterError, match="'float32', 'bfloat16', 'auto'") as error:
        precision.resolve(name, "cpu")
    assert repr(name) in str(error.value)


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_explicit_precisions_are_kept_whatever_the_device_can_do(monkeypatch, name):
    for fast in (False, True):
        monkeypatch.setattr(precision, "bf16_is_fast", lambda device, fast=fast: fast)
        assert precision.resolve(name, "cpu") == name


def test_auto_follows_the_capability_check(monkeypatch):
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: False)
    assert precision.resolve("auto", "cpu") == "float32"
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    assert precision.resolve("auto", "cpu") == "bfloat16"


@pytest.mark.parametrize(
    ("flags", "capability", "fast"),
    [
        ({"avx2", "fma"}, "AVX2", False),
        ({"avx2", "avx512f"}, "AVX512", False),
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", True),
        ({"avx2", "amx_tile", "amx_bf16"}, "AVX512", True),
        (set(), "AMX", True),
    ],
)
def test_the_cpu_check_reads_bf16_instructions(monkeypatch, flags, capability, fast):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert precision.bf16_is_fast("cpu") is fast
    assert precision.resolve("auto", "cpu") == ("bfloat16" if fast else "float32")


def test_the_cuda_check_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.bf16_is_fast("cuda:0") is supported
    assert precision.bf16_is_fast("meta") is False


def test_this_machines_flags_come_from_cpuinfo():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    with open("/proc/cpuinfo") as handle:
        line = next(row for row in handle if row.startswith("flags"))
    assert flags == frozenset(line.split(":", 1)[1].split())


class Recorder(nn.Module):
    """A small CNN that records the autocast state and memory layout of its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 6 * 6, 5))
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"),
                          x.is_contiguous(memory_format=torch.channels_last)))
        return self.net(x)


def test_float32_forward_is_the_model_itself():
    model = Recorder()
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(precision.forward(model, x, precision="float32"), model(x))
    assert model.seen == [(False, False), (False, False)]


def test_bfloat16_forward_runs_under_autocast_channels_last_and_returns_float32():
    model = Recorder()
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    logits = precision.forward(model, x, precision="bfloat16")
    assert model.seen == [(True, True)]
    assert logits.dtype == torch.float32 and logits.shape == (3, 5)
    with torch.no_grad():
        exact = model.net(x)
    # bfloat16 keeps 8 mantissa bits: close to float32, and not identical
    torch.testing.assert_close(logits, exact, atol=0.05, rtol=0.05)
    assert not torch.equal(logits, exact)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), x)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_forward_needs_a_resolved_precision():
    with pytest.raises(ParameterError, match="resolved precision"):
        precision.forward(Recorder(), torch.rand(1, 3, 8, 8), precision="auto")
