"""Stage parameters and their defaults, profiles, parameter checks and run-folder manifests
(lib/run/parameters.py, pipeline.py, manifest.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import jupytext
import pytest

from lib.attack.plan import AttackSettings
from lib.errors import ParameterError, RunFolderError
from lib.run import book, layout, parameters, pipeline
from lib.train import resume
from lib.train.settings import TrainSettings

TRAIN = "02_train"


def test_stage_defaults_are_the_settings_defaults() -> None:
    defaults = parameters.stage_defaults(TRAIN)
    assert defaults["epochs"] == TrainSettings().epochs == 5
    assert defaults["balance"] == "sampler"
    assert defaults["augment"] is True
    assert defaults["run_dir"] == parameters.RuntimeSettings().run_dir
    assert parameters.from_namespace(TRAIN, {**defaults, "unrelated": 1}) == defaults


def test_parameter_table_has_a_meaning_for_every_parameter() -> None:
    for stage in layout.STAGES:
        rows = parameters.parameter_table(stage)
        assert [name for name, _, _ in rows] == list(parameters.stage_defaults(stage))
        assert all(meaning for _, _, meaning in rows), stage


def notebook_parameters(stage: str) -> dict[str, object]:
    """The names and literal values of the ``parameters`` cell of ``stage``'s notebook."""
    notebook = jupytext.read(layout.notebook_path(stage))
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign), f"{stage}: only `name = literal` lines"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("stage", layout.STAGES)
def test_every_notebook_parameters_cell_holds_the_stage_defaults(stage: str) -> None:
    # names, values and their types (True is not 1, 1 is not 1.0 in a cell)
    cell = notebook_parameters(stage)
    defaults = parameters.stage_defaults(stage)
    assert cell == defaults
    assert {k: type(v) for k, v in cell.items()} == {k: type(v) for k, v in defaults.items()}


def test_the_default_profile_sets_nothing_that_differs_from_the_defaults() -> None:
    spec = parameters.load_profile_spec("default")
    assert set(spec["common"]) == {"run_dir", "device"}
    for stage, values in parameters.load_profile("default").items():
        defaults = parameters.stage_defaults(stage)
        assert {k: v for k, v in values.items() if v != defaults[k]} == {}, stage


def test_a_stage_settings_object_is_made_from_its_parameters() -> None:
    values = {**parameters.stage_defaults("03_attack"), "lr0": 0.02, "epochs": [1]}
    settings = parameters.stage_settings("03_attack", values)
    assert isinstance(settings, AttackSettings)
    assert settings.lr0 == 0.02 and settings.epochs == (1,)
    with pytest.raises(ParameterError, match="has no parameter.*lr_0"):
        parameters.stage_settings("03_attack", {"lr_0": 0.02})
    with pytest.raises(ParameterError, match="lr0 must be a finite number > 0"):
        parameters.stage_settings("03_attack", {"lr0": -1.0})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": "3"}, "parameter 'epochs': expected int"),
        ({"epochs": 2.5}, "parameter 'epochs': expected int"),
        ({"epochs": True}, "parameter 'epochs': expected int"),
        ({"lr": "fast"}, "parameter 'lr': expected float"),
        ({"augment": 1}, "parameter 'augment': expected bool"),
        ({"epoch": 3}, "has no parameter 'epoch'"),
    ],
)
def test_wrong_parameters_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        parameters.check_parameter_types(TRAIN, values)


def test_an_int_is_a_valid_float() -> None:
    parameters.check_parameter_types(TRAIN, {"lr": 1, "epochs": 3})


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ParameterError, match="available profiles: .*default"):
        parameters.load_profile("nonexistent")


def test_unknown_stage_lists_the_stages() -> None:
    with pytest.raises(ParameterError, match="the stages are 01_data, 02_train"):
        layout.notebook_path("02_training")


def test_default_profile_parameters_are_valid() -> None:
    for name in parameters.available_profiles():
        for stage, params in parameters.load_profile(name).items():
            if layout.notebook_path(stage).exists():
                parameters.check_parameter_types(stage, params)


def _data_params(**changes: object) -> dict:
    params = parameters.stage_defaults("01_data")
    params.update(changes)
    return params


