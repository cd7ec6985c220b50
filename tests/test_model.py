"""lib.model: the normalising AlexNet, weights from a local file, safe checkpoints, devices."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

from lib import NUM_CLASSES
from lib.errors import CheckpointError, ParameterError
from lib.model.checkpoints import build_model, load_checkpoint, save_checkpoint
from lib.model.network import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_IMAGE_SIZE,
    check_image_size,
    resolve_device,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model().eval()


@pytest.fixture(scope="module")
def checkpoint(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "epoch_01.safetensors"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's ImageNet AlexNet (1000 classes), seeded."""
    torch.manual_seed(1)
    return torchvision.models.alexnet(weights=None).state_dict()


# ------------------------------------------------------------------ the network


def test_min_image_size_is_the_feature_stacks_limit(model: torch.nn.Module) -> None:
    features = model.alexnet.features
    with torch.no_grad():
        assert features(torch.zeros(1, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE)).shape[-1] == 1
        with pytest.raises(RuntimeError):
            features(torch.zeros(1, 3, MIN_IMAGE_SIZE - 1, MIN_IMAGE_SIZE - 1))


@pytest.mark.parametrize("size", [1, 32, MIN_IMAGE_SIZE - 1])
def test_too_small_images_are_a_parameter_error(model: torch.nn.Module, size: int) -> None:
    with pytest.raises(ParameterError, match=f"{size} px is too small.*at least {MIN_IMAGE_SIZE}"):
        check_image_size(size)
    with pytest.raises(ParameterError, match="too small"):
        model(torch.rand(1, 3, size, size))


@pytest.mark.parametrize("size", [MIN_IMAGE_SIZE, 64, 224])
def test_logits_shape_at_supported_sizes(model: torch.nn.Module, size: int) -> None:
    check_image_size(size)
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, NUM_CLASSES)


def test_normalisation_is_the_first_layer(model: torch.nn.Module) -> None:
    images = torch.rand(3, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.alexnet((images - mean) / std))
    buffers = dict(model.named_buffers())
    assert set(buffers) == {"normalize.mean", "normalize.std"}  # buffers: they follow .to()
    assert all(not p.requires_grad for p in buffers.values())


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64)])
def test_wrong_image_layout_is_a_parameter_error(model: torch.nn.Module, shape: tuple) -> None:
    with pytest.raises(ParameterError, match=r"\[N, 3, S, S\]"):
        model(torch.rand(shape))


def test_model_uses_dropout_and_no_batch_norm(model: torch.nn.Module) -> None:
    modules = list(model.modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in modules)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in modules)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(model: torch.nn.Module, checkpoint: Path) -> None:
    loaded = load_checkpoint(checkpoint)
    assert not loaded.training
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert {b.device.type for b in loaded.buffers()} == {"cpu"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_equal_weights_give_identical_files(
    model: torch.nn.Module, checkpoint: Path, tmp_path: Path
) -> None:
    save_checkpoint(model, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == checkpoint.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.safetensors"]  # no temporary left


def test_checkpoint_for_other_class_count(tmp_path: Path) -> None:
    path = tmp_path / "five.safetensors"
    head = {
        "alexnet.classifier.6.weight": torch.zeros(5, 4096),
        "alexnet.classifier.6.bias": torch.zeros(5),
    }
    safetensors.torch.save_file(head, path)  # the head alone: the class count is checked first
    with pytest.raises(CheckpointError, match=r"five\.safetensors.*for 5 classes, expected 7"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="lacks 'normalize.mean'"):
        load_checkpoint(path, num_classes=5)


def test_torch_save_state_dict_is_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "epoch_01.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"epoch_01\.pt: not a safetensors.*zip archive"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, found",
    [
        (b"", "empty"),
        (b"epoch,accuracy\n1,0.5\n", "starts with bytes"),
        (pickle.dumps({"weight": [1.0, 2.0]}), "pickle"),
    ],
    ids=["empty", "csv", "pickled-dict"],
)
def test_non_safetensors_files_are_refused(tmp_path: Path, content: bytes, found: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"not a safetensors checkpoint.*{found}"):
        load_checkpoint(path)


def test_other_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError, match="not a state dict of this AlexNet.*lacks"):
        load_checkpoint(path)


