"""The classifier's weights in files: a fresh model, ImageNet weights to start from, checkpoints.

Checkpoints are safetensors files: a flat table of tensors behind a JSON header. Reading one
parses that header and copies bytes; nothing in the file is ever executed. ImageNet weights
(torchvision's ``alexnet-owt-*.pth``, a pickled state dict) are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
Nothing here downloads.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from lib import NUM_CLASSES
from lib.errors import CheckpointError, ParameterError, first_line
from lib.io import atomic_path
from lib.model.network import HEAD_PREFIX, ToolClassifier, resolve_device


def build_model(
    *, num_classes: int = NUM_CLASSES, weights_path: str | os.PathLike[str] | None = None
) -> ToolClassifier:
    """A fresh classifier, He-initialised (:func:`~lib.model.network.he_initialise`) from torch's
    global RNG.

    The model is in train mode (dropout on).

    Args:
        num_classes: number of outputs (7 for the Cholec80 tools).
        weights_path: optional local ImageNet AlexNet weights: torchvision's
            ``alexnet-owt-*.pth`` (a pickled state dict, read with ``weights_only=True``) or a
            ``.safetensors`` file with the same keys. Every tensor except the 1000-class last
            layer (``classifier.6``) is copied; the new head keeps its random initialisation.
            Keys may carry an ``alexnet.`` prefix (a checkpoint of this module). Never
            downloaded: the user names a file they already have.

    Raises:
        CheckpointError: the weights file is missing, unreadable, not a state dict of tensors,
            or its tensors do not fit AlexNet (the message names the first mismatching key).
    """
    if num_classes < 2:
        raise ParameterError(f"num_classes must be at least 2, got {num_classes}")
    model = ToolClassifier(num_classes=num_classes)
    if weights_path is not None:
        _load_imagenet_features(model.alexnet, Path(weights_path))
    return model


def _load_imagenet_features(alexnet: nn.Module, path: Path) -> None:
    tensors = _read_weights_file(path)
    if any(key.startswith("alexnet.") for key in tensors):  # a checkpoint of ToolClassifier
        tensors = {
            key.removeprefix("alexnet."): value
            for key, value in tensors.items()
            if key.startswith("alexnet.")
        }
    wanted = {k: v for k, v in alexnet.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    found = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    advice = "pass torchvision's AlexNet ImageNet weights (alexnet-owt-*.pth)"
    extra = [key for key in found if key not in wanted]
    if extra:
        raise CheckpointError(
            f"{path}: weights file has tensors AlexNet does not have, first {extra[0]!r} "
            f"({len(extra)} in all); {advice}"
        )
    for key, target in wanted.items():
        if key not in found:
            raise CheckpointError(
                f"{path}: weights file has no tensor {key!r} (shape {tuple(target.shape)}) that "
                f"AlexNet needs; {advice}"
            )
        if tuple(found[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(found[key].shape)}, AlexNet needs "
                f"{tuple(target.shape)}; {advice}"
            )
    with torch.no_grad():
        for key, target in alexnet.state_dict().items():
            if key in wanted:
                target.copy_(found[key])


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a pickled state dict read with weights_only=True."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: weights file not found; set weights_path to an existing local file "
            "(torchvision's alexnet-owt-*.pth), or to \"\" to train from scratch"
        )
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return read_safetensors(path)
    try:
        with open(path, "rb") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    # the weights-only unpickler fails on foreign bytes with many kinds of error (IndexError,
    # KeyError, UnicodeDecodeError, ...): every one means the file is not a state dict
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, LookupError,
            TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: cannot read as a state dict of tensors ({first_line(error)}); pass "
            "torchvision's alexnet-owt-*.pth or a .safetensors file"
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{path}: holds a {type(state).__name__}, not a state dict (name -> tensor); pass "
            "torchvision's alexnet-owt-*.pth or a .safetensors file"
        )
    return state


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model.state_dict()`` to ``path`` as safetensors, atomically.

    Tensors are copied to the CPU first, so a checkpoint from a GPU loads anywhere. Equal
    weights give byte-identical files.
    """
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    # one metadata entry only: safetensors writes a map of several in arbitrary order, which
    # would make equal weights give different bytes
    metadata = {"format": "pt"}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, tmp, metadata=metadata)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    num_classes: int = NUM_CLASSES,
    map_location: str | torch.device = "cpu",
) -> ToolClassifier:
    """Read a checkpoint written by :func:`save_checkpoint`; returns the model in eval mode.

    Only safetensors files are accepted: reading one never executes code, unlike a pickle.

    Raises:
        CheckpointError: the file is missing, not a safetensors file (e.g. a ``torch.save``
            pickle), truncated, not this model's state dict, or made for another number of
            classes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; name a file written by training")
    if not _is_safetensors(path):
        kind = _describe_non_safetensors(path)
        raise CheckpointError(
            f"{path}: not a safetensors checkpoint ({kind}). Checkpoints are read only as "
            "safetensors, which never runs code; a pickle is refused without being opened. "
            "Use a checkpoint written by lib.model.checkpoints.save_checkpoint "
            "(train/seed_S/epoch_NN.safetensors)"
        )
    device = resolve_device(map_location)
    tensors = read_safetensors(path, device=device)
    head = "alexnet." + HEAD_PREFIX + "weight"
    if head in tensors and tensors[head].ndim == 2 and tensors[head].shape[0] != num_classes:
        raise CheckpointError(
            f"{path}: checkpoint is for {tensors[head].shape[0]} classes, expected {num_classes}; "
            f"load it with num_classes={tensors[head].shape[0]} or use a checkpoint of a "
            f"{num_classes}-class model"
        )
    with torch.device("meta"):  # shapes only: no time spent on a random init that is replaced
        model = ToolClassifier(num_classes=num_classes)
    expected = model.state_dict()
    advice = ("use a checkpoint written by lib.model.checkpoints.save_checkpoint "
              "(train/seed_S/epoch_NN.safetensors)")
    for key, target in expected.items():
        if key not in tensors:
            raise CheckpointError(
                f"{path}: not a state dict of this AlexNet classifier: it lacks {key!r} "
                f"({sum(k not in tensors for k in expected)} of {len(expected)} tensors "
                f"missing); {advice}"
            )
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs "
                f"{tuple(target.shape)}; {advice}"
            )
    extra = [key for key in tensors if key not in expected]
    if extra:
        raise CheckpointError(
            f"{path}: not a state dict of this AlexNet classifier: unexpected tensor "
            f"{extra[0]!r} ({len(extra)} in all); {advice}"
        )
    state = {key: tensors[key].to(target.dtype) for key, target in expected.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def check_checkpoint(path: str | os.PathLike[str], *, num_classes: int = NUM_CLASSES) -> None:
    """Check a checkpoint without reading its tensors: the file exists, is safetensors, its
    header covers the whole file (not truncated) and names this classifier's tensors and shapes.

    The same :class:`CheckpointError` messages as :func:`load_checkpoint`, in a fraction of
    the time (only the header is read), so a stage can check every checkpoint before it starts.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run the training stage (02_train)")
    if not _is_safetensors(path):
        raise CheckpointError(
            f"{path}: not a safetensors checkpoint ({_describe_non_safetensors(path)}); use a "
            "checkpoint written by the training stage (train/seed_S/epoch_NN.safetensors) or "
            "retrain"
        )
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({first_line(error)}); it is probably "
            "truncated or corrupt (e.g. an interrupted copy): copy it again or retrain "
            "(02_train with overwrite True)"
        ) from error
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ToolClassifier(num_classes=num_classes)
                    .state_dict().items()}
    for key, shape in expected.items():
        if shapes.get(key) != shape:
            found = "missing" if key not in shapes else f"shape {shapes[key]}"
            raise CheckpointError(
                f"{path}: not a checkpoint of the {num_classes}-class AlexNet classifier: "
                f"tensor {key!r} is {found}, the model needs {shape}; use a checkpoint written "
                "by the training stage (train/seed_S/epoch_NN.safetensors) or retrain"
            )


def _is_safetensors(path: Path) -> bool:
    """True if the file starts like safetensors: an 8-byte header length, then a JSON '{'."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (no code runs); CheckpointError if unreadable."""
    path = Path(path)
    try:
        return safetensors.torch.load_file(path, device=str(device))
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({first_line(error)}); it is probably "
            "truncated or corrupt (e.g. an interrupted copy): copy it again or retrain"
        ) from error


def _describe_non_safetensors(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty"
    if head[:1] == b"\x80":
        return "it is a Python pickle"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive, as torch.save writes"
    return f"it starts with bytes {head!r}"
