"""A stage's parameters: their one owner per stage, profiles, and the one merge of the two.

Every stage has one settings class (:data:`STAGE_SETTINGS`), a frozen dataclass that holds the
only defaults of the stage's parameters (those of the default build) and their only value
checks; :class:`RuntimeSettings` declares the parameters that change how a stage runs but not
what it computes. A stage's parameters are its settings class's fields and the runtime
parameters it takes (:data:`STAGE_RUNTIME`); :func:`stage_defaults` gives their defaults and
:func:`parameter_table` their meanings (each class's ``Attributes`` section). The notebooks'
``parameters`` cells hold the same defaults as literals, which a test compares; nothing here
reads a notebook.

A *profile* (``profiles/<name>.yaml``) names the run folder and the values that differ from
the defaults; a stage's parameters are the defaults, then the profile's values, then the
command line's (:func:`merged_parameters`, with values read by :func:`parse_value`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from lib.analysis.settings import AnalysisSettings
from lib.attack.plan import AttackSettings
from lib.data.settings import DataSettings
from lib.errors import ParameterError, first_line
from lib.run.borderline_stage import BorderlineStageSettings
from lib.run.layout import (
    ANALYSIS_STAGE,
    ATTACK_STAGE,
    BORDERLINE_STAGE,
    DATA_STAGE,
    MARGINS_STAGE,
    MINIMALITY_STAGE,
    REPO,
    STAGES,
    TRAIN_STAGE,
    check_stage,
)
from lib.run.margins_stage import MarginSettings
from lib.run.minimality_stage import MinimalitySettings
from lib.train.settings import TrainSettings

PROFILE_DIR = REPO / "profiles"


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """How a stage runs, not what it computes: never recorded in the manifest, never compared
    when a stage runs again in its run folder.

    Attributes:
        run_dir: the run folder: this stage reads what the stages before it wrote there and
            writes its own subfolder.
        device: "cpu", "cuda" or "cuda:N".
        progress: a progress bar over the stage's work (on the terminal of the stage command).
        overwrite: discard this stage's results (and those of every later stage) if they were
            made with other parameters.
    """

    run_dir: str = "data/runs/default"
    device: str = "cpu"
    progress: bool = True
    overwrite: bool = False

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` for a device this machine does not have."""
        from lib.model.network import resolve_device

        resolve_device(self.device)


#: Each stage's settings class: the only defaults and value checks of its parameters.
STAGE_SETTINGS: dict[str, type] = {
    DATA_STAGE: DataSettings,
    TRAIN_STAGE: TrainSettings,
    ATTACK_STAGE: AttackSettings,
    ANALYSIS_STAGE: AnalysisSettings,
    MINIMALITY_STAGE: MinimalitySettings,
    BORDERLINE_STAGE: BorderlineStageSettings,
    MARGINS_STAGE: MarginSettings,
}
#: The runtime parameters each stage takes (a stage that trains or attacks needs a device).
STAGE_RUNTIME: dict[str, tuple[str, ...]] = {
    DATA_STAGE: ("run_dir", "overwrite"),
    TRAIN_STAGE: ("run_dir", "device", "overwrite"),
    ATTACK_STAGE: ("run_dir", "device", "progress", "overwrite"),
    ANALYSIS_STAGE: ("run_dir", "overwrite"),
    MINIMALITY_STAGE: ("run_dir", "device", "overwrite"),
    BORDERLINE_STAGE: ("run_dir", "device", "progress", "overwrite"),
    MARGINS_STAGE: ("run_dir", "device", "progress", "overwrite"),
}
#: Parameters that change how a stage runs but not what it computes: the runtime settings and
#: the settings fields marked runtime (``workers``). They are neither recorded in the manifest
#: nor compared when a stage continues in a run folder.
RUNTIME_PARAMETERS = frozenset(
    {f.name for f in dataclasses.fields(RuntimeSettings)}
    | {f.name for cls in STAGE_SETTINGS.values() for f in dataclasses.fields(cls)
       if f.metadata.get("runtime")}
)


# --------------------------------------------------------------------------- defaults