def test_manifest_records_parameters_and_versions(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = pipeline.start_stage("01_data", run_dir=run_dir, parameters=_data_params())
    assert out == run_dir / "data" and out.is_dir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entry = manifest["stages"]["01_data"]
    assert entry["parameters"]["image_size"] == 64
    assert "run_dir" not in entry["parameters"]  # runtime parameters are not recorded
    assert entry["versions"]["torch"].startswith("2.")
    assert entry["finished"] is False
    pipeline.finish_stage("01_data", run_dir=run_dir)
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["01_data"]["finished"]


def test_other_parameters_are_refused_with_the_differences(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pipeline.start_stage("01_data", run_dir=run_dir, parameters=_data_params())
    with pytest.raises(RunFolderError) as error:
        pipeline.start_stage("01_data", run_dir=run_dir, parameters=_data_params(image_size=96))
    message = str(error.value)
    assert "image_size: run folder has 64, now 96" in message
    assert "overwrite" in message and "new run folder" in message


def test_same_parameters_continue(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pipeline.start_stage("01_data", run_dir=run_dir, parameters=_data_params())
    (run_dir / "data" / "kept.csv").write_text("x\n")
    pipeline.start_stage("01_data", run_dir=run_dir, parameters=_data_params(workers=1))
    assert (run_dir / "data" / "kept.csv").exists()


def test_overwrite_discards_this_and_later_stages(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pipeline.start_stage("01_data", run_dir=run_dir, parameters=_data_params())
    pipeline.finish_stage("01_data", run_dir=run_dir)
    train = parameters.stage_defaults(TRAIN)
    pipeline.start_stage(TRAIN, run_dir=run_dir, parameters=train)
    (run_dir / "data" / "old.csv").write_text("x\n")
    (run_dir / "train" / "old.csv").write_text("x\n")
    pipeline.start_stage("01_data", run_dir=run_dir, parameters=_data_params(image_size=96),
                         overwrite=True)
    assert not (run_dir / "data" / "old.csv").exists()
    assert not (run_dir / "train").exists()
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert set(stages) == {"01_data"}


def test_a_later_stage_needs_the_run_folder_and_the_stage_before(tmp_path: Path) -> None:
    train = parameters.stage_defaults(TRAIN)
    with pytest.raises(RunFolderError, match="does not exist; run the data stage"):
        pipeline.start_stage(TRAIN, run_dir=tmp_path / "missing", parameters=train)
    assert not (tmp_path / "missing").exists()
    pipeline.start_stage("01_data", run_dir=tmp_path / "run", parameters=_data_params())
    with pytest.raises(RunFolderError, match="no finished stage 01_data"):
        pipeline.start_stage(TRAIN, run_dir=tmp_path / "run", parameters=train)


def test_override_that_no_stage_has_is_refused() -> None:
    with pytest.raises(ParameterError, match="no selected stage has parameter"):
        pipeline.run("default", stages=["02_train"], overrides={"lr00": 1.0})


def test_parameters_markdown_lists_every_stage() -> None:
    text = book.parameters_markdown()
    assert "### 02_train" in text
    assert "| `epochs` | `5` |" in text


# --------------------------------------------------------------------------- lib.run.layout


def test_command_line_values_are_read_as_plain_yaml() -> None:
    assert parameters.parse_value("epochs", "3") == 3
    assert parameters.parse_value("lr", "0.5") == 0.5
    assert parameters.parse_value("augment", "true") is True
    assert parameters.parse_value("schedules", "[step, constant]") == ["step", "constant"]
    with pytest.raises(ParameterError, match="-p run_dir: .* is not a plain value"):
        parameters.parse_value("run_dir", "!!python/object/apply:os.system [ls]")


def test_parameters_merge_defaults_then_profile_then_overrides() -> None:
    merged = parameters.merged_parameters("02_train", profile="tiny", overrides={"lr": 0.5},
                                      with_defaults=True)
    assert merged["epochs"] == parameters.load_profile("tiny")["02_train"]["epochs"]  # profile
    assert merged["lr"] == 0.5  # override
    assert merged["momentum"] == parameters.stage_defaults("02_train")["momentum"]  # default
    assert set(merged) == set(parameters.stage_defaults("02_train"))
    assert "momentum" not in parameters.merged_parameters("02_train", profile="tiny")
    with pytest.raises(ParameterError, match="has no parameter 'lr00'"):
        parameters.merged_parameters("02_train", overrides={"lr00": 1.0})


def test_run_folder_paths(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert layout.checkpoint_path(run, 3, model=2) == (
        run / "train" / "seed_2" / "epoch_03.safetensors")
    assert layout.model_dir(run, 0) == run / "train" / "seed_0"
    assert layout.optimizer_file(run / "train", 12) == run / "train" / "optimizer_12.safetensors"
    assert layout.attack_file(run, "job") == run / "attack" / "job.json"
    assert layout.attack_file(run, "results.csv") == run / "attack" / "results.csv"
    assert layout.chunk_files(run, "epoch_01", 7)[0] == (
        run / "attack" / "chunks" / "epoch_01" / "chunk_00007.csv")
    assert layout.data_file(run, "frames") == run / "data" / "frames.csv"
    assert layout.minimality_file(run, "ratios") == run / "minimality" / "ratios.csv"
    assert layout.executed_notebook(run, "04_analysis") == run / "notebooks" / "04_analysis.ipynb"
    with pytest.raises(ValueError, match="writes no file 'results'"):
        layout.data_file(run, "results")


@pytest.mark.parametrize(("logged", "checkpoints", "expected", "finished"), [
    ([], [1], [], 0),
    ([1, 2, 4], [1, 2, 4], [1, 2, 4], 2),
    ([1, 2, 4], [1, 4], [1, 4], 1),
    ([2, 3], [2, 3], [2, 3], 0),
])
def test_trained_epochs_need_a_metrics_row_and_a_checkpoint(
    tmp_path: Path, logged: list[int], checkpoints: list[int], expected: list[int],
    finished: int,
) -> None:
    train = tmp_path / "train"
    train.mkdir()
    if logged:
        layout.train_table(train, "metrics").write_text(
            "epoch,accuracy\n" + "".join(f"{e},0.5\n" for e in logged))
    for epoch in checkpoints:
        layout.checkpoint_file(train, epoch).write_bytes(b"x")
    assert resume.logged_epochs(train) == expected
    assert resume.finished_epochs(train) == finished


@pytest.mark.parametrize("stage", [layout.MINIMALITY_STAGE, layout.MARGINS_STAGE])
def test_the_stage_is_finished_after_its_last_output(stage: str) -> None:
    # its figures and verdict are outputs too: a stage that fails drawing them is not finished
    notebook = jupytext.read(layout.notebook_path(stage))
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    finishing = [k for k, source in enumerate(code) if "finish_stage(" in source]
    assert finishing == [len(code) - 1]
    assert code[-1].rstrip().splitlines()[-1].startswith("pipeline.finish_stage(")
