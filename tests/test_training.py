"""lib.train.loop: a tiny run learns, is deterministic, resumes exactly; metrics; bad input.

Every run here is tiny (tens of 64 px images, a few SGD steps), but AlexNet's fully connected
layers make each checkpoint about 230 MB whatever the image size, so the runs are shared by
module-scoped fixtures.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from torch.utils.data import Dataset

from lib import NUM_CLASSES, TOOLS
from lib.data.datasets import load_cholec80
from lib.data.frames import FrameSet
from lib.data.synthetic import generate
from lib.errors import ParameterError, RunFolderError
from lib.model.checkpoints import build_model, load_checkpoint
from lib.run.tables import TABLES, TRAIN_TABLES
from lib.train.batches import augment_batch, class_weights
from lib.train.evaluation import classification_tables, evaluate, predict
from lib.train.loop import fit

SIZE = 64
#: One colour per class, far apart: a simply separable task that AlexNet learns in a few steps.
COLOURS = torch.tensor(
    [
        [0.9, 0.1, 0.1],
        [0.1, 0.9, 0.1],
        [0.1, 0.1, 0.9],
        [0.9, 0.9, 0.1],
        [0.9, 0.1, 0.9],
        [0.1, 0.9, 0.9],
        [0.5, 0.5, 0.5],
    ]
)
#: The tiny run: 8 train images per class in batches of 8 -> 7 SGD steps per epoch. Augmentation
#: and the balanced sampler are on so that every random stream is exercised.
RUN = dict(
    batch_size=8,
    lr=0.01,
    lr_decay=1.0,
    momentum=0.9,
    weight_decay=5e-4,
    augment=True,
    balance="sampler",
    seed=3,
    device="cpu",
    precision="float32",
    progress=False,
)

#: The training tables and their columns, as fit writes them.
TABLE_COLUMNS = {name: tuple(TABLES[name].columns) for name in TRAIN_TABLES}


def colour_frames(per_class: int, *, seed: int, split: str, size: int = SIZE) -> FrameSet:
    """Noisy images whose mean colour names the class, as a FrameSet."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = 0.3 * torch.rand(len(labels), 3, size, size, generator=generator) - 0.15
    images = (COLOURS[labels][:, :, None, None] + noise).clamp(0, 1).mul(255).round()
    index = pd.DataFrame(
        {
            "image_id": [f"{split}-{i:03d}" for i in range(len(labels))],
            "split": split,
            "source": "colours",
            "frame": -1,
            "label": labels.numpy(),
        }
    )
    return FrameSet(images.to(torch.uint8), labels, index)


class PlainFrames(Dataset):
    """The minimal interface fit needs: items and ``.labels``, no ``index``."""

    def __init__(self, frames: FrameSet) -> None:
        self.frames = frames
        self.labels = frames.labels

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.frames[i]


@pytest.fixture(scope="module")
def train_set() -> FrameSet:
    return colour_frames(8, seed=0, split="train")


@pytest.fixture(scope="module")
def test_set() -> FrameSet:
    return colour_frames(4, seed=1, split="test")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, train_set, test_set) -> tuple[Path, pd.DataFrame]:
    """Two epochs, uninterrupted."""
    out_dir = tmp_path_factory.mktemp("full") / "train"
    return out_dir, fit(train_set, test_set, out_dir=out_dir, epochs=2, **RUN)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, train_set, test_set) -> tuple[Path, dict[str, tuple]]:
    """A one-epoch run, killed during epoch 2, then continued to two epochs.

    The kill is simulated by what it can leave behind: a checkpoint of epoch 2 (here garbage)
    and epoch-2 rows in tables written before metrics.csv, which marks an epoch as finished.
    Returns the folder and the size and time of each file after the one-epoch run.
    """
    out_dir = tmp_path_factory.mktemp("resumed") / "train"
    fit(train_set, test_set, out_dir=out_dir, epochs=1, **RUN)
    after_one = stats(out_dir)
    (out_dir / "epoch_02.safetensors").write_bytes(b"not finished")
    for name in ("losses", "predictions"):
        table = pd.read_csv(out_dir / f"{name}.csv")
        pd.concat([table, table.assign(epoch=2)]).to_csv(out_dir / f"{name}.csv", index=False)
    fit(train_set, test_set, out_dir=out_dir, epochs=2, **RUN)
    return out_dir, after_one


def same_files(first: Path, second: Path) -> bool:
    """Both folders hold the same file names with the same bytes."""
    names = sorted(path.name for path in first.iterdir())
    if names != sorted(path.name for path in second.iterdir()):
        return False
    return all(filecmp.cmp(first / name, second / name, shallow=False) for name in names)


