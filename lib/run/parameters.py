"""A stage's parameters: their names and defaults, profiles, and the one merge of both.

A stage's parameters are the notebook's defaults, then the profile's values
(``profiles/<name>.yaml``), then the command line's (:func:`merged_parameters`, with values
read by :func:`parse_value`).
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lib.errors import ParameterError, first_line
from lib.run.layout import REPO, STAGES, notebook_path

PROFILE_DIR = REPO / "profiles"


#: Parameters that change how a stage runs but not what it computes; they are neither
#: recorded in the manifest nor compared when a stage continues in a run folder.
RUNTIME_PARAMETERS = frozenset({"run_dir", "device", "workers", "overwrite", "progress"})


def notebook_defaults(stage: str) -> dict[str, Any]:
    """The names and default values of the ``parameters`` cell of ``stage``'s notebook.

    The cell must hold only assignments of literals (``name = 1  # comment``), which is what
    papermill can override.
    """
    path = notebook_path(stage)
    return copy.deepcopy(_parse_defaults(path, path.stat().st_mtime_ns))


def _parameters_cell(path: Path) -> str:
    import jupytext  # reading a script with jupytext takes a noticeable time

    notebook = jupytext.read(path)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(
            f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}"
        )
    return cells[0].source


@functools.lru_cache(maxsize=32)
def _parse_defaults(path: Path, mtime_ns: int) -> dict[str, Any]:
    # cached per file version
    defaults: dict[str, Any] = {}
    for node in ast.parse(_parameters_cell(path)).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ParameterError(
                f"{path}: the parameters cell may hold only `name = literal` lines"
            )
        defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def check_parameter_types(stage: str, values: Mapping[str, Any]) -> None:
    """Raise ParameterError for a name the stage does not have or a value of the wrong type.

    A value must have the type of the notebook's default; an int is accepted where a float is
    expected, and a parameter whose default is None accepts anything.
    """
    defaults = notebook_defaults(stage)
    for name, value in values.items():
        if name not in defaults:
            raise ParameterError(
                f"stage {stage} has no parameter {name!r}; its parameters are "
                f"{', '.join(sorted(defaults))}"
            )
        default = defaults[name]
        if default is None or value is None and name in RUNTIME_PARAMETERS:
            continue
        expected = type(default)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ParameterError(
                f"stage {stage}, parameter {name!r}: expected {expected.__name__} "
                f"(like the default {default!r}), got {_type_name(value)} {value!r}; "
                f"write it like the default, e.g. -p {name} {command_line_value(default)}"
            )


def command_line_value(value: Any) -> str:
    """``value`` as it is typed after ``-p name`` (YAML, quoted for the shell when needed)."""
    if isinstance(value, str):
        text = value if value and yaml.safe_load(value) == value else json.dumps(value)
    elif isinstance(value, bool):
        text = str(value)
    else:
        text = json.dumps(value)
    return shlex.quote(text)


def parse_value(name: str, text: str) -> Any:
    """A command-line parameter value read as YAML (papermill's ``-y`` rules): 3 is an int,
    0.5 a float, true a bool, [a, b] a list, anything else a string.

    Raises:
        ParameterError: the text is not a plain YAML value (a tag such as ``!!python/object``
            is refused, never run: safe_load builds only plain values).
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParameterError(
            f"-p {name}: {text!r} is not a plain value ({first_line(error)}); give a "
            "number, true/false, a string or a [list]"
        ) from None


def stage_parameters(stage: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The current values of ``stage``'s parameters, read from a notebook's ``globals()``."""
    return {name: namespace[name] for name in notebook_defaults(stage)}


def parameter_table(stage: str) -> list[tuple[str, Any, str]]:
    """``(name, default, comment)`` for each line of ``stage``'s parameters cell."""
    defaults = notebook_defaults(stage)
    rows = []
    for line in _parameters_cell(notebook_path(stage)).splitlines():
        name = line.split("=", 1)[0].strip()
        if name in defaults:
            comment = line.split("#", 1)[1].strip() if "#" in line else ""
            rows.append((name, defaults[name], comment))
    return rows


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile_spec(name: str) -> dict[str, Any]:
    """The raw profile file: ``common``, ``stages`` and ``skip`` (stages this profile omits)."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParameterError(
            f"profile {name!r} does not exist (no profiles/{name}.yaml); "
            f"available profiles: {', '.join(available_profiles())}"
        )
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        # safe_load builds only plain values: a tag such as !!python/object is refused here,
        # never run.
        raise ParameterError(
            f"{path} is not a valid profile ({first_line(error)}); a profile holds plain "
            "values only: fix the file, or compare it with profiles/default.yaml"
        ) from None
    if not isinstance(spec, dict):
        raise ParameterError(
            f"{path}: expected a mapping with common, stages and skip; compare it with "
            "profiles/default.yaml"
        )
    unknown = set(spec) - {"common", "stages", "skip"}
    if unknown:
        raise ParameterError(
            f"{path}: unknown top-level keys {sorted(unknown)}; use common, stages, skip"
        )
    return spec


def load_profile(name: str) -> dict[str, dict[str, Any]]:
    """Parameters per stage for profile ``name``: ``common`` merged into every stage.

    A ``common`` key is given to every stage whose notebook has that parameter.
    """
    spec = load_profile_spec(name)
    common = spec.get("common") or {}
    stages = spec.get("stages") or {}
    for stage in stages:
        notebook_path(stage)
    profile = {}
    for stage in STAGES:
        defaults = notebook_defaults(stage) if notebook_path(stage).exists() else {}
        params = {k: v for k, v in common.items() if k in defaults}
        params.update(stages.get(stage) or {})
        profile[stage] = params
    return profile


def merged_parameters(
    stage: str,
    *,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    with_defaults: bool = False,
) -> dict[str, Any]:
    """A stage's parameters: (the notebook's defaults,) the profile's values, then
    ``overrides``; a name the notebook does not have or a value of the wrong type raises
    ParameterError.

    This is the one merge of defaults, profile and command line: the stage command and the
    torchrun launcher both use it.
    """
    values = notebook_defaults(stage) if with_defaults else {}
    if profile:
        values.update(load_profile(profile)[stage])
    values.update(overrides or {})
    check_parameter_types(stage, values)
    return values
