"""What the book's chapters say about the build that made them, generated from the run.

- :func:`present_notebook`: an executed stage notebook as the book shows it. Papermill leaves
  two code cells of parameters (the notebook's defaults, then the values it injected); the
  book shows one table, "Parameters of this build", in their place, with each parameter's
  default and meaning from its owner (:func:`lib.run.parameters.parameter_table`).
- :func:`precision_sentence`: what a stage computed in on the machine that ran it, from the
  run folder's manifest, so no chapter states a precision that a build could contradict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import nbformat
import pandas as pd

from lib import TOOLS
from lib.run.manifest import read_manifest
from lib.run.parameters import parameter_table

#: Tags papermill gives the notebook's parameters cell and the cell it injects after it.
PARAMETER_TAGS = ("parameters", "injected-parameters")
#: The tag that keeps a cell, input and output, out of the book (myst-nb).
REMOVE_CELL = "remove-cell"
#: The CPU flags of native bfloat16 instructions, as the book names them.
INSTRUCTION_NAMES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def _cell(value: Any) -> str:
    return f"`{value!r}`".replace("|", "\\|")


def parameters_table(notebook: nbformat.NotebookNode, stage: str) -> str:
    """The Markdown of "Parameters of this build": every parameter of ``stage`` with the value
    its executed notebook ran with (injected by papermill, else the stage's default), who set
    it and what it means.

    Args:
        notebook: the stage's notebook as papermill executed it.
        stage: the stage it belongs to, e.g. ``"03_attack"``.
    """
    injected = notebook.metadata.get("papermill", {}).get("parameters", {})
    lines = [":::{dropdown} Parameters of this build", "",
             "The values this chapter ran with: set by the build (its profile and command "
             "line), or the stage's default.", "",
             "| parameter | value | set by | meaning |", "|---|---|---|---|"]
    for name, default, comment in parameter_table(stage):
        value = injected.get(name, default)
        source = "build" if name in injected and value != default else "default"
        lines.append(f"| `{name}` | {_cell(value)} | {source} | "
                     f"{comment.replace('|', chr(92) + '|')} |")
    return "\n".join([*lines, ":::"]) + "\n"


def present_notebook(notebook: nbformat.NotebookNode, stage: str) -> nbformat.NotebookNode:
    """``notebook`` (executed by papermill) as the book shows it: the parameters cell and
    papermill's injected cell removed, "Parameters of this build" (of ``stage``'s parameters)
    in their place.

    A notebook without a parameters cell is returned as it is.
    """
    shown = nbformat.from_dict(notebook)
    positions = [k for k, c in enumerate(shown.cells)
                 if set(PARAMETER_TAGS) & set(c.metadata.get("tags", []))]
    if not positions:
        return shown
    for k in positions:
        tags = shown.cells[k].metadata.setdefault("tags", [])
        if REMOVE_CELL not in tags:
            tags.append(REMOVE_CELL)
    shown.cells.insert(positions[0], nbformat.v4.new_markdown_cell(parameters_table(shown, stage)))
    return shown


def precision_sentence(run_dir: str | os.PathLike[str], stage: str,
                       parameters: Mapping[str, Any]) -> str:
    """In words, what ``stage`` computed its model forwards in on the machine that ran it
    (from the manifest's ``precision_used``, ``bfloat16_native`` and ``bfloat16_cpu_flags``).

    Args:
        run_dir: the run folder.
        stage: a stage with a ``precision`` parameter (02_train, 03_attack).
        parameters: the stage's parameters (``precision``, ``device``).
    """
    record = read_manifest(run_dir)["stages"][stage]
    used, asked = record["precision_used"], parameters["precision"]
    device = str(parameters.get("device", "cpu"))
    if device.startswith("cpu"):
        flags = record.get("bfloat16_cpu_flags") or []
        names = ", ".join(INSTRUCTION_NAMES.get(f, f) for f in flags)
        machine = (f"its CPU computes bfloat16 natively ({names})" if flags else
                   "its CPU has neither AMX nor AVX512-BF16, so bfloat16 would be emulated")
    else:
        machine = (f"{device} computes bfloat16 natively" if record.get("bfloat16_native")
                   else f"{device} does not compute bfloat16 natively")
    chosen = (f"precision {asked!r} chose {used}" if asked == "auto"
              else f"precision {asked!r}")
    return f"{used} ({chosen}; {machine})"


def checkpoints_sentence(predictions: pd.DataFrame, attacked: Sequence[int]) -> str:
    """Which trained checkpoints the attack stage attacked, and, for each one it left out, the
    tool it classified correctly least often (what a selection there would have had to work
    with).

    Args:
        predictions: one model's ``predictions.csv`` (epoch, image_id, label, predicted).
        attacked: the attacked epochs.
    """
    trained = sorted(int(e) for e in predictions["epoch"].unique())
    attacked = sorted(int(e) for e in attacked)
    left_out = [e for e in trained if e not in attacked]
    listed = _listing(attacked)
    if not left_out:
        return (f"This build attacked the checkpoint of every trained epoch "
                f"({listed}).")
    details = []
    for epoch in left_out:
        part = predictions[predictions["epoch"] == epoch]
        correct = (part["label"] == part["predicted"]).groupby(part["label"]).agg(["sum", "size"])
        label = int(correct["sum"].idxmin())
        details.append(f"epoch {epoch}, whose checkpoint classified "
                       f"{int(correct.loc[label, 'sum'])} of {int(correct.loc[label, 'size'])} "
                       f"{TOOLS[label]} test images correctly, the fewest of any tool")
    return (f"This build trained {len(trained)} epochs and attacked the checkpoints of epochs "
            f"{listed}. Left out: {'; '.join(details)}.")


def _listing(numbers: Sequence[int]) -> str:
    """``1``, ``1 and 2``, ``1, 3, 4 and 5``."""
    words = [str(n) for n in numbers]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