def plain(value: Any) -> Any:
    """A settings value as a parameter holds it: lists for tuples, dicts for mappings."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def settings_values(settings: Any) -> dict[str, Any]:
    """The fields of a settings object as plain parameter values, in field order."""
    return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def stage_defaults(stage: str) -> dict[str, Any]:
    """Every parameter of ``stage`` with its default: ``run_dir``, the settings class's
    fields, then the stage's other runtime parameters.

    Raises:
        ParameterError: an unknown stage.
    """
    return copy.deepcopy(_defaults(check_stage(stage)))


@functools.cache
def _defaults(stage: str) -> dict[str, Any]:
    runtime = settings_values(RuntimeSettings())
    names = STAGE_RUNTIME[stage]
    defaults = {"run_dir": runtime["run_dir"]} if "run_dir" in names else {}
    defaults |= settings_values(STAGE_SETTINGS[stage]())
    defaults |= {name: runtime[name] for name in names if name != "run_dir"}
    return defaults


def optional_parameters(stage: str) -> set[str]:
    """The parameters of ``stage`` that also accept None (their type says ``| None``)."""
    return {f.name for f in dataclasses.fields(STAGE_SETTINGS[check_stage(stage)])
            if "None" in str(f.type)}


def attribute_docs(cls: type) -> dict[str, str]:
    """``{name: meaning}`` from the ``Attributes:`` section of ``cls``'s docstring, each
    meaning on one line."""
    docs: dict[str, str] = {}
    section = inspect.cleandoc(cls.__doc__ or "").partition("Attributes:")[2]
    name = None
    for line in section.splitlines():
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            name, text = entry.groups()
            docs[name] = text.strip()
        elif name and line.startswith("        "):
            docs[name] += " " + line.strip()
        elif line.strip():
            break
    return docs


def parameter_table(stage: str) -> list[tuple[str, Any, str]]:
    """``(name, default, meaning)`` for every parameter of ``stage``, in the order of
    :func:`stage_defaults`."""
    meanings = attribute_docs(RuntimeSettings) | attribute_docs(STAGE_SETTINGS[check_stage(stage)])
    return [(name, default, meanings.get(name, ""))
            for name, default in stage_defaults(stage).items()]


def from_namespace(stage: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The current values of ``stage``'s parameters, read from a notebook's ``globals()``
    (its parameters cell, as papermill left it)."""
    return {name: namespace[name] for name in stage_defaults(stage)}


def complete_parameters(stage: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters`` with the default of every parameter not given."""
    return {**stage_defaults(stage), **parameters}


def stage_settings(stage: str, parameters: Mapping[str, Any]) -> Any:
    """The settings object of ``stage`` (e.g. an :class:`~lib.attack.plan.AttackSettings`)
    made from ``parameters``: the one conversion, which checks every value.

    Runtime parameters are left out; parameters not given take their defaults.

    Raises:
        ParameterError: a name the stage does not have (a misspelt parameter never passes
            silently), or a bad value.
    """
    known = stage_defaults(stage)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ParameterError(
            f"stage {stage} has no parameter(s) {', '.join(unknown)}; its parameters are "
            f"{', '.join(sorted(known))}"
        )
    cls = STAGE_SETTINGS[stage]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in parameters.items() if name in fields})


def check_runtime(parameters: Mapping[str, Any]) -> None:
    """The values of the runtime parameters given (the device exists on this machine)."""
    names = {f.name for f in dataclasses.fields(RuntimeSettings)}
    RuntimeSettings(**{k: v for k, v in parameters.items() if k in names}).check()


# --------------------------------------------------------------------------- types


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _declared_type(stage: str, name: str) -> type:
    """The type a parameter whose default is None takes otherwise (``float | None``: float)."""
    declared = {f.name: str(f.type) for f in dataclasses.fields(STAGE_SETTINGS[stage])}
    return next((kind for kind in (float, int, str) if kind.__name__ in declared.get(name, "")),
                type(None))


def check_parameter_types(stage: str, values: Mapping[str, Any]) -> None:
    """Raise ParameterError for a name the stage does not have or a value of the wrong type.

    A value must have the type of the default; an int is accepted where a float is expected,
    and a parameter whose type says ``| None`` (or a runtime parameter) accepts None.
    """
    defaults = stage_defaults(stage)
    optional = optional_parameters(stage)
    for name, value in values.items():
        if name not in defaults:
            raise ParameterError(
                f"stage {stage} has no parameter {name!r}; its parameters are "
                f"{', '.join(sorted(defaults))}"
            )
        default = defaults[name]
        if value is None and (name in optional or name in RUNTIME_PARAMETERS):
            continue
        expected = type(default) if default is not None else _declared_type(stage, name)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ParameterError(
                f"stage {stage}, parameter {name!r}: expected {expected.__name__}"
                f"{' or None' if name in optional else ''} (like the default {default!r}), "
                f"got {_type_name(value)} {value!r}; write it like the default, e.g. "
                f"-p {name} {command_line_value(default)}"
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


# --------------------------------------------------------------------------- profiles


def available_profiles() -> list[str]:
    """The names of ``profiles/*.yaml``."""
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

    A ``common`` key is given to every stage that has that parameter.
    """
    spec = load_profile_spec(name)
    common = spec.get("common") or {}
    stages = spec.get("stages") or {}
    for stage in stages:
        check_stage(stage)
    profile = {}
    for stage in STAGES:
        defaults = stage_defaults(stage)
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
    """A stage's parameters: (the defaults,) the profile's values, then ``overrides``; a name
    the stage does not have or a value of the wrong type raises ParameterError.

    This is the one merge of defaults, profile and command line: the stage command and the
    torchrun launcher both use it.
    """
    values = stage_defaults(stage) if with_defaults else {}
    if profile:
        values.update(load_profile(profile)[stage])
    values.update(overrides or {})
    check_parameter_types(stage, values)
    return values
