"""The book's page "What this build found": conclusions in words, generated from the run folder.

:func:`findings_markdown` reads the tables the stages wrote (every one optional: a stage that
did not run gives a sentence that says so) and glues the sentences of
:mod:`lib.analysis.conclusions`: does the margin grow or shrink over training, does the
loss-adaptive schedule do what the paper says, what holds across trained models, why attacks
fail, and what the numbers cannot say. Claims tables that other stages add
(:func:`lib.run.tables.claim_tables`) are summarised too. No number is typed: a rebuild that
changes a table changes the page. :func:`write_findings` writes it for the book
(:func:`lib.run.book.prepare_book` calls it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lib import io
from lib.analysis import conclusions
from lib.analysis.minimality_norms import closeness_verdict
from lib.run import layout, tables
from lib.run.layout import ATTACK_STAGE, DATA_STAGE
from lib.run.manifest import read_manifest

#: The page's file name inside the book's generated folder; ``_toc.yml`` lists it.
PAGE = "findings.md"
#: Words that pick the paper's claims on the loss-adaptive schedule's distances out of the
#: results chapter's claims table.
ADAPTIVE_CLAIM = ("loss-adaptive", "smaller")


def _parameters(manifest: dict[str, Any], stage: str) -> dict[str, Any]:
    return manifest.get("stages", {}).get(stage, {}).get("parameters", {})


def _limitations(run_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> str:
    data = _parameters(manifest, DATA_STAGE)
    attack = _parameters(manifest, ATTACK_STAGE)
    job = (tables.read_record(run_dir, "job", missing_ok=True) or {}).get("settings", attack)
    results = tables.read_table(run_dir, "results", missing_ok=True)
    sweep = tables.read_sweep(run_dir)
    reference = tables.read_table(run_dir, "reference", missing_ok=True)
    models = (int(results["model"].nunique()) if results is not None
              and "model" in results.columns else 1)
    pairs = (int(reference.drop_duplicates(["epoch", "image_id", "target"]).shape[0])
             if reference is not None else None)
    return conclusions.limitations_paragraph(
        data_kind=data.get("dataset_kind", "unknown"), image_size=int(data.get("image_size", 0)),
        models=models, per_class=int(job.get("n_per_class", 0)),
        epochs=sorted(results["epoch"].unique()) if results is not None else [],
        max_iter=int(job.get("max_iter", 0)), lr0=float(job.get("lr0", 0.0)),
        sweep_images=int(sweep["image_id"].nunique()) if sweep is not None else 0,
        pairs=pairs)


def _minimality(run_dir: str | os.PathLike[str]) -> str:
    ratios = tables.read_table(run_dir, "ratios", missing_ok=True)
    if ratios is None or "norm" not in ratios.columns:
        return conclusions.minimality_paragraph(None, {})
    last = int(ratios["epoch"].max())
    verdicts = {norm: closeness_verdict(ratios, "loss-adaptive", epoch=last, norm=norm)
                for norm in ratios["norm"].unique()}
    return conclusions.minimality_paragraph(ratios, verdicts)


def _other_claims(run_dir: str | os.PathLike[str]) -> list[str]:
    """A paragraph per claims table of a stage other than the analysis stage (whose claims the
    sections above state)."""
    found = {key: table for key, table in tables.claim_tables(run_dir).items()
             if key[0] != layout.STAGE_OUTPUTS[layout.ANALYSIS_STAGE]}
    stage_of = {folder: stage for stage, folder in layout.STAGE_OUTPUTS.items()}
    return [conclusions.claims_paragraph(
                table, source=f"{{doc}}`{stage_of[folder]}` (`{folder}/{name}.csv`)")
            for (folder, name), table in sorted(found.items())]


def findings_markdown(run_dir: str | os.PathLike[str]) -> str:
    """The page "What this build found" for the run folder ``run_dir`` (Markdown)."""
    manifest = read_manifest(run_dir)
    change = tables.read_table(run_dir, "margin_change", missing_ok=True)
    matched = tables.read_table(run_dir, "matched_success", missing_ok=True)
    claims = tables.read_analysis_table(run_dir, "paper_claims", missing_ok=True)
    ran = sorted(manifest.get("stages", {}))
    sections = [
        "# What this build found",
        "Every sentence on this page is written from the tables of this build's run folder "
        "when the book is built; a rebuild with other data, settings or seeds rewrites it. A "
        "verdict is read off a 95 % interval: it agrees or disagrees only when the whole "
        "interval lies on one side, and is inconclusive otherwise. Stages run: "
        f"{', '.join(ran) or 'none'}.",
        "## Does the margin grow or shrink while the network learns?",
        conclusions.margin_paragraph(change),
        "The margins chapter, {doc}`07_margins`, draws the robust-accuracy curves and every "
        "image's margin.",
        "## Does the loss-adaptive schedule do what the paper says?",
        conclusions.fair_paragraph(matched),
        conclusions.claim_sentence(claims, ADAPTIVE_CLAIM),
        conclusions.sweep_claim_sentence(
            tables.read_analysis_table(run_dir, "claims_lr0", missing_ok=True), ADAPTIVE_CLAIM),
        conclusions.claims_paragraph(claims, source="the results chapter (the paper's claims,"
                                                    " on successful attacks)"),
        _minimality(run_dir),
        "## What holds across trained models",
        conclusions.models_paragraph(change),
        *_other_claims(run_dir),
        "## Why attacks fail",
        conclusions.failure_paragraph(
            tables.read_table(run_dir, "failure_outcomes", missing_ok=True),
            tables.read_table(run_dir, "rescued_by_outcome", missing_ok=True),
            tables.read_table(run_dir, "frozen_gradients", missing_ok=True)),
        "## What these numbers cannot say",
        _limitations(run_dir, manifest),
    ]
    return "\n\n".join(part for part in sections if part) + "\n"


def write_findings(run_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write :func:`findings_markdown` of ``run_dir`` to ``path`` (atomically); its path."""
    path = Path(path)
    io.write_text(path, findings_markdown(run_dir))
    return path
