"""The arithmetic precision of model forwards: float32, bfloat16 autocast, or "auto".

``"float32"`` runs the model as it is (in the dtype its weights have: float32, or float64 for
exactness tests). ``"bfloat16"`` runs the forward under ``torch.autocast`` with
``dtype=torch.bfloat16`` and a channels-last input, the layout in which oneDNN's bfloat16
convolutions are fastest, and hands back float32 logits. ``"auto"`` picks bfloat16 only where
the device computes it fast: a CPU with AMX or AVX512-BF16 instructions, or a CUDA device with
bfloat16 support; everywhere else float32. On a CPU without those instructions bfloat16
autocast is emulated and much slower than float32 (AlexNet at 64 px: about 80x on an AVX2-only
CPU), so "auto" must not choose it there.

Low precision changes rounding, never what counts as a result: the attack engine confirms
every crossing in float32 (see :mod:`lib.attack.engine`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from lib.checking import check_choice
from lib.errors import ParameterError

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "auto")
#: CPU flags (``/proc/cpuinfo``) of instructions that compute bfloat16 products natively.
BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")


def check(precision: str) -> str:
    """``precision`` itself if it is one of ``PRECISIONS``; else a ParameterError."""
    return check_choice(precision, PRECISIONS, "precision")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return frozenset()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (faster than float32).

    CPU: AMX or AVX512-BF16 in the CPU flags, or torch's own dispatch capability "AMX"
    (``torch.backends.cpu.get_cpu_capability()``). CUDA: ``torch.cuda.is_bf16_supported()``.
    Other devices: False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        return capability == "AMX" or bool(cpu_flags() & set(BF16_CPU_FLAGS))
    return False


def resolve(precision: str, device: str | torch.device) -> str:
    """The precision actually used on ``device``: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` becomes ``"bfloat16"`` where :func:`bf16_is_fast` says so, else ``"float32"``;
    the other two are returned as given.

    Raises:
        ParameterError: ``precision`` is not one of ``PRECISIONS``.
    """
    check(precision)
    if precision != "auto":
        return precision
    return "bfloat16" if bf16_is_fast(device) else "float32"


def forward(model: nn.Module, x: Tensor, *, precision: str) -> Tensor:
    """The model's logits at ``x`` in the resolved ``precision``, as ``x.dtype``.

    Args:
        model: maps [B, C, H, W] to logits [B, K].
        x: [B, C, H, W] on the model's device; may require grad (the result is differentiable
            with respect to it in both precisions).
        precision: ``"float32"`` (the model as it is) or ``"bfloat16"`` (autocast, channels-last
            input). Resolve ``"auto"`` with :func:`resolve` first.

    Returns:
        logits [B, K] in ``x.dtype`` (float32 from a bfloat16 forward when x is float32).
    """
    if precision == "float32":
        return model(x)
    if precision != "bfloat16":
        raise ParameterError(
            f"forward needs a resolved precision 'float32' or 'bfloat16', got {precision!r}"
        )
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        logits = model(x.contiguous(memory_format=torch.channels_last))
    return logits.to(x.dtype)
