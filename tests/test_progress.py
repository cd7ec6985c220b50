"""Progress goes to the terminal that waits, never into a notebook (lib/progress.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lib import progress
from lib.progress import CHANNEL, message, progress_bar, relay
from lib.run.layout import REPO, executed_notebook

WORK = textwrap.dedent("""\
    from lib.progress import message, progress_bar, tracked
    with progress_bar(5, desc="work", unit="step") as bar:
        for _ in range(5):
            bar.update(postfix="loss=0.5")
    for _ in tracked(range(3), total=3, desc="second", leave=False):
        pass
    message("all done")
""")


def run_child(env_value: str | None,
              monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess:
    if env_value is None:
        monkeypatch.delenv(CHANNEL, raising=False)
    else:
        monkeypatch.setenv(CHANNEL, env_value)
    return subprocess.run([sys.executable, "-c", WORK], capture_output=True, text=True,
                          cwd=REPO, check=True)


def test_a_plain_script_shows_tqdm_bars_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    child = run_child(None, monkeypatch)
    assert "work: 100%" in child.stderr and "5/5" in child.stderr and "loss=0.5" in child.stderr
    assert "all done" in child.stderr
    assert child.stdout == ""


def test_off_shows_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    child = run_child("off", monkeypatch)
    assert child.stderr == "" and child.stdout == ""


def test_a_channel_receives_every_bar_and_message(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    channel = tmp_path / "progress.jsonl"
    child = run_child(str(channel), monkeypatch)
    assert child.stderr == ""
    records = [json.loads(line) for line in channel.read_text().splitlines()]
    closed = {r["desc"]: r for r in records if r.get("closed")}
    assert closed["work"]["n"] == 5 and closed["work"]["total"] == 5
    assert closed["work"]["postfix"] == "loss=0.5" and closed["work"]["unit"] == "step"
    assert closed["second"]["n"] == 3 and closed["second"]["leave"] is False
    assert {"message": "all done"} in records


def test_relay_draws_a_child_process_progress_on_this_terminal(
        capfd: pytest.CaptureFixture[str]) -> None:
    with relay() as channel:
        assert channel is not None
        subprocess.run([sys.executable, "-c", WORK], cwd=REPO, check=True)
    drawn = capfd.readouterr().err
    assert "work: 100%" in drawn and "5/5" in drawn and "loss=0.5" in drawn
    assert "all done" in drawn
    assert not channel.exists()  # the channel is removed with the relay


def test_relay_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHANNEL, "stderr")
    with relay() as channel:
        assert progress.destination() == channel
    assert progress.destination() == "stderr"
    with relay(enabled=False) as channel:
        assert channel is None and progress.destination() == "stderr"


def test_a_disabled_bar_shows_nothing(capfd: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHANNEL, "stderr")
    with progress_bar(3, desc="hidden", enabled=False) as bar:
        bar.update(3)
    message("hidden too", enabled=False)
    assert capfd.readouterr().err == ""


def test_a_notebook_kernel_without_a_channel_holds_no_progress(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHANNEL, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(WORK)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    NotebookClient(notebook, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(REPO)}}).execute()
    assert notebook.cells[0].outputs == []


@pytest.mark.slow
def test_the_stage_command_draws_progress_and_the_notebook_holds_none(tmp_path: Path) -> None:
    from tests.conftest import tiny_overrides

    overrides = [arg for name, value in tiny_overrides(tmp_path).items()
                 for arg in ("-p", name, value)]
    completed = subprocess.run(
        [sys.executable, "-m", "lib.run.pipeline", "run", "--profile", "tiny", "--stage", "01_data",
         *overrides], capture_output=True, text=True, cwd=REPO, check=True)
    assert "synthetic videos: 100%" in completed.stderr
    assert "decoding videos: 100%" in completed.stderr and "4/4" in completed.stderr
    notebook = nbformat.read(executed_notebook(tmp_path / "run", "01_data"), as_version=4)
    streams = "".join(output.get("text", "") for cell in notebook.cells
                      for output in cell.get("outputs", []) if output.output_type == "stream")
    assert "videos" in streams  # the stage's own report ...
    assert "%|" not in streams and "\r" not in streams  # ... but no progress bar