def stats(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file in ``folder``, by name."""
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


# ------------------------------------------------------------------ a tiny run


def test_tiny_run_learns(full_run) -> None:
    _, metrics = full_run
    assert metrics["epoch"].tolist() == [1, 2]
    last = metrics.iloc[-1]
    assert last["accuracy"] >= 0.5  # chance: 1/7
    assert last["macro_f1"] >= 0.4
    assert last["test_loss"] < np.log(NUM_CLASSES)


def test_run_folder_files(full_run, test_set) -> None:
    out_dir, metrics = full_run
    names = sorted(path.name for path in out_dir.iterdir())
    assert names == sorted(
        ["epoch_01.safetensors", "epoch_02.safetensors", "optimizer_02.safetensors"]
        + [f"{name}.csv" for name in TABLE_COLUMNS]
        + ["train_params.json"]
    )
    tables = {name: pd.read_csv(out_dir / f"{name}.csv") for name in TABLE_COLUMNS}
    for name, columns in TABLE_COLUMNS.items():
        assert tuple(tables[name].columns) == columns, name
    pd.testing.assert_frame_equal(tables["metrics"], metrics, check_dtype=False)
    assert len(tables["per_class"]) == 2 * NUM_CLASSES
    assert tables["per_class"]["tool"].tolist() == list(TOOLS) * 2
    assert len(tables["confusion"]) == 2 * NUM_CLASSES**2
    assert (tables["confusion"].groupby("epoch")["count"].sum() == len(test_set)).all()
    predictions = tables["predictions"]
    assert len(predictions) == 2 * len(test_set)  # the whole test split, every epoch
    assert predictions["image_id"].tolist() == test_set.index["image_id"].tolist() * 2
    assert predictions["label"].tolist() == test_set.labels.tolist() * 2
    # 8 x 7 images in batches of 8: 7 steps per epoch, numbered across epochs
    assert tables["losses"]["step"].tolist() == list(range(1, 15))
    assert tables["losses"]["epoch"].tolist() == [1] * 7 + [2] * 7
    for epoch, group in tables["predictions"].groupby("epoch"):
        row = tables["metrics"].set_index("epoch").loc[epoch]
        assert row["accuracy"] == pytest.approx((group["label"] == group["predicted"]).mean())


def test_checkpoint_is_the_evaluated_model(full_run, test_set) -> None:
    out_dir, _ = full_run
    model = load_checkpoint(out_dir / "epoch_02.safetensors")
    predictions = pd.read_csv(out_dir / "predictions.csv")
    expected = predictions[predictions["epoch"] == 2]["predicted"].to_numpy()
    assert predict(model, test_set, batch_size=5).numpy().tolist() == expected.tolist()


# ------------------------------------------------------------------ determinism and resume


def test_same_seed_gives_identical_checkpoints(full_run, resumed_run) -> None:
    full_dir, _ = full_run
    resumed_dir, after_one = resumed_run
    name = "epoch_01.safetensors"
    assert stats(resumed_dir)[name] == after_one[name]  # as the one-epoch run left it
    # two separate runs with the same seed: the same weights after epoch 1, to the bit
    assert filecmp.cmp(resumed_dir / name, full_dir / name, shallow=False)


@pytest.mark.slow  # bfloat16 is emulated on CPUs without AMX / AVX512-BF16: minutes here
def test_bfloat16_training_learns_and_repeats(tmp_path, train_set, test_set) -> None:
    """Training forwards under bfloat16 autocast: the tiny run still learns, the weights and
    checkpoints stay float32, and a second run with the same seed gives the same epoch-1
    checkpoint to the bit."""
    bf16 = {**RUN, "precision": "bfloat16"}
    metrics = fit(train_set, test_set, out_dir=tmp_path / "a", epochs=2, **bf16)
    last = metrics.iloc[-1]
    # well above chance (1/7): the float32 run reaches 0.5 in these 14 steps, bfloat16's
    # rounding costs a little of that on so short a run
    assert last["accuracy"] >= 2 / NUM_CLASSES
    assert last["test_loss"] < np.log(NUM_CLASSES)
    tensors = safetensors.torch.load_file(tmp_path / "a" / "epoch_02.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}
    assert json.loads((tmp_path / "a" / "train_params.json").read_text())["precision"] == (
        "bfloat16")
    fit(train_set, test_set, out_dir=tmp_path / "b", epochs=1, **bf16)
    name = "epoch_01.safetensors"
    assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False)
    float32_dir = tmp_path / "float32"
    fit(train_set, test_set, out_dir=float32_dir, epochs=1, **RUN)
    assert not filecmp.cmp(tmp_path / "a" / name, float32_dir / name, shallow=False)


def test_resume_equals_uninterrupted_run(full_run, resumed_run) -> None:
    full_dir, _ = full_run
    resumed_dir, after_one = resumed_run
    assert "optimizer_01.safetensors" in after_one  # what the resumed run started from
    # every file: both checkpoints, the optimizer state and all tables (no duplicated rows)
    assert same_files(resumed_dir, full_dir)


def test_rerun_of_a_finished_run_changes_nothing(full_run, train_set, test_set) -> None:
    out_dir, metrics = full_run
    before = stats(out_dir)
    again = fit(train_set, test_set, out_dir=out_dir, epochs=2, **RUN)
    pd.testing.assert_frame_equal(again, metrics)
    first = fit(train_set, test_set, out_dir=out_dir, epochs=1, **RUN)
    pd.testing.assert_frame_equal(first, metrics.iloc[:1])
    assert stats(out_dir) == before


# ------------------------------------------------------------------ run folder errors


@pytest.mark.parametrize(
    "change",
    [
        {"lr": 0.02},
        {"seed": 4},
        {"batch_size": 7},
        {"augment": False},
        {"balance": "weights", "momentum": 0.5},
        {"weight_decay": 0.0},
        {"precision": "bfloat16"},
    ],
    ids=lambda change: ",".join(change),
)
def test_other_parameters_are_refused(full_run, train_set, test_set, change: dict) -> None:
    out_dir, _ = full_run
    before = stats(out_dir)
    with pytest.raises(RunFolderError, match="other parameters") as raised:
        fit(train_set, test_set, out_dir=out_dir, epochs=3, **{**RUN, **change})
    message = str(raised.value)
    assert str(out_dir) in message and "new run folder" in message
    for name in change:
        assert f"{name}: folder" in message
    assert stats(out_dir) == before


def test_other_training_data_is_refused(full_run, train_set, test_set) -> None:
    out_dir, _ = full_run
    with pytest.raises(RunFolderError, match="train_data: folder '56 images"):
        fit(train_set.subset(range(50)), test_set, out_dir=out_dir, epochs=3, **RUN)


def test_checkpoints_without_parameters_are_refused(tmp_path, train_set, test_set) -> None:
    (tmp_path / "epoch_01.safetensors").write_bytes(b"")
    with pytest.raises(RunFolderError, match="no train_params.json"):
        fit(train_set, test_set, out_dir=tmp_path, epochs=1, **RUN)


# ------------------------------------------------------------------ bad input


def test_too_small_images(tmp_path) -> None:
    small = colour_frames(1, seed=0, split="train", size=32)
    with pytest.raises(ParameterError, match="32 px is too small for AlexNet"):
        fit(small, small, out_dir=tmp_path / "train", epochs=1, **RUN)
    assert not (tmp_path / "train").exists()


def test_unavailable_device(tmp_path, train_set, test_set, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParameterError, match="CUDA is not available"):
        fit(train_set, test_set, out_dir=tmp_path, epochs=1, **{**RUN, "device": "cuda"})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"epochs": 0}, "epochs must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"lr": -0.1}, "lr must be a finite number > 0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
        ({"weight_decay": -1}, "weight_decay must be"),
        ({"augment": "yes"}, "augment must be True or False"),
        ({"balance": "oversample"}, "balance must be one of"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"seed": 1.5}, "seed must be an int >= 0"),
    ],
    ids=lambda value: ",".join(value) if isinstance(value, dict) else None,
)
def test_bad_hyperparameters(tmp_path, train_set, test_set, change: dict, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        fit(train_set, test_set, out_dir=tmp_path, **{**RUN, "epochs": 1, **change})
    assert not any(tmp_path.iterdir())


def test_dataset_without_labels(tmp_path, test_set) -> None:
    class NoLabels(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int):
            return torch.zeros(3, SIZE, SIZE), 0

    with pytest.raises(ParameterError, match=r"must expose \.labels"):
        fit(NoLabels(), test_set, out_dir=tmp_path, epochs=1, **RUN)


# ------------------------------------------------------------------ evaluation and metrics


def test_predictions_without_index_use_positions(test_set) -> None:
    torch.manual_seed(0)
    model = build_model()
    tables = evaluate(model, PlainFrames(test_set), batch_size=16, device="cpu", epoch=5)
    assert tables["predictions"]["image_id"].tolist() == list(range(len(test_set)))
    assert (tables["predictions"]["epoch"] == 5).all()
    assert model.training  # evaluation switched to eval() and back


# Hand-made: 10 test images; classes 4-6 never true, 5-6 never predicted.
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
Y_PRED = [0, 0, 1, 1, 1, 2, 2, 2, 0, 4]
F1 = [2 / 3, 4 / 5, 6 / 7, 0, 0, 0, 0]


def test_classification_tables_known_answer() -> None:
    tables = classification_tables(Y_TRUE, Y_PRED, epoch=3)
    metrics = tables["metrics"].iloc[0]
    assert metrics["epoch"] == 3
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["macro_f1"] == pytest.approx(sum(F1) / 7)
    per_class = tables["per_class"]
    assert per_class["tool"].tolist() == list(TOOLS)
    assert per_class["label"].tolist() == list(range(7))
    assert per_class["precision"].tolist() == pytest.approx([2 / 3, 2 / 3, 1, 0, 0, 0, 0])
    assert per_class["recall"].tolist() == pytest.approx([2 / 3, 1, 3 / 4, 0, 0, 0, 0])
    assert per_class["f1"].tolist() == pytest.approx(F1)
    assert per_class["support"].tolist() == [3, 2, 4, 1, 0, 0, 0]
    confusion = tables["confusion"]
    assert len(confusion) == 49 and confusion["count"].sum() == 10
    cells = {(t, p): c for t, p, c in confusion[["true", "predicted", "count"]].itertuples(False)}
    expected = {(0, 0): 2, (0, 1): 1, (1, 1): 2, (2, 2): 3, (2, 0): 1, (3, 4): 1}
    assert {cell: count for cell, count in cells.items() if count} == expected


@pytest.mark.parametrize(
    "y_pred, accuracy, macro_f1",
    [
        (list(range(7)), 1.0, 1.0),
        ([1, 2, 3, 4, 5, 6, 0], 0.0, 0.0),
        ([0, 0, 0, 0, 0, 0, 0], 1 / 7, (2 / 8) / 7),
    ],
    ids=["perfect", "all-wrong", "constant"],
)
def test_classification_tables_extremes(y_pred, accuracy: float, macro_f1: float) -> None:
    metrics = classification_tables(list(range(7)), y_pred, epoch=1)["metrics"].iloc[0]
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert metrics["macro_f1"] == pytest.approx(macro_f1)


def test_class_weights_are_inverse_frequency() -> None:
    weights = class_weights(torch.tensor([0, 0, 0, 1, 2, 2]))
    assert weights.tolist() == pytest.approx([6 / 21, 6 / 7, 6 / 14, 0, 0, 0, 0])
    assert class_weights(torch.arange(7).repeat(3)).tolist() == pytest.approx([1.0] * 7)


# ------------------------------------------------------------------ augmentation


def test_augmentation_is_seeded_and_in_range(train_set) -> None:
    images = train_set.float_images()[:16]

    def views(seed: int) -> torch.Tensor:
        return augment_batch(images, generator=torch.Generator().manual_seed(seed))

    first = views(0)
    assert first.shape == images.shape and first.dtype == images.dtype
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, views(0))
    assert not torch.equal(first, views(1))
    assert not torch.equal(first, images)
    # label-preserving on the colour task: each view keeps its class's mean colour
    mean_colours = first.mean(dim=(2, 3))
    nearest = torch.cdist(mean_colours, COLOURS).argmin(dim=1)
    assert torch.equal(nearest, train_set.labels[:16])


# ------------------------------------------------------------------ the synthetic generator


@pytest.fixture(scope="module")
def synthetic_splits(tmp_path_factory) -> dict[str, FrameSet]:
    root = tmp_path_factory.mktemp("synthetic")
    generate(
        root / "dataset", n_videos=2, seconds_per_video=30, width=64, height=48, seed=0,
        workers=1, progress=False,
    )  # fmt: skip
    return load_cholec80(
        root / "dataset", image_size=SIZE, cache_dir=root / "cache", train_videos="1",
        test_videos="41", workers=1, progress=False,
    )  # fmt: skip


def test_fit_on_synthetic_frames(tmp_path, synthetic_splits) -> None:
    train, test = synthetic_splits["train"], synthetic_splits["test"]
    metrics = fit(train, test, out_dir=tmp_path, epochs=1, **{**RUN, "balance": "weights"})
    assert metrics["epoch"].tolist() == [1]
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert predictions["image_id"].tolist() == test.index["image_id"].tolist()
    assert predictions["image_id"].str.match(r"video41-f\d+$").all()
    params = json.loads((tmp_path / "train_params.json").read_text())
    assert params["image_size"] == SIZE and params["balance"] == "weights"
