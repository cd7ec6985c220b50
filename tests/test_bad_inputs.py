"""The bad-input matrix (tests/bad_inputs.yaml): every bad input stops with a clear error.

Each case runs the stage command (``python -m lib.run.pipeline run``) in a folder of its own that
holds the run folder, the dataset and the frame cache: its ``main()`` in this process, whose
exit status and standard error are what the command gives. The command must exit non-zero,
print a message that names the input and the fix, and leave every file of that folder
exactly as it was. A few cases also run as a real subprocess (marked ``pipeline``), to prove
the command line itself. Cases without a stage command call the lib function instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as text_io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lib import TOOLS, io
from lib.errors import BorderlineError
from lib.model.checkpoints import build_model, load_checkpoint, save_checkpoint
from lib.run import attack_stage, book, checks, layout, parameters, pipeline
from lib.run.manifest import read_manifest

CASES = book.bad_input_cases()
PATH_PARAMETERS = ("run_dir", "dataset_root", "cache_dir")


# --------------------------------------------------------------------------- a valid run


@pytest.fixture(scope="session")
def valid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's data stage and one training epoch: a valid run folder to damage."""
    root = tmp_path_factory.mktemp("valid")
    pipeline.run("tiny", stages=["01_data", "02_train"], overrides={
        **_path_overrides(root), "epochs": 1}, progress=False)
    return root


def _path_overrides(root: Path) -> dict[str, str]:
    return {"run_dir": str(root / "run"), "dataset_root": str(root / "dataset"),
            "cache_dir": str(root / "cache")}


def _link_copy(source: Path, target: Path) -> None:
    """Copy a folder with hard links: fast for checkpoints; a case replaces, never edits."""
    shutil.copytree(source, target, copy_function=os.link)


# --------------------------------------------------------------------------- setups


