"""The dataset interface: counts against the generator's ground truth, the split, the frame
cache, ImageFolder trees, the run folder's data files, and the data chapter's tables."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lib import TOOLS
from lib.data import cache as frame_cache
from lib.data import cholec80, datasets, scene, synthetic
from lib.data.cache import FrameCacheError, MappedFrames, cache_folder
from lib.data.counts import (
    PUBLISHED_COUNTS,
    PUBLISHED_TOOLS_PER_FRAME,
    PUBLISHED_TOTALS,
    class_counts,
    compare_with_published,
    tools_per_frame,
)
from lib.data.frames import INDEX_COLUMNS, FrameSet
from lib.errors import DatasetError, ParameterError, RunFolderError
from lib.run import data_stage

SECONDS = 8
SEED = 3  # every video has single-tool frames (4, 3, 5 and 3)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """Videos 1, 2 (train) and 41, 42 (test) of 8 s at 64 x 48."""
    return synthetic.generate(
        tmp_path_factory.mktemp("synthetic") / "cholec80",
        n_videos=4,
        seconds_per_video=SECONDS,
        width=64,
        height=48,
        seed=SEED,
        workers=1,
        progress=False,
    )


def ground_truth(video_ids) -> tuple[np.ndarray, np.ndarray]:
    """(single-tool frames per class, tools per annotated frame) from the generator's plan."""
    per_class = np.zeros(len(TOOLS), dtype=int)
    present = []
    for video_id in video_ids:
        flags = scene.plan_annotations(video_id, seconds=SECONDS, seed=SEED)[list(TOOLS)]
        flags = flags.to_numpy()
        per_class += flags[flags.sum(axis=1) == 1].sum(axis=0)
        present.append(flags.sum(axis=1))
    return per_class, np.concatenate(present)


def load(root, cache_dir, **options):
    options = {"image_size": 16, "workers": 1, "progress": False, **options}
    return datasets.load_cholec80(root, cache_dir=cache_dir, **options)


def test_counts_equal_the_generators_ground_truth(synthetic_root, tmp_path):
    splits = load(synthetic_root, tmp_path / "cache")
    counts = class_counts(splits)
    assert list(counts.columns) == ["split", "tool", "frames"]
    assert counts["tool"].tolist() == list(TOOLS) * 2
    for split, ids in (("train", [1, 2]), ("test", [41, 42])):
        expected, _ = ground_truth(ids)
        assert counts[counts["split"] == split]["frames"].tolist() == expected.tolist()
        frame_set = splits[split]
        assert len(frame_set) == expected.sum() > 0
        assert np.bincount(frame_set.labels.numpy(), minlength=7).tolist() == expected.tolist()
        assert set(frame_set.index["split"]) == {split}
        assert frame_set.images.shape[1:] == (3, 16, 16)


def test_index_rows_name_video_and_frame(synthetic_root, tmp_path):
    train = load(synthetic_root, tmp_path / "cache")["train"]
    table = scene.plan_annotations(1, seconds=SECONDS, seed=SEED)
    single = cholec80.single_tool_frames(table)
    rows = train.index[train.index["source"] == "video01"]
    assert rows["frame"].tolist() == single["frame"].tolist()
    assert rows["label"].tolist() == single["label"].tolist()
    assert rows["image_id"].tolist() == [f"video01-f{f:06d}" for f in single["frame"]]
    assert (rows["frame"] % 25 == 0).all()


def test_tools_per_frame(synthetic_root):
    shares = tools_per_frame(synthetic_root)
    for split, ids in (("train", [1, 2]), ("test", [41, 42]), ("all", [1, 2, 41, 42])):
        _, present = ground_truth(ids)
        rows = shares[shares["split"] == split].set_index("tools")
        assert rows["frames"].tolist() == [
            int((present == 0).sum()),
            int((present == 1).sum()),
            int((present >= 2).sum()),
        ]
        assert rows["share"].sum() == pytest.approx(1.0)


