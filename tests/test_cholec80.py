"""The Cholec80 layout: annotation parsing, exact frame pairing, and every bad input's error.

Pairing is checked on videos whose frames show their own index (two grey blocks, lossless
H.264), so the decoded pixels say which frame the reader took.
"""

import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from lib import TOOLS
from lib.data import cholec80
from lib.data.datasets import load_cholec80
from lib.errors import DatasetError

BLOCK = 16  # grey levels 8, 24, ..., 248: two base-16 digits survive YUV rounding exactly


def write_indexed_video(path: Path, n_frames: int, *, size: int = 32) -> None:
    """Frame i: left half grey (i // 16) * 16 + 8, right half (i % 16) * 16 + 8; lossless."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=cholec80.FPS)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "0", "threads": "1"}
        for index in range(n_frames):
            image = np.empty((size, size, 3), dtype=np.uint8)
            image[:, : size // 2] = (index // BLOCK) * BLOCK + BLOCK // 2
            image[:, size // 2 :] = (index % BLOCK) * BLOCK + BLOCK // 2
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def frame_index_shown(images: np.ndarray) -> np.ndarray:
    """The index each uint8 [K, 3, S, S] image shows (inverse of write_indexed_video)."""
    size = images.shape[-1]
    left = images[:, :, size // 2, size // 4].mean(axis=1)
    right = images[:, :, size // 2, 3 * size // 4].mean(axis=1)
    return (
        np.round((left - BLOCK // 2) / BLOCK) * BLOCK + np.round((right - BLOCK // 2) / BLOCK)
    ).astype(int)


def annotation_text(rows: list[tuple[int, ...]]) -> str:
    return cholec80.HEADER + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows)


def tools(*names: str) -> tuple[int, ...]:
    return tuple(int(tool in names) for tool in TOOLS)


# Rows for a 100-frame video: 0, 1 or 2 tools, at frames that are not all multiples of 25.
ROWS = [
    (0, *tools("Hook")),
    (25, *tools()),
    (37, *tools("Grasper", "Hook")),
    (50, *tools("Scissors")),
    (75, *tools("SpecimenBag")),
    (99, *tools("Clipper")),
]


@pytest.fixture(scope="module")
def indexed_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("indexed") / "video.mp4"
    write_indexed_video(path, 100)
    return path


def make_dataset(root: Path, videos: dict[int, tuple[Path, str]]) -> Path:
    """A Cholec80-layout folder: {video id: (mp4 to link, annotation text)}."""
    (root / "videos").mkdir(parents=True)
    (root / "tool_annotations").mkdir()
    for video_id, (mp4, text) in videos.items():
        (root / "videos" / cholec80.video_file_name(video_id)).symlink_to(mp4)
        (root / "tool_annotations" / cholec80.annotation_file_name(video_id)).write_text(text)
    return root


def test_decoded_frames_show_their_own_index(indexed_video):
    wanted = [0, 1, 24, 25, 26, 50, 98, 99]
    images = cholec80.decode_frames(indexed_video, wanted, image_size=16)
    assert images.dtype == np.uint8 and images.shape == (len(wanted), 3, 16, 16)
    assert frame_index_shown(images).tolist() == wanted
    # an off-by-one reader would return the neighbour, which shows a different index
    shifted = cholec80.decode_frames(indexed_video, [i + 1 for i in wanted[:-1]], image_size=16)
    assert (frame_index_shown(shifted) != np.array(wanted[:-1])).all()


def test_decode_frames_accepts_any_order_and_returns_increasing(indexed_video):
    images = cholec80.decode_frames(indexed_video, [60, 3, 31], image_size=8)
    assert frame_index_shown(images).tolist() == [3, 31, 60]


def test_decode_frames_beyond_end(indexed_video):
    with pytest.raises(cholec80.VideoTooShortError, match="100 decoded frames") as caught:
        cholec80.decode_frames(indexed_video, [100], image_size=8)
    assert caught.value.frame_count == 100
    assert str(indexed_video) in str(caught.value)


def test_read_tool_annotations(tmp_path):
    path = tmp_path / "video01-tool.txt"
    path.write_text(annotation_text(ROWS) + "\n")  # a trailing blank line is fine
    table = cholec80.read_tool_annotations(path)
    assert list(table.columns) == ["Frame", *TOOLS]
    assert table.to_numpy().tolist() == [list(row) for row in ROWS]
    assert table.index.tolist() == [2, 3, 4, 5, 6, 7]  # file line numbers
    assert cholec80.format_tool_annotations(table) == annotation_text(ROWS)


def test_single_tool_frames():
    annotations = pd.DataFrame(ROWS, columns=["Frame", *TOOLS])
    single = cholec80.single_tool_frames(annotations)
    assert single["frame"].tolist() == [0, 50, 75, 99]
    assert [TOOLS[label] for label in single["label"]] == [
        "Hook",
        "Scissors",
        "SpecimenBag",
        "Clipper",
    ]


def test_reader_pairs_each_row_with_exactly_its_frame(tmp_path, indexed_video):
    """Through the whole reader: single-tool rows only, each image is frame `Frame`."""
    root = make_dataset(
        tmp_path / "data",
        {1: (indexed_video, annotation_text(ROWS)), 41: (indexed_video, annotation_text(ROWS))},
    )
    splits = load_cholec80(
        root, image_size=16, cache_dir=tmp_path / "cache", workers=1, progress=False
    )
    train = splits["train"]
    assert train.index["frame"].tolist() == [0, 50, 75, 99]
    assert train.index["image_id"].tolist() == [
        "video01-f000000",
        "video01-f000050",
        "video01-f000075",
        "video01-f000099",
    ]
    assert frame_index_shown(train.images.numpy()).tolist() == [0, 50, 75, 99]
    assert [TOOLS[label] for label in train.labels] == [
        "Hook",
        "Scissors",
        "SpecimenBag",
        "Clipper",
    ]
    assert splits["test"].index["source"].unique().tolist() == ["video41"]


def test_find_videos_ignores_other_files(tmp_path, indexed_video):
    root = make_dataset(tmp_path / "d", {2: (indexed_video, annotation_text(ROWS))})
    (root / "videos" / "video02-timestamp.txt").write_text("x")
    (root / "phase_annotations").mkdir()
    records = cholec80.find_videos(root)
    assert [(r.video_id, r.name, r.video_path.name, r.annotation_path.name) for r in records] == [
        (2, "video02", "video02.mp4", "video02-tool.txt")
    ]


# --------------------------------------------------------------------------------------------
# Bad inputs: a DatasetError naming the file (and line), and no cache or temporary file left.


def _corrupt(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _annotation(root: Path) -> Path:
    return root / "tool_annotations" / "video01-tool.txt"


def _video(root: Path) -> Path:
    return root / "videos" / "video01.mp4"


def _replace_row(root: Path, line: int, text: str) -> None:
    lines = _annotation(root).read_text().splitlines()
    lines[line - 1] = text
    _annotation(root).write_text("\n".join(lines) + "\n")


def _copy_video(root: Path) -> None:
    target = _video(root)
    data = target.resolve().read_bytes()
    target.unlink()
    target.write_bytes(data)


# (name, how to break the dataset, file named in the message, text expected in the message)
BAD_INPUTS = [
    ("missing folder", lambda r: r.rename(r.with_name("gone")), "data", "dataset folder not found"),
    (
        "missing videos/",
        lambda r: shutil.rmtree(r / "videos"),
        "videos",
        "subfolder 'videos/' missing",
    ),
    (
        "missing tool_annotations/",
        lambda r: shutil.rmtree(r / "tool_annotations"),
        "tool_annotations",
        "subfolder 'tool_annotations/' missing",
    ),
    ("video without annotation", lambda r: _annotation(r).unlink(), "video01.mp4", "without"),
    ("annotation without video", lambda r: _video(r).unlink(), "video01-tool.txt", "without"),
    (
        "wrong header",
        lambda r: _replace_row(r, 1, "Frame\tGrasper\tBipolar\tHook"),
        "video01-tool.txt, line 1",
        "wrong header",
    ),
    (
        "space-separated header",
        lambda r: _replace_row(r, 1, cholec80.HEADER.replace("\t", " ")),
        "video01-tool.txt, line 1",
        "wrong header",
    ),
    (
        "too few columns",
        lambda r: _replace_row(r, 3, "25\t0\t0\t0"),
        "video01-tool.txt, line 3",
        "4 tab-separated columns, expected 8",
    ),
    (
        "too many columns",
        lambda r: _replace_row(r, 3, "25\t0\t0\t0\t0\t0\t0\t0\t1"),
        "video01-tool.txt, line 3",
        "9 tab-separated columns",
    ),
    (
        "flag not 0/1",
        lambda r: _replace_row(r, 4, "37\t0\t2\t1\t0\t0\t0\t0"),
        "video01-tool.txt, line 4",
        "Bipolar flag is '2'",
    ),
    (
        "non-integer frame",
        lambda r: _replace_row(r, 3, "25.5\t0\t0\t0\t0\t0\t0\t0"),
        "video01-tool.txt, line 3",
        "not a non-negative integer",
    ),
    (
        "frames out of order",
        lambda r: _replace_row(r, 4, "10\t0\t0\t1\t0\t0\t0\t0"),
        "video01-tool.txt, line 4",
        "increasing",
    ),
    (
        "annotated frame beyond the end",
        lambda r: _replace_row(r, 7, "100\t0\t0\t0\t0\t0\t0\t0"),
        "video01-tool.txt, line 7",
        "beyond the end",
    ),
    (
        "corrupt video",
        lambda r: (_video(r).unlink(), _corrupt(_video(r))),
        "video01.mp4",
        "unreadable or corrupt",
    ),
    (
        "truncated video",
        lambda r: (_copy_video(r), _truncate(_video(r))),
        "video01.mp4",
        "unreadable or corrupt",
    ),
]


@pytest.mark.parametrize(
    ("breakage", "named", "expected"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_raises_dataset_error(tmp_path, indexed_video, breakage, named, expected):
    root = make_dataset(
        tmp_path / "data",
        {1: (indexed_video, annotation_text(ROWS)), 41: (indexed_video, annotation_text(ROWS))},
    )
    breakage(root)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as caught:
        load_cholec80(root, image_size=8, cache_dir=cache, workers=1, progress=False)
    message = str(caught.value)
    assert named in message and expected in message
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert left == []  # video01 is the first to decode: nothing was cached, no temp file


def test_corrupt_video_in_a_worker_process(tmp_path, indexed_video):
    """The error crosses the process boundary intact; the good video's cache is whole."""
    root = make_dataset(
        tmp_path / "data",
        {1: (indexed_video, annotation_text(ROWS)), 41: (indexed_video, annotation_text(ROWS))},
    )
    _video(root).unlink()
    _corrupt(_video(root))
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="video01.mp4: unreadable or corrupt"):
        load_cholec80(root, image_size=8, cache_dir=cache, workers=2, progress=False)
    left = sorted(p.name for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
    assert left in ([], ["video41.json", "video41.npy"])  # never video01, never a temporary file