def _trained_run(root: Path, valid: Path) -> None:
    _link_copy(valid / "run", root / "run")


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file at ``path`` (a hard link to the valid run stays intact)."""
    path.unlink()
    path.write_bytes(data)


def _first_checkpoint(root: Path) -> Path:
    return layout.checkpoint_path(root / "run", 1, model=0)


def _checkpoint_truncated(root: Path, valid: Path) -> None:
    _trained_run(root, valid)
    data = _first_checkpoint(root).read_bytes()
    _replace(_first_checkpoint(root), data[: len(data) // 2])


def _checkpoint_pickled(root: Path, valid: Path) -> None:
    _trained_run(root, valid)
    path = _first_checkpoint(root)
    state = {"weight": torch.zeros(2, 2)}
    path.unlink()
    torch.save(state, path)


def _checkpoint_five_classes(root: Path, valid: Path) -> None:
    save_checkpoint(build_model(num_classes=5), root / "five.safetensors")


def _cholec80_folder(root: Path, valid: Path) -> None:
    shutil.copytree(valid / "dataset", root / "dataset")


def _first(root: Path, folder: str) -> Path:
    return sorted((root / "dataset" / folder).iterdir())[0]


def _without_videos_folder(root: Path, valid: Path) -> None:
    _cholec80_folder(root, valid)
    shutil.rmtree(root / "dataset" / "videos")


def _annotation_missing(root: Path, valid: Path) -> None:
    _cholec80_folder(root, valid)
    _first(root, "tool_annotations").unlink()


def _annotation_header(root: Path, valid: Path) -> None:
    _cholec80_folder(root, valid)
    path = _first(root, "tool_annotations")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("Frame\tGrasper\tHook\n" + "".join(lines[1:]))


def _annotation_bad_row(root: Path, valid: Path) -> None:
    _cholec80_folder(root, valid)
    path = _first(root, "tool_annotations")
    lines = path.read_text().splitlines(keepends=True)
    frame = lines[2].split("\t")[0]
    lines[2] = "\t".join([frame, "2", *["0"] * (len(TOOLS) - 1)]) + "\n"
    path.write_text("".join(lines))


def _video_corrupt(root: Path, valid: Path) -> None:
    _cholec80_folder(root, valid)
    _first(root, "videos").write_bytes(b"not a video at all " * 100)


def _image_folder(root: Path, classes: dict[str, list[str]]) -> None:
    from PIL import Image

    for split, names in classes.items():
        for name in names:
            (root / "dataset" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "dataset" / split / name / "a.png")


def _imagefolder_unknown_class(root: Path, valid: Path) -> None:
    _image_folder(root, {"train": ["Hook", "Knife"], "test": ["Hook"]})


def _imagefolder_without_test(root: Path, valid: Path) -> None:
    _image_folder(root, {"train": ["Hook"]})


def _run_dir_is_a_file(root: Path, valid: Path) -> None:
    (root / "run").write_text("not a folder\n")


def _cache_dir_is_a_file(root: Path, valid: Path) -> None:
    (root / "cache").write_text("not a folder\n")


def _empty_run_folder(root: Path, valid: Path) -> None:
    (root / "run").mkdir()


def _data_run(root: Path, valid: Path) -> None:
    """The valid run folder as it was after the data stage: no train/, no 02_train record."""
    (root / "run").mkdir()
    _link_copy(valid / "run" / "data", root / "run" / "data")
    manifest = read_manifest(valid / "run")
    manifest["stages"] = {"01_data": manifest["stages"]["01_data"]}
    io.write_json(root / "run" / "manifest.json", manifest)


def _weights_garbage(root: Path, valid: Path) -> None:
    _data_run(root, valid)
    (root / "alexnet-owt.pth").write_bytes(b"these are not weights\n" * 10)


#: What a case prepares in its folder: ``setup(case folder, valid run's root)``.
SETUPS: dict[str, Callable[[Path, Path], None]] = {
    "trained_run": _trained_run,
    "data_run": _data_run,
    "trained_run_checkpoint_truncated": _checkpoint_truncated,
    "trained_run_checkpoint_pickled": _checkpoint_pickled,
    "checkpoint_five_classes": _checkpoint_five_classes,
    "cholec80_folder": _cholec80_folder,
    "cholec80_without_videos_folder": _without_videos_folder,
    "cholec80_annotation_missing": _annotation_missing,
    "cholec80_annotation_header": _annotation_header,
    "cholec80_annotation_bad_row": _annotation_bad_row,
    "cholec80_video_corrupt": _video_corrupt,
    "imagefolder_unknown_class": _imagefolder_unknown_class,
    "imagefolder_without_test": _imagefolder_without_test,
    "run_dir_is_a_file": _run_dir_is_a_file,
    "cache_dir_is_a_file": _cache_dir_is_a_file,
    "empty_run_folder": _empty_run_folder,
    "weights_garbage": _weights_garbage,
}
NEEDS_VALID_RUN = {"trained_run", "data_run", "trained_run_checkpoint_truncated",
                   "trained_run_checkpoint_pickled", "weights_garbage", "cholec80_folder",
                   "cholec80_without_videos_folder", "cholec80_annotation_missing",
                   "cholec80_annotation_header", "cholec80_annotation_bad_row",
                   "cholec80_video_corrupt"}


# --------------------------------------------------------------------------- snapshots

_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def _digest(path: Path) -> str:
    """sha256 of a file, remembered per (device, inode, size, mtime): hard-linked
    checkpoints are read once per session."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file under ``root``: relative path -> "folder" or the file's sha256."""
    return {
        str(path.relative_to(root)): "folder" if path.is_dir() else _digest(path)
        for path in sorted(root.rglob("*"))
    }


# --------------------------------------------------------------------------- running a case


def _value(text: str, root: Path) -> str:
    return text.replace("{root}", str(root))