def test_split_by_video(synthetic_root, tmp_path):
    splits = load(synthetic_root, tmp_path / "cache", train_videos="1", test_videos=[2, 41])
    assert splits["train"].index["source"].unique().tolist() == ["video01"]
    assert splits["test"].index["source"].unique().tolist() == ["video02", "video41"]
    assert splits["train"].meta["dataset"]["train_videos"] == [1]
    assert splits["test"].meta["dataset"]["test_videos"] == [2, 41]


def test_split_errors(synthetic_root, tmp_path):
    with pytest.raises(ParameterError, match=r"\[2\]"):
        load(synthetic_root, tmp_path / "c", train_videos="1-2", test_videos="2,41")
    with pytest.raises(DatasetError, match="none of the test videos"):
        load(synthetic_root, tmp_path / "c", test_videos="60-80")


@pytest.mark.parametrize(
    ("spec", "ids"),
    [
        ("1-40", list(range(1, 41))),
        ("1-6,9", [1, 2, 3, 4, 5, 6, 9]),
        (" 41 - 43 ", [41, 42, 43]),
        ("5", [5]),
        ([3, 1, 3], [1, 3]),
        (7, [7]),
    ],
)
def test_parse_video_ids(spec, ids):
    assert datasets.parse_video_ids(spec) == ids


@pytest.mark.parametrize("spec", ["", "1-", "a-b", "5-3", "0-4", "1;2"])
def test_parse_video_ids_rejects(spec):
    with pytest.raises(ParameterError, match="video selection"):
        datasets.parse_video_ids(spec)


