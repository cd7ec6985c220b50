"""What the chapters say about the build (lib/run/chapters.py): the parameters once, as a
table of the values the build ran with; the precision and the attacked checkpoints in words."""

from __future__ import annotations

import nbformat
import pandas as pd
import pytest

from lib import io
from lib.run import chapters, layout, manifest, parameters

ATTACK = "03_attack"


def executed_notebook(injected: dict) -> nbformat.NotebookNode:
    """A notebook as papermill leaves it: the parameters cell, then the injected one."""
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell("lr0 = 0.008\n", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("lr0 = 0.01\n", metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("print(lr0)"),
    ])
    notebook.metadata["papermill"] = {"parameters": injected}
    return notebook


def test_the_book_shows_the_parameters_once_with_the_values_the_build_ran_with() -> None:
    shown = chapters.present_notebook(
        executed_notebook({"lr0": 0.01, "run_dir": "data/runs/default",
                           "schedule_constants": {"step": {"drop": 0.5}}}), ATTACK)
    assert [c.cell_type for c in shown.cells] == ["markdown", "markdown", "code", "code", "code"]
    table = shown.cells[1].source
    assert table.startswith(":::{dropdown} Parameters of this build")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    # every parameter of the stage once, in the order and with the meaning of its owner
    meanings = {name: meaning for name, _, meaning in parameters.parameter_table(ATTACK)}
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name}`" for name in meanings]
    assert f"| `lr0` | `0.01` | build | {meanings['lr0']} |" in rows  # injected and different
    # injected, but the default
    assert "| `run_dir` | `'data/runs/default'` | default |" in table
    assert "| `refine_tolerance` | `0.001` | default |" in table  # not injected: the default
    assert "| `schedule_constants` | `{'step': {'drop': 0.5}}` | build |" in table
    assert [c.metadata["tags"] for c in shown.cells[2:4]] == [
        ["parameters", "remove-cell"], ["injected-parameters", "remove-cell"]]
    assert "tags" not in shown.cells[4].metadata  # the rest as it was


def test_a_notebook_without_parameters_is_left_as_it_is() -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Skipped")])
    assert chapters.present_notebook(notebook, ATTACK) == notebook


@pytest.mark.parametrize(("record", "parameters", "expected"), [
    ({"precision_used": "float32", "bfloat16_native": False, "bfloat16_cpu_flags": []},
     {"precision": "auto", "device": "cpu"},
     "float32 (precision 'auto' chose float32; its CPU has neither AMX nor AVX512-BF16, so "
     "bfloat16 would be emulated)"),
    ({"precision_used": "bfloat16", "bfloat16_native": True,
      "bfloat16_cpu_flags": ["amx_bf16", "avx512_bf16"]},
     {"precision": "auto", "device": "cpu"},
     "bfloat16 (precision 'auto' chose bfloat16; its CPU computes bfloat16 natively "
     "(AMX-BF16, AVX512-BF16))"),
    ({"precision_used": "float32", "bfloat16_native": True, "bfloat16_cpu_flags": []},
     {"precision": "float32", "device": "cuda:0"},
     "float32 (precision 'float32'; cuda:0 computes bfloat16 natively)"),
], ids=["avx2-cpu", "amx-cpu", "gpu"])
def test_the_precision_sentence_is_read_from_the_manifest(tmp_path, record, parameters,
                                                          expected) -> None:
    io.write_json(layout.manifest_file(tmp_path), {"stages": {"02_train": record}})
    assert chapters.precision_sentence(tmp_path, "02_train", parameters) == expected


def test_the_manifest_records_the_precision_and_the_instructions() -> None:
    recorded = manifest.used_precision({"precision": "auto", "device": "cpu"})
    assert recorded["precision_used"] in ("float32", "bfloat16")
    assert recorded["bfloat16_native"] == (recorded["precision_used"] == "bfloat16")
    assert set(recorded["bfloat16_cpu_flags"]) <= {"amx_bf16", "avx512_bf16"}


def predictions(correct: dict[int, dict[int, int]]) -> pd.DataFrame:
    """Ten test images of each of two tools per epoch; ``correct[epoch][label]`` right."""
    rows = []
    for epoch, per_label in correct.items():
        for label, right in per_label.items():
            rows += [(epoch, f"{label}-{k}", label, label if k < right else 6)
                     for k in range(10)]
    return pd.DataFrame(rows, columns=["epoch", "image_id", "label", "predicted"])


def test_the_checkpoints_sentence_names_what_was_left_out_and_why_it_was_thin() -> None:
    table = predictions({1: {0: 9, 4: 5}, 2: {0: 9, 4: 2}, 3: {0: 10, 4: 9}})
    assert chapters.checkpoints_sentence(table, [1, 3]) == (
        "This build trained 3 epochs and attacked the checkpoints of epochs 1 and 3. Left out: "
        "epoch 2, whose checkpoint classified 2 of 10 Clipper test images correctly, the fewest "
        "of any tool.")
    assert chapters.checkpoints_sentence(table, [1, 2, 3]) == (
        "This build attacked the checkpoint of every trained epoch (1, 2 and 3).")
