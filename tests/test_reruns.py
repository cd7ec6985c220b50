"""Reruns are bit-identical: result files, and every stored notebook output (strict nbval)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from lib.errors import RunFolderError
from lib.progress import CHANNEL
from lib.run import pipeline, rerun
from tests.conftest import tiny_overrides


def _sanitize(text: str) -> str:
    patterns = re.findall(r"^regex: (.*)$\n^replace: (.*)$",
                          rerun.SANITIZE_FILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    for regex, replacement in patterns:
        text = re.sub(regex, replacement, text)
    return text


@pytest.mark.parametrize(("printed", "compared"), [
    ("synthetic videos: 100%|##| 4/4 [00:05<00:00,  1.38s/video]",
     "synthetic videos: 100%|##| 4/4 [TIMING]"),
    ("decoding: 100%|##| 4/4 [00:00<00:00,  6.47video/s]", "decoding: 100%|##| 4/4 [TIMING]"),
    ("epoch 1/2: 50%|#| 1/2 [01:02<01:02, 62.00s/it, loss=2.1220]",
     "epoch 1/2: 50%|#| 1/2 [TIMING, loss=2.1220]"),
    ("evaluate: 0%| | 0/1 [00:00<?, ?it/s]", "evaluate: 0%| | 0/1 [TIMING]"),
    ("'17 passes per second'", "' MEASURED passes per second'"),
    ("<td>        86734 s</td>", "<td> MEASURED s</td>"),
    ("'24.1 hours'", "' MEASURED hours'"),
    ('<div id="altair-viz-4e23337ce03f4961ad80d6ad5bb6141b">',
     '<div id="altair-viz-ID">'),
])
def test_sanitize_masks_timings_and_ids(printed: str, compared: str) -> None:
    assert _sanitize(printed) == compared


def _compared(text: str) -> str:
    """What nbval compares of a stderr stream: its own carriage-return handling, then ours."""
    from nbval.plugin import coalesce_streams

    (stream,) = coalesce_streams([nbformat.v4.new_output("stream", name="stderr", text=text)])
    return _sanitize(stream.text)


# Two executions of one cell whose progress bars were drawn at different moments: other
# frames, other rates, other padding (the pair that once failed the rerun proof is the last).
FRAMES = "\r".join(["", "epoch 1/2:   0%|          | 0/3 [00:00<?, ?batch/s]",
                     "epoch 1/2:  33%|###3      | 1/3 [00:01<00:02,  1.02s/batch, loss=2.1]",
                     "epoch 1/2: 100%|##########| 3/3 [00:02<00:00,  1.10batch/s, loss=1.9]"])
REDRAWN = "\r".join(["", "epoch 1/2:   0%|          | 0/3 [00:00<?, ?batch/s]",
                      "epoch 1/2: 100%|##########| 3/3 [00:12<00:00,  4.10s/batch, loss=1.9]  "])
CLEARED = "\revaluate:   0%|          | 0/1 [00:00<?, ?batch/s]\r          \r"
CLEARED_LATER = "\revaluate:   0%|          | 0/1 [00:00<?, ?batch/s]\r                  \r"


@pytest.mark.parametrize(("first", "second"), [
    (FRAMES + "\n", REDRAWN + "\n"),
    (FRAMES + "\nepoch 1: train loss 1.9\n" + CLEARED,
     REDRAWN + "\nepoch 1: train loss 1.9\n" + CLEARED_LATER),
    ("          \r", "                  \r"),
], ids=["frames-and-rates", "cleared-bar", "padding"])
def test_progress_drawn_at_other_moments_compares_equal(first: str, second: str) -> None:
    assert _compared(first) == _compared(second)
    assert "loss=1.9" in _compared(first) or "loss" not in first  # the bar's result is kept


@pytest.mark.parametrize(("first", "second"), [
    (FRAMES + "\n", FRAMES.replace("3/3", "2/3") + "\n"),
    (FRAMES + "\n", FRAMES.replace("loss=1.9", "loss=1.8") + "\n"),
    ("epoch 1: train loss 1.9\n" + CLEARED, "epoch 1: train loss 1.8\n" + CLEARED),
], ids=["count", "postfix", "text-before-a-cleared-bar"])
def test_progress_rules_keep_counts_and_results(first: str, second: str) -> None:
    assert _compared(first) != _compared(second)


@pytest.mark.parametrize("kept", [
    "epoch 1: train loss 2.1220, test loss 1.9227, accuracy 0.1429, macro F1 0.0966",
    "52 training and 35 test frames of 64 px; videos decoded now: 4",
    "checkpoints [1, 2]: 120 attacks, 120 more in the lr0 sweep, in 4 chunks",
    "'0.5 million'", "'66.7 %'", "<td>0.024070</td>", "altair-viz-4e23",
    '<div class="vega-embed">' + "spec " * 2000 + "</div>",  # a chart's long line
])
def test_sanitize_keeps_results(kept: str) -> None:
    assert _sanitize(kept) == kept


@pytest.mark.slow
def test_rerun_reproduces_every_stored_output_and_result_file(tiny_run: Path,
                                                              tmp_path: Path) -> None:
    # The rerun executes every stage again from nothing, in a fresh run folder: a second run
    # of the whole profile, whose result files must equal the first's byte for byte.
    completed = rerun.rerun_notebooks(tiny_run, tmp_path)
    code_cells = sum(
        sum(cell.cell_type == "code" for cell in nbformat.read(path, as_version=4).cells)
        for path in rerun.executed_notebooks(tiny_run)
    )
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert re.search(rf"\b{code_cells} passed\b", completed.stdout), completed.stdout[-2000:]
    first_digests = rerun.result_digests(tiny_run)
    assert {"attack/results.csv", "train/seed_0/metrics.csv", "train/seed_1/metrics.csv",
            "analysis/success_rate.csv", "minimality/reference.csv", "borderline/claims.csv",
            "margins/image_margins.csv"} <= set(first_digests)
    assert rerun.result_digests(tmp_path / "run") == first_digests


@pytest.mark.slow
def test_rerun_catches_a_changed_number(tiny_run: Path, tmp_path: Path) -> None:
    # Negative control: one digit of one stored output changed; the sanitize file must not
    # hide it.
    damaged = tmp_path / "damaged"
    (damaged / "notebooks").mkdir(parents=True)
    notebook = nbformat.read(tiny_run / "notebooks" / "01_data.ipynb", as_version=4)
    changed = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("name") == "stdout" and " training and " in output.text:
                output.text = re.sub(r"^(\d+)", lambda m: str(int(m[1]) + 1), output.text)
                changed += 1
    assert changed == 1
    nbformat.write(notebook, damaged / "notebooks" / "01_data.ipynb")
    completed = rerun.rerun_notebooks(damaged, tmp_path / "rerun")
    assert completed.returncode != 0
    assert "1 failed" in completed.stdout


def test_a_folder_without_notebooks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="holds no executed stage notebook"):
        rerun.executed_notebooks(tmp_path)


@pytest.mark.slow
def test_rerun_passes_when_the_notebooks_hold_progress_drawn_at_other_moments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The data and training stages with their progress bars written into the notebooks: the
    # rerun draws them at other moments (other rates, frames and padding) and must still pass.
    monkeypatch.setenv(CHANNEL, "stderr")
    run_dir = pipeline.run("tiny", stages=["01_data", "02_train"],
                           overrides=tiny_overrides(tmp_path), progress=False)
    stored = "".join(output.get("text", "")
                     for path in rerun.executed_notebooks(run_dir)
                     for cell in nbformat.read(path, as_version=4).cells
                     for output in cell.get("outputs", []) if output.get("name") == "stderr")
    assert "decoding videos" in stored and "epoch 2/2" in stored and "\r" in stored
    completed = rerun.rerun_notebooks(run_dir, tmp_path / "rerun")
    assert completed.returncode == 0, completed.stdout[-4000:]