def test_cache_is_reused(synthetic_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load(synthetic_root, cache, workers=2)  # decoded in two processes
    assert first["train"].meta["decoded_videos"] == ["video01", "video02", "video41", "video42"]
    folder = cache_folder(synthetic_root, cache_dir=cache, image_size=16)
    assert sorted(p.name for p in folder.iterdir()) == [
        f"video{n:02d}.{suffix}" for n in (1, 2, 41, 42) for suffix in ("json", "npy")
    ]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(frame_cache, "decode_into_cache", no_decoding)
    second = load(synthetic_root, cache)
    assert second["train"].meta["decoded_videos"] == []
    for split in datasets.SPLITS:
        assert torch.equal(first[split].images[:], second[split].images[:])
        pd.testing.assert_frame_equal(first[split].index, second[split].index)


def test_changed_video_is_decoded_again(synthetic_root, tmp_path):
    cache = tmp_path / "cache"
    load(synthetic_root, cache)
    video = synthetic_root / "videos" / "video41.mp4"
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        again = load(synthetic_root, cache)
    finally:
        os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert again["test"].meta["decoded_videos"] == ["video41"]
    other_size = load(synthetic_root, cache, image_size=8)  # one cache per image size
    assert len(other_size["test"].meta["decoded_videos"]) == 4
    assert other_size["test"].image_size == 8


def test_frame_set_interface(synthetic_root, tmp_path):
    train = load(synthetic_root, tmp_path / "cache")["train"]
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert torch.equal(image, train.images[0].float() / 255)
    assert label == int(train.labels[0]) and isinstance(label, int)
    hooks = train.subset(train.labels == TOOLS.index("Hook"))
    assert len(hooks) == int((train.labels == 2).sum()) and set(hooks.labels.tolist()) <= {2}
    picked = train.subset([2, 0])
    assert picked.index["image_id"].tolist() == train.index["image_id"].iloc[[2, 0]].tolist()
    assert torch.equal(picked.images[1], train.images[0])
    assert train.float_images().shape == (len(train), 3, 16, 16)
    assert torch.equal(train.images[torch.tensor([2, 0])], train.images[:][[2, 0]])
    assert torch.equal(train.images[torch.tensor(2)], train.images[:][2])
    assert torch.equal(train.images[train.labels == 2], train.images[:][train.labels == 2])


# --------------------------------------------------------------------------------------------
# The memory-mapped frame cache


def reference_split(root: Path, video_ids, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded in memory, video by video, with no cache: what the reader must give back."""
    images, labels = [], []
    for record in cholec80.find_videos(root):
        if record.video_id in video_ids:
            images.append(cholec80.load_video_frames(record, image_size=image_size)[1])
            table = cholec80.read_tool_annotations(record.annotation_path)
            labels.append(cholec80.single_tool_frames(table)["label"].to_numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_mapped_split_equals_decoding_in_memory(synthetic_root, tmp_path):
    splits = load(synthetic_root, tmp_path / "cache")
    data_stage.write_run_data(tmp_path / "run", splits)
    for split, ids in (("train", {1, 2}), ("test", {41, 42})):
        images, labels = reference_split(synthetic_root, ids, 16)
        rebuilt = data_stage.load_run_split(tmp_path / "run", split)
        assert isinstance(rebuilt.images.sources[0], MappedFrames)
        assert np.array_equal(rebuilt.images.numpy(), images)
        assert np.array_equal(rebuilt.labels.numpy(), labels)
        for i in (0, len(labels) - 1):
            image, label = rebuilt[i]
            assert torch.equal(image, torch.from_numpy(images[i]).float() / 255)
            assert label == labels[i]


def test_mapped_frames_pickle_as_their_path(synthetic_root, tmp_path):
    import pickle

    train = load(synthetic_root, tmp_path / "cache")["train"]
    train.images[:]  # maps the files
    again = pickle.loads(pickle.dumps(train))
    assert torch.equal(again.images[:], train.images[:])


def test_old_npz_cache_is_rebuilt_with_a_message(synthetic_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load(synthetic_root, cache)
    folder = cache_folder(synthetic_root, cache_dir=cache, image_size=16)
    for n in (1, 41):  # the earlier format: one .npz per video, no .npy, no .json
        (folder / f"video{n:02d}.npy").unlink()
        (folder / f"video{n:02d}.json").unlink()
        np.savez(folder / f"video{n:02d}.npz", frames=np.arange(3),
                 images=np.zeros((3, 3, 16, 16), np.uint8))
    data_stage.write_run_data(tmp_path / "run", first)
    with pytest.raises(RunFolderError, match=r"old \.npz format.*Run the data stage"):
        data_stage.load_run_split(tmp_path / "run", "test")
    capsys.readouterr()
    again = load(synthetic_root, cache)
    message = capsys.readouterr().err
    assert again["train"].meta["decoded_videos"] == ["video01", "video41"]
    assert "video01.npz: frame cache in the old .npz format" in message
    assert "video41.npz" in message and "video02" not in message
    assert not list(folder.glob("*.npz"))
    for split in datasets.SPLITS:
        assert torch.equal(again[split].images[:], first[split].images[:])


def test_truncated_cache_is_a_clear_error_then_rebuilt(synthetic_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load(synthetic_root, cache)
    data_stage.write_run_data(tmp_path / "run", first)
    path = cache_folder(synthetic_root, cache_dir=cache, image_size=16) / "video42.npy"
    whole = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(whole - 100)
    with pytest.raises(RunFolderError, match=rf"video42\.npy: truncated frame cache: {whole - 100} "
                       rf"bytes.*\({whole} bytes\)"):
        data_stage.load_run_split(tmp_path / "run", "test")
    capsys.readouterr()
    again = load(synthetic_root, cache)
    assert again["test"].meta["decoded_videos"] == ["video42"]
    assert "truncated frame cache" in capsys.readouterr().err
    assert path.stat().st_size == whole
    assert torch.equal(data_stage.load_run_split(tmp_path / "run", "test").images[:],
                       first["test"].images[:])


def test_failed_rebuild_leaves_no_partial_cache(synthetic_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load(synthetic_root, cache)
    folder = cache_folder(synthetic_root, cache_dir=cache, image_size=16)
    (folder / "video02.npy").write_bytes((folder / "video02.npy").read_bytes()[:200])

    def fails_half_way(handle, array, **kwargs):
        handle.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(frame_cache.np, "save", fails_half_way)
    with pytest.raises(OSError, match="disk full"):
        load(synthetic_root, cache, workers=1)
    names = sorted(p.name for p in folder.iterdir())
    assert "video02.json" not in names  # no entry that looks current
    assert [n for n in names if n.startswith(".")] == []  # no temporary file
    assert (folder / "video02.npy").stat().st_size == 200  # untouched: still refused
    with pytest.raises(FrameCacheError, match="truncated"):
        MappedFrames(folder / "video02.npy")


def test_frame_set_checks_its_parts():
    index = pd.DataFrame(
        {"image_id": ["a"], "split": ["train"], "source": ["a"], "frame": [-1], "label": [7]}
    )
    with pytest.raises(ValueError, match="labels"):
        FrameSet(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [7], index)
    with pytest.raises(ValueError, match="uint8"):
        FrameSet(torch.zeros(1, 3, 4, 4), [0], index.assign(label=[0]))


# --------------------------------------------------------------------------------------------
# ImageFolder trees

COLOURS = {"Grasper": (250, 0, 0), "Hook": (0, 250, 0), "SpecimenBag": (0, 0, 250)}


def make_image_folder(root: Path) -> Path:
    for split, per_class in (("train", 3), ("test", 2)):
        for tool, colour in COLOURS.items():
            folder = root / split / tool
            folder.mkdir(parents=True)
            for i in range(per_class):
                suffix = "png" if i % 2 == 0 else "jpg"
                Image.new("RGB", (40, 30), colour).save(folder / f"img{i}.{suffix}")
    return root


def test_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "images")
    (root / "train" / "Hook" / "notes.txt").write_text("not an image")
    splits = datasets.load_image_folder(root, image_size=8, progress=False)
    counts = class_counts(splits).set_index(["split", "tool"])["frames"]
    assert counts[("train", "Hook")] == 3 and counts[("test", "Grasper")] == 2
    assert counts[("train", "Bipolar")] == 0
    train = splits["train"]
    assert train.index["image_id"].iloc[0] == "train/Grasper/img0.png"
    assert (train.index["frame"] == -1).all()
    for (image, label), source in zip(train, train.index["source"], strict=True):
        tool = source.split("/")[1]
        assert TOOLS[label] == tool
        expected = torch.tensor(COLOURS[tool]).view(3, 1, 1) / 255
        assert torch.allclose(image, expected.expand(3, 8, 8), atol=3 / 255)  # jpg is lossy


@pytest.mark.parametrize("bad_name", ["grasper", "Forceps"])
def test_image_folder_with_bad_class_name(tmp_path, bad_name):
    root = make_image_folder(tmp_path / "images")
    (root / "test" / bad_name).mkdir()
    with pytest.raises(DatasetError) as caught:
        datasets.load_image_folder(root, image_size=8, progress=False)
    message = str(caught.value)
    assert str(root / "test" / bad_name) in message
    assert all(tool in message for tool in TOOLS)


def test_image_folder_without_split(tmp_path):
    root = make_image_folder(tmp_path / "images")
    (root / "test").rename(root / "val")
    with pytest.raises(DatasetError, match="split folder missing"):
        datasets.load_image_folder(root, image_size=8, progress=False)


# --------------------------------------------------------------------------------------------
# The run folder


def test_run_data_round_trip_cholec80(synthetic_root, tmp_path):
    splits = load(synthetic_root, tmp_path / "cache")
    data = data_stage.write_run_data(tmp_path / "run", splits)
    assert sorted(p.name for p in data.iterdir()) == ["counts.csv", "dataset.json", "frames.csv"]
    frames = pd.read_csv(data / "frames.csv")
    assert list(frames.columns) == list(INDEX_COLUMNS)
    assert len(frames) == len(splits["train"]) + len(splits["test"])
    pd.testing.assert_frame_equal(
        pd.read_csv(data / "counts.csv"), class_counts(splits), check_dtype=False
    )
    for split in datasets.SPLITS:
        rebuilt = data_stage.load_run_split(tmp_path / "run", split)
        assert torch.equal(rebuilt.images[:], splits[split].images[:])
        assert torch.equal(rebuilt.labels, splits[split].labels)
        pd.testing.assert_frame_equal(rebuilt.index, splits[split].index)
        assert rebuilt.meta["dataset"]["kind"] == "cholec80"


def test_run_data_round_trip_image_folder(tmp_path):
    splits = datasets.load_image_folder(
        make_image_folder(tmp_path / "images"), image_size=8, progress=False
    )
    data_stage.write_run_data(tmp_path / "run", splits)
    rebuilt = data_stage.load_run_split(tmp_path / "run", "test")
    assert torch.equal(rebuilt.images[:], splits["test"].images[:])
    pd.testing.assert_frame_equal(rebuilt.index, splits["test"].index)


@pytest.mark.parametrize("missing", ["dataset.json", "frames.csv", "cache"])
def test_load_run_split_says_run_the_data_stage(synthetic_root, tmp_path, missing):
    splits = load(synthetic_root, tmp_path / "cache")
    data = data_stage.write_run_data(tmp_path / "run", splits)
    if missing == "cache":
        folder = cache_folder(synthetic_root, cache_dir=tmp_path / "cache", image_size=16)
        gone = folder / "video42.npy"
    else:
        gone = data / missing
    gone.unlink()
    with pytest.raises(RunFolderError, match=r"run the data stage \(01_data\)") as caught:
        data_stage.load_run_split(tmp_path / "run", "test")
    assert str(gone) in str(caught.value)


# --------------------------------------------------------------------------------------------
# The comparison with the published counts


def published_counts() -> pd.DataFrame:
    return pd.DataFrame(
        [
            (split, tool, PUBLISHED_COUNTS[split][tool])
            for split in datasets.SPLITS
            for tool in TOOLS
        ],
        columns=["split", "tool", "frames"],
    )


def test_published_table_adds_up():
    for split in datasets.SPLITS:
        assert sum(PUBLISHED_COUNTS[split].values()) == PUBLISHED_TOTALS[split]
    published = PUBLISHED_TOOLS_PER_FRAME
    assert published["0"] + published["1"] + published["2+"] == published["annotated"]
    assert published["1"] == sum(PUBLISHED_TOTALS.values())


def test_compare_with_published():
    exact = compare_with_published(published_counts())
    assert exact["match"].all() and len(exact) == 2 * (len(TOOLS) + 1)
    off = published_counts()
    off.loc[(off["split"] == "test") & (off["tool"] == "Hook"), "frames"] += 1
    table = compare_with_published(off).set_index(["split", "tool"])
    assert not table.loc[("test", "Hook"), "match"]
    assert not table.loc[("test", "all"), "match"]
    assert table["match"].sum() == len(table) - 2


def test_load_dispatches_on_kind(synthetic_root, tmp_path):
    by_kind = datasets.load(
        "synthetic", synthetic_root, image_size=16, cache_dir=tmp_path / "c", progress=False
    )
    assert by_kind["train"].meta["dataset"]["kind"] == "cholec80"
    images = datasets.load(
        "imagefolder",
        make_image_folder(tmp_path / "images"),
        image_size=8,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert images["test"].meta["dataset"]["kind"] == "imagefolder"
    with pytest.raises(ParameterError, match="dataset kind"):
        datasets.load("videos", synthetic_root, image_size=8, cache_dir=tmp_path / "c")