def command(case: dict, root: Path) -> list[str]:
    """The stage command of ``case``, with its files pointed into ``root``."""
    args = [sys.executable, "-m", "lib.run.pipeline", "run", "--profile",
            case.get("profile", "tiny"), "--no-progress"]
    stage = case.get("stage")
    if stage:
        args += ["--stage", stage]
    params = {name: _value(str(v), root) for name, v in (case.get("params") or {}).items()}
    if stage in layout.STAGES:
        defaults = parameters.stage_defaults(stage)
        for name, value in _path_overrides(root).items():
            if name in defaults and name not in params:
                params[name] = value
    for name, value in params.items():
        args += ["-p", name, value]
    return args


def _plan_attack(case: dict, root: Path) -> Any:
    """The attack stage's selection with the case's parameters, after its pre-flight."""
    typed = {k: yaml.safe_load(v) for k, v in (case.get("params") or {}).items()}  # as -p
    params = {**parameters.load_profile("tiny")["03_attack"], "run_dir": str(root / "run"), **typed}
    values = parameters.complete_parameters("03_attack", params)
    checks.check_stage("03_attack", values)  # the pre-flight lets it through
    job = attack_stage.plan_job(values["run_dir"], parameters.stage_settings("03_attack", values))
    return job.selection


def _load_checkpoint(case: dict, root: Path) -> Any:
    return load_checkpoint(root / "five.safetensors")


#: The calls of cases checked by a function rather than the stage command.
FUNCTIONS: dict[str, Callable[[dict, Path], Any]] = {
    "plan_attack": _plan_attack,
    "load_checkpoint": _load_checkpoint,
}


@pytest.fixture
def case_root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The case's folder, prepared by its setup."""
    case = request.param
    setup = case.get("setup")
    if setup:
        valid = request.getfixturevalue("valid_root") if setup in NEEDS_VALID_RUN else None
        SETUPS[setup](tmp_path, valid)
    return tmp_path


def _ids(cases: list[dict]) -> list[str]:
    return [case["id"] for case in cases]


def _params(cases: list[dict]) -> list[Any]:
    """``(case, case)`` per case; marked ``pipeline`` when its setup runs the data and
    training stages (``valid_root``), which ``make check`` leaves out."""
    return [pytest.param(c, c, id=c["id"], marks=[pytest.mark.pipeline]
                         if c.get("setup") in NEEDS_VALID_RUN else []) for c in cases]


COMMAND_CASES = [c for c in CASES if c.get("checked_by", "stage command") == "stage command"]
FUNCTION_ERROR_CASES = [c for c in CASES if c.get("checked_by") == "function"
                        and c.get("outcome", "error") == "error"]
SHORTFALL_CASES = [c for c in CASES if c.get("outcome") == "shortfall"]


#: Cases also run as a real subprocess: a profile error, a parameter and a file.
SUBPROCESS_IDS = ("profile-missing", "train-epochs-float", "weights-file-not-tensors")
SUBPROCESS_CASES = [c for c in COMMAND_CASES if c["id"] in SUBPROCESS_IDS]


def _in_process(args: list[str]) -> tuple[int, str]:
    """``python -m lib.run.pipeline ...`` as ``main()`` in this process: (exit status, stderr)."""
    stderr = text_io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(text_io.StringIO()):
        try:
            status = pipeline.main(args)
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, stderr.getvalue()


def _assert_refused(case: dict, root: Path, status: int, stderr: str, before: dict) -> None:
    assert status != 0
    assert "Traceback" not in stderr, stderr
    message = " ".join(stderr.split())
    for fragment in case["expect"]:
        assert _value(fragment, root) in message, stderr
    assert snapshot(root) == before, "the failed stage changed files"


