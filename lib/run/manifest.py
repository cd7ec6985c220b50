"""The run folder's manifest: the parameters, package versions and state of every stage run there.

``manifest.json`` holds, per stage, the parameters it ran with (all but the runtime ones), the
package versions, the precision it computed in, when it started and whether it finished.
:func:`record_start` refuses nothing (the checks of :mod:`lib.run.checks` come first) but
discards a stage's earlier results, and those of every later stage, when they were made with
other parameters.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.run import tables
from lib.run.layout import STAGES, stage_dir
from lib.run.lock import hold_run_folder, remove_leftovers
from lib.run.parameters import RUNTIME_PARAMETERS

#: Packages whose versions each stage records in the manifest.
RECORDED_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "av", "altair")


def package_versions() -> dict[str, str]:
    """Python's and each recorded package's version ("not installed" when absent)."""
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run folder's manifest (``{"stages": {}}`` for a new folder)."""
    return tables.read_record(run_dir, "manifest", missing_ok=True) or {"stages": {}}


def differing_parameters(recorded: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for every parameter whose value differs (or exists on one side)."""
    lines = []
    for name in sorted(set(recorded) | set(asked)):
        if recorded.get(name, "<absent>") != asked.get(name, "<absent>"):
            lines.append(
                f"  {name}: run folder has {recorded.get(name, '<absent>')!r}, "
                f"now {asked.get(name, '<absent>')!r}"
            )
    return lines


def used_precision(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``{"precision_used": "float32" | "bfloat16", "bfloat16_native": bool,
    "bfloat16_cpu_flags": [...]}``: what a stage with a ``precision`` parameter computes in on
    its device ("auto" resolved), whether the device computes bfloat16 natively and, on a CPU,
    which of the instructions that do so it has; ``{}`` for other stages. The manifest
    records it beside the package versions: it describes the machine, not a parameter, so it
    is never compared when a stage runs again."""
    if "precision" not in parameters:
        return {}
    from lib.model import precision  # torch: only for the stages that have the parameter

    device = parameters.get("device", "cpu")
    flags = (sorted(precision.cpu_flags() & set(precision.BF16_CPU_FLAGS))
             if str(device).startswith("cpu") else [])
    return {"precision_used": precision.resolve(parameters["precision"], device),
            "bfloat16_native": precision.bf16_is_fast(device), "bfloat16_cpu_flags": flags}


def recorded_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a manifest records: all but the runtime ones."""
    return {k: v for k, v in parameters.items() if k not in RUNTIME_PARAMETERS}


def record_start(stage: str, run_dir: str | os.PathLike[str],
                 parameters: Mapping[str, Any]) -> Path:
    """Record ``stage`` as started with ``parameters`` in the manifest; return its folder.

    When the stage ran before with other parameters, its results and those of every later
    stage are removed first. The caller has checked the folder (``lib.run.checks``).
    """
    run_dir = Path(run_dir)
    with hold_run_folder(run_dir, stage):
        manifest = read_manifest(run_dir)
        recorded = manifest.setdefault("stages", {})
        asked = recorded_parameters(parameters)
        previous = recorded.get(stage)
        if previous is not None and previous["parameters"] != asked:
            for later in STAGES[STAGES.index(stage):]:
                shutil.rmtree(stage_dir(run_dir, later), ignore_errors=True)
                recorded.pop(later, None)
        recorded[stage] = {
            "parameters": asked,
            "versions": package_versions(),
            **used_precision(parameters),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "finished": False,
        }
        remove_leftovers(stage_dir(run_dir, stage))
        tables.write_record(run_dir, "manifest", manifest)
        out = stage_dir(run_dir, stage)
        out.mkdir(exist_ok=True)
    return out


def record_finish(stage: str, run_dir: str | os.PathLike[str]) -> None:
    """Mark ``stage`` finished in the manifest (later stages require it)."""
    with hold_run_folder(run_dir, stage):
        manifest = read_manifest(run_dir)
        manifest["stages"][stage]["finished"] = True
        tables.write_record(run_dir, "manifest", manifest)
