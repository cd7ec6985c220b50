"""The synthetic generator: exact Cholec80 layout, determinism, annotations that match the
pictures, and a default dataset whose classes are all learnable."""

from pathlib import Path

import av
import numpy as np
import pytest

from lib import TOOLS
from lib.data import cholec80, synthetic
from lib.data.scene import Scene, plan_annotations
from lib.data.settings import DataSettings
from lib.errors import DatasetError, ParameterError

TINY = {"n_videos": 2, "seconds_per_video": 4, "width": 64, "height": 48}


def generate_tiny(root: Path, seed: int, **changes) -> Path:
    return synthetic.generate(root, **{**TINY, **changes}, seed=seed, workers=1, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_tiny(tmp_path_factory.mktemp("synthetic") / "a", seed=7)


def all_frames(root: Path) -> dict[str, np.ndarray]:
    frames = TINY["seconds_per_video"] * cholec80.FPS
    return {
        record.name: cholec80.decode_frames(record.video_path, range(frames), image_size=24)
        for record in cholec80.find_videos(root)
    }


def test_layout_is_exactly_cholec80(tiny):
    files = sorted(p.relative_to(tiny).as_posix() for p in tiny.rglob("*") if p.is_file())
    assert files == [
        "tool_annotations/video01-tool.txt",
        "tool_annotations/video41-tool.txt",
        "videos/video01.mp4",
        "videos/video41.mp4",
    ]
    for record in cholec80.find_videos(tiny):
        lines = record.annotation_path.read_text().splitlines()
        assert (
            lines[0] == "Frame\tGrasper\tBipolar\tHook\tScissors\tClipper\tIrrigator\tSpecimenBag"
        )
        table = cholec80.read_tool_annotations(record.annotation_path)
        assert table["Frame"].tolist() == [0, 25, 50, 75]
        with av.open(str(record.video_path)) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == 25
            assert (stream.width, stream.height, stream.codec_context.name) == (64, 48, "h264")
            assert sum(1 for _ in container.decode(stream)) == 100


def test_annotation_files_are_the_plan(tiny):
    for record in cholec80.find_videos(tiny):
        planned = plan_annotations(record.video_id, seconds=4, seed=7)
        assert record.annotation_path.read_text() == cholec80.format_tool_annotations(planned)


def test_same_seed_same_dataset(tiny, tmp_path):
    again = generate_tiny(tmp_path / "b", seed=7)
    for name in ("video01-tool.txt", "video41-tool.txt"):
        assert (again / "tool_annotations" / name).read_bytes() == (
            tiny / "tool_annotations" / name
        ).read_bytes()
    first, second = all_frames(tiny), all_frames(again)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_other_seed_other_dataset():
    plans = [plan_annotations(1, seconds=60, seed=seed) for seed in (1, 2)]
    assert not plans[0].equals(plans[1])


def test_video_ids_split_into_default_halves():
    assert synthetic.video_ids(5) == [1, 2, 3, 41, 42]
    assert synthetic.video_ids(16) == [*range(1, 9), *range(41, 49)]
    with pytest.raises(ParameterError):
        synthetic.video_ids(1)


@pytest.mark.parametrize("video_id", [1, 41])
def test_tools_are_drawn_exactly_at_the_annotated_seconds(video_id):
    """At frame 25 k a tool's pixels show iff the annotation lists it; between annotated frames
    tools enter and leave."""
    seconds = 30
    scene = Scene(video_id, seconds=seconds, width=96, height=54, seed=3)
    table = plan_annotations(video_id, seconds=seconds, seed=3)
    active = scene.active
    scene.active = {}
    empty = [np.asarray(scene.render(25 * k)) for k in range(seconds)]
    for episode in scene.episodes:
        scene.active = {second: [episode] for second in range(episode.first - 1, episode.last + 1)}
        for k in range(seconds):
            drawn = not np.array_equal(np.asarray(scene.render(25 * k)), empty[k])
            assert drawn == bool(episode.first <= k <= episode.last)
            assert drawn <= bool(table.loc[k, TOOLS[episode.label]])
    scene.active = active
    moving = [np.asarray(scene.render(25 * 3 + i)) for i in (5, 12, 20)]
    assert not np.array_equal(moving[0], moving[1])  # the camera or a tool moves in-between


def test_default_profile_has_every_class_in_both_splits():
    defaults = DataSettings()
    ids = synthetic.video_ids(defaults.synthetic_videos)
    counts = {"train": np.zeros(len(TOOLS), int), "test": np.zeros(len(TOOLS), int)}
    present_per_second = []
    for video_id in ids:
        table = plan_annotations(
            video_id,
            seconds=defaults.synthetic_seconds,
            seed=defaults.seed,
        )
        flags = table[list(TOOLS)].to_numpy()
        present_per_second.append(flags.sum(axis=1))
        single = flags[flags.sum(axis=1) == 1]
        counts["train" if video_id <= 40 else "test"] += single.sum(axis=0)
    for split, per_class in counts.items():
        assert per_class.min() >= 25, (split, per_class)  # every class learnable and testable
        assert per_class.sum() >= 600, (split, per_class)
        # imbalanced like Cholec80: Hook and Grasper lead, Scissors is rarest
        order = np.argsort(-per_class)
        assert {TOOLS[i] for i in order[:2]} == {"Hook", "Grasper"}, (split, per_class)
        assert per_class[TOOLS.index("Scissors")] == per_class.min(), (split, per_class)
    present = np.concatenate(present_per_second)
    assert 0.08 <= (present == 0).mean() <= 0.18
    assert 0.25 <= (present >= 2).mean() <= 0.45


def test_second_call_keeps_current_videos(tiny):
    stamps = {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()}
    generate_tiny(tiny, seed=7)
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()} == stamps


def test_stale_videos_are_refused_then_removed_with_overwrite(tmp_path):
    root = generate_tiny(tmp_path / "d", seed=1, n_videos=3)  # ids 1, 2, 41
    with pytest.raises(DatasetError, match="video02"):
        generate_tiny(root, seed=1)
    generate_tiny(root, seed=1, overwrite=True)
    assert [r.video_id for r in cholec80.find_videos(root)] == [1, 41]


@pytest.mark.parametrize(
    "changes",
    [{"width": 63}, {"height": 16}, {"seconds_per_video": 1}, {"n_videos": 81}],
    ids=["odd width", "too small", "too short", "too many videos"],
)
def test_bad_parameters(tmp_path, changes):
    with pytest.raises(ParameterError):
        generate_tiny(tmp_path / "e", seed=0, **changes)
    assert not (tmp_path / "e").exists()