@pytest.mark.parametrize(("case", "case_root"), _params(COMMAND_CASES), indirect=["case_root"])
def test_stage_command_refuses_bad_input(case: dict, case_root: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(case_root)
    monkeypatch.chdir(layout.REPO)
    args = command(case, case_root)
    assert args[1:3] == ["-m", "lib.run.pipeline"]
    status, stderr = _in_process(args[3:])
    _assert_refused(case, case_root, status, stderr, before)


@pytest.mark.pipeline
@pytest.mark.parametrize(("case", "case_root"), [(c, c) for c in SUBPROCESS_CASES],
                         indirect=["case_root"], ids=_ids(SUBPROCESS_CASES))
def test_stage_command_line_refuses_bad_input(case: dict, case_root: Path) -> None:
    before = snapshot(case_root)
    completed = subprocess.run(command(case, case_root), capture_output=True, text=True,
                               cwd=layout.REPO, timeout=300)
    _assert_refused(case, case_root, completed.returncode, completed.stderr, before)


def test_the_subprocess_cases_exist() -> None:
    assert sorted(c["id"] for c in SUBPROCESS_CASES) == sorted(SUBPROCESS_IDS)


@pytest.mark.parametrize(("case", "case_root"), _params(FUNCTION_ERROR_CASES),
                         indirect=["case_root"])
def test_function_refuses_bad_input(case: dict, case_root: Path) -> None:
    before = snapshot(case_root)
    with pytest.raises(BorderlineError) as error:
        FUNCTIONS[case["function"]](case, case_root)
    for fragment in case["expect"]:
        assert fragment in str(error.value)
    assert snapshot(case_root) == before


@pytest.mark.parametrize(("case", "case_root"), _params(SHORTFALL_CASES),
                         indirect=["case_root"])
def test_more_images_than_available_is_a_reported_shortfall(case: dict, case_root: Path) -> None:
    before = snapshot(case_root)
    selection = FUNCTIONS[case["function"]](case, case_root)
    assert len(selection.shortfall) > 0  # reported, class by class
    assert len(selection.images) > 0  # and attacked with the images there are
    assert snapshot(case_root) == before


# --------------------------------------------------------------------------- the matrix itself


def test_every_case_is_complete_and_unique() -> None:
    assert len({case["id"] for case in CASES}) == len(CASES)
    for case in CASES:
        assert case["input"] and case["bad"] and case["expect"], case["id"]
        assert case.get("setup") is None or case["setup"] in SETUPS, case["id"]
        if case.get("checked_by") == "function":
            assert case["function"] in FUNCTIONS, case["id"]


#: Parameters whose bad values are cases of a file input rather than of the parameter.
FILE_PARAMETERS = {("01_data", "dataset_root"): "dataset folder",
                   ("02_train", "weights_path"): "weights file"}
#: Flags whose only bad value is a wrong type, which one shared check refuses for every stage
#: (the case "01_data: overwrite" shows it).
TYPE_ONLY = {("03_attack", "overwrite"),
             ("04_analysis", "overwrite"), ("05_minimality", "overwrite"),
             ("06_borderline", "overwrite"), ("07_margins", "overwrite"),
             ("07_margins", "progress")}


def test_every_notebook_parameter_has_a_case() -> None:
    covered = {case["input"] for case in CASES}
    for stage in layout.STAGES:
        for name in parameters.stage_defaults(stage):
            if (stage, name) in TYPE_ONLY:
                continue
            wanted = FILE_PARAMETERS.get((stage, name), f"{stage}: {name}")
            assert wanted in covered, f"no case for {stage}: {name}"


def test_book_table_has_one_row_per_case() -> None:
    table = book.bad_inputs_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # minus header
    assert len(rows) == len(CASES)
    for case, row in zip(CASES, rows, strict=True):
        assert case["bad"].replace("|", "\\|") in row


def test_start_stage_checks_before_it_writes(tmp_path: Path) -> None:
    # papermill run directly: the notebook's start_stage refuses before creating the run folder
    params = {**parameters.stage_defaults("01_data"), "image_size": 32}
    with pytest.raises(BorderlineError, match="choose image_size >= 63"):
        pipeline.start_stage("01_data", run_dir=tmp_path / "run", parameters=params)
    assert not (tmp_path / "run").exists()
    params["image_size"] = 64  # the corrected run starts
    assert pipeline.start_stage("01_data", run_dir=tmp_path / "run", parameters=params).is_dir()