def test_extra_tensor_is_refused(model: torch.nn.Module, checkpoint: Path, tmp_path: Path) -> None:
    state = safetensors.torch.load_file(checkpoint)
    state["alexnet.features.99.weight"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(CheckpointError, match="unexpected tensor 'alexnet.features.99.weight'"):
        load_checkpoint(path)


def test_wrong_tensor_shape_is_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    state = {key: model.state_dict()[key] for key in ("normalize.mean", "normalize.std")}
    state["alexnet.features.0.weight"] = torch.zeros(32, 3, 11, 11)
    path = tmp_path / "narrow.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(CheckpointError, match=r"'alexnet\.features\.0\.weight' has shape"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [4, 9, 200, -1], ids=lambda k: f"keep={k}")
def test_truncated_checkpoint(checkpoint: Path, tmp_path: Path, keep: float) -> None:
    data = checkpoint.read_bytes()
    cut = keep % len(data)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): code execution, made visible as a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (os.fspath(self.marker), "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pth"])
def test_crafted_pickle_never_runs(tmp_path: Path, writer: str, name: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / name
    payload = {"alexnet.features.0.weight": _WritesMarker(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    # the ImageNet-weights path reads pickles, but only with weights_only=True
    with pytest.raises(CheckpointError, match="cannot read as a state dict|unreadable safetensors"):
        build_model(weights_path=path)
    assert not marker.exists()


# ------------------------------------------------------------------ ImageNet weights


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_imagenet_weights_copied_except_head(
    imagenet_state: dict[str, torch.Tensor], tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / f"alexnet-owt-test.{fmt}"
    if fmt == "pth":
        torch.save(imagenet_state, path)
    else:
        safetensors.torch.save_file(imagenet_state, path)
    state = build_model(weights_path=path).alexnet.state_dict()
    for key, value in imagenet_state.items():
        if key.startswith("classifier.6."):  # the new 7-class head keeps its random init
            assert state[key].shape[0] == NUM_CLASSES
            assert key.endswith("bias") or state[key].abs().sum() > 0
        else:
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize(
    "change, match",
    [
        ("drop", r"no tensor 'features\.3\.weight'"),
        ("reshape", r"'features\.3\.weight' has shape \(1, 2\)"),
        ("extra", r"tensors AlexNet does not have, first 'features\.99\.weight'"),
    ],
)
def test_imagenet_weights_that_do_not_fit(
    imagenet_state: dict[str, torch.Tensor], tmp_path: Path, change: str, match: str
) -> None:
    # features.0 alone: the checks stop at the first misfit, so a small file shows each one
    state = {key: imagenet_state[key] for key in ("features.0.weight", "features.0.bias")}
    if change == "reshape":
        state["features.3.weight"] = torch.zeros(1, 2)
    elif change == "extra":
        state["features.99.weight"] = torch.zeros(1)
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: .*" + match):
        build_model(weights_path=path)


def test_own_checkpoint_as_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    state = build_model(weights_path=checkpoint).state_dict()
    for key, value in model.state_dict().items():
        if "classifier.6." not in key:
            assert torch.equal(state[key], value), key


def test_imagenet_weights_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="weights file not found"):
        build_model(weights_path=tmp_path / "alexnet-owt-7be5be79.pth")


def test_imagenet_weights_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        build_model(weights_path=path)


# ------------------------------------------------------------------ devices


def test_cpu_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    "name, gpus, match",
    [
        ("cuda", 0, "CUDA is not available"),
        ("cuda:1", 0, "CUDA is not available"),
        ("cuda:3", 1, r"has 1 CUDA device\(s\)"),
        ("tpu", 1, "unknown device 'tpu'"),
        ("gpu0", 1, "unknown device 'gpu0'"),
        ("meta", 1, "unsupported device 'meta'"),
    ],
)
def test_unavailable_devices(
    monkeypatch: pytest.MonkeyPatch, name: str, gpus: int, match: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ParameterError, match=match):
        resolve_device(name)


def test_available_cuda_index_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_frozen_restores_flags_and_modes_even_on_error():
    from lib.model.network import frozen

    model = build_model(num_classes=7)
    model.train()
    first, *_ = model.parameters()
    first.requires_grad_(False)
    list(model.modules())[-1].eval()
    before = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError), frozen(model) as inside:
        assert inside is model
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("inside the block")
    assert [p.requires_grad for p in model.parameters()] == before
    assert [m.training for m in model.modules()] == modes
