"""The book's generated files: executed notebooks, parameter and bad-input tables, vega scripts.

:func:`prepare_book` (``python -m lib.run.pipeline book``) hands a profile's executed notebooks to
the book and writes the pages the chapters include: :func:`parameters_markdown` (every stage's
papermill parameters) and :func:`bad_inputs_markdown` (the bad-input matrix of
``tests/bad_inputs.yaml``), and the vega scripts for offline charts
(:func:`write_vega_scripts`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lib import io
from lib.errors import RunFolderError
from lib.run.chapters import present_notebook
from lib.run.findings import PAGE, write_findings
from lib.run.layout import (
    ANALYSIS_STAGE,
    MARGINS_STAGE,
    REPO,
    STAGES,
    executed_notebook,
    notebook_path,
    stage_dir,
)
from lib.run.parameters import (
    RuntimeSettings,
    load_profile,
    load_profile_spec,
    parameter_table,
)

STATIC_DIR = REPO / "_static"


# --------------------------------------------------------------------------- book


def write_vega_scripts(static_dir: Path = STATIC_DIR) -> list[Path]:
    """Write the vega, vega-lite and vega-embed JavaScript for offline charts in the book.

    Both files come from the installed packages, so they match altair's versions: the bundle
    from ``vl_convert.javascript_bundle`` (wrapped in a function scope so its top-level
    declarations cannot clash with the page's other scripts) and ``VEGA_DEBUG``, which tells
    altair's chart loader that these versions are present and need no download.
    """
    import altair as alt
    import vl_convert

    minor = ".".join(alt.VEGALITE_VERSION.split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=minor)
    versions = (
        "var VEGA_DEBUG = {"
        f'vega_version: "{alt.VEGA_VERSION}", '
        f'vegalite_version: "{alt.VEGALITE_VERSION}", '
        f'vegaembed_version: "{alt.VEGAEMBED_VERSION}"'
        "};\n"
    )
    bundle_path = static_dir / "vega-bundle.js"
    versions_path = static_dir / "vega-versions.js"
    io.write_text(bundle_path, "(function(){\n" + bundle + "\n})();\n")
    io.write_text(versions_path, versions)
    return [versions_path, bundle_path]


def parameters_markdown() -> str:
    """One Markdown table per stage: every parameter, its default and its meaning
    (:func:`lib.run.parameters.parameter_table`)."""
    parts = []
    for stage in STAGES:
        if not notebook_path(stage).exists():
            continue
        parts.append(f"### {stage}\n\n| parameter | default | meaning |\n|---|---|---|")
        for name, default, meaning in parameter_table(stage):
            meaning = meaning.replace("|", "\\|")
            parts.append(f"| `{name}` | `{default!r}` | {meaning} |")
        parts.append("")
    return "\n".join(parts) + "\n"


BAD_INPUTS_FILE = REPO / "tests" / "bad_inputs.yaml"


def bad_input_cases(path: Path = BAD_INPUTS_FILE) -> list[dict[str, Any]]:
    """The cases of the bad-input matrix (``tests/bad_inputs.yaml``), in file order."""
    return yaml.safe_load(path.read_text())["cases"]


def _table_cell(text: str, *, code: bool = False) -> str:
    text = str(text).replace("|", "\\|")
    return f"`{text}`" if code else text


def _bad_input_row(case: Mapping[str, Any]) -> str:
    name = case["input"]
    looks_like_code = ":" in name or name.startswith("-")
    if case.get("outcome", "error") == "error":
        seen = "stops; the message says " + " … ".join(
            _table_cell(f, code=True) for f in case["expect"])
    else:
        seen = "runs; " + " ".join(_table_cell(f) for f in case["expect"])
    how = case.get("checked_by", "stage command")
    return (f"| {_table_cell(name, code=looks_like_code)} | {_table_cell(case['bad'])} | "
            f"{seen} | {how} |")


def bad_inputs_markdown(path: Path = BAD_INPUTS_FILE) -> str:
    """The bad-input matrix as one Markdown table: a row per case of ``tests/bad_inputs.yaml``."""
    rows = [_bad_input_row(case) for case in bad_input_cases(path)]
    header = "| input | bad value | what happens | checked by |\n|---|---|---|---|"
    return "\n".join([header, *rows]) + "\n"


def _skipped_stage_notebook(stage: str, profile: str) -> Any:
    import nbformat

    text = (
        f"# {stage}: not run in this build\n\n"
        f"The profile `{profile}` does not run this stage. Run it with "
        f"`make stage STAGE={stage} PROFILE={profile}` and build the book again."
    )
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)])


def prepare_book(profile: str, *, run_dir: str | Path | None = None,
                 book_root: Path = REPO) -> None:
    """Hand the profile's executed notebooks to the book (``<book_root>/book/executed/``).

    Also writes the page of conclusions (``findings.md``, :mod:`lib.run.findings`), the
    generated pages the chapters include (``parameters.md``, ``bad_inputs.md``) and the vega
    scripts for offline charts (``<book_root>/_static/``). A stage the profile skipped gets a
    one-paragraph page that says so; a stage that should have run and did not is an error.
    ``run_dir`` replaces the profile's run folder (the tests build a book from a temporary run).
    """
    import nbformat

    plan = load_profile(profile)
    skipped = set(load_profile_spec(profile).get("skip") or [])
    executed_dir = Path(book_root) / "book" / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if not notebook_path(stage).exists():
            continue
        target = executed_dir / f"{stage}.ipynb"
        if stage in skipped:
            nbformat.write(_skipped_stage_notebook(stage, profile), target)
            continue
        stage_run = Path(run_dir or plan[stage].get("run_dir")
                         or RuntimeSettings.run_dir)
        executed = executed_notebook(stage_run, stage)
        if not executed.exists():
            raise RunFolderError(
                f"no executed notebook {executed}; run the stages first "
                f"(make stages PROFILE={profile})"
            )
        # the parameters once, as a table, in place of papermill's two code cells
        nbformat.write(present_notebook(nbformat.read(executed, as_version=4), stage), target)
        # the chapters link the stage's tables as downloads, relative to the notebook
        output = stage_dir(stage_run, stage)
        tables = sorted(output.glob("*.csv")) if stage in (ANALYSIS_STAGE, MARGINS_STAGE) else []
        if tables:
            shutil.rmtree(executed_dir / output.name, ignore_errors=True)
            (executed_dir / output.name).mkdir(parents=True)
            for table in tables:
                shutil.copyfile(table, executed_dir / output.name / table.name)
    write_findings(Path(run_dir or plan[ANALYSIS_STAGE].get("run_dir") or RuntimeSettings.run_dir),
                   executed_dir / PAGE)
    io.write_text(executed_dir / "parameters.md", parameters_markdown())
    io.write_text(executed_dir / "bad_inputs.md", bad_inputs_markdown())
    write_vega_scripts(Path(book_root) / "_static")
