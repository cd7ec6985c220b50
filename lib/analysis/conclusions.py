"""Conclusions in words, written from computed tables: every number and verdict in a sentence
comes from a table of the run, so a rebuild that changes a number changes the sentence.

Each function takes the tables of one question and returns Markdown: the margin over training
(:func:`margin_paragraph`), the schedules at matched success (:func:`fair_paragraph`), the
paper's claims (:func:`claims_paragraph`), minimality per norm
(:func:`minimality_paragraph`), why attacks fail (:func:`failure_paragraph`) and what holds
across trained models (:func:`models_paragraph`). A table that is absent (its stage did not
run) gives a sentence that says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib.analysis import statistics
from lib.analysis.margins import BEST_KNOWN, BEST_OF_SCHEDULES, NORM_NAMES, NORMS, POOLED

#: Grey levels: Linf and L1 are written x 255 ("3.2/255"), L2 in [0, 1] pixel units.
GREY_NORMS = ("linf", "l1")


def distance_text(value: float, norm: str) -> str:
    """A distance as the book writes it: "3.25/255" (Linf, L1) or "1.42" (L2); "none found"
    for ``inf``."""
    if not np.isfinite(value):
        return "none found" if value == np.inf else "-"
    return f"{value * 255:.3g}/255" if norm in GREY_NORMS else f"{value:.3g}"


def counted(n: int, noun: str) -> str:
    """"1 model", "3 models"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def interval_text(estimate: float, low: float, high: float, *, digits: int = 3,
                  scale: float = 1.0, unit: str = "") -> str:
    """"estimate [low, high]" with ``digits`` significant digits (``scale`` applied first);
    "-" without an estimate."""
    if np.isnan(estimate):
        return "-"

    def one(value: float) -> str:
        if np.isnan(value):
            return "?"
        if np.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value * scale:.{digits}g}{unit}"

    return f"{one(estimate)} [{one(low)}, {one(high)}]"


def _direction_words(direction: str) -> str:
    return {"grows": "grows", "shrinks": "shrinks"}.get(
        direction, "changes by an amount the interval does not decide (inconclusive)")


def _single(table: pd.DataFrame) -> pd.DataFrame:
    """The rows to state: the pooled rows where several models were compared, else the one
    model's rows."""
    pooled = table[table["model"].astype(str) == POOLED]
    return pooled if len(pooled) else table


def _factor(row: pd.Series) -> str:
    """A margin change's factor with its interval."""
    return interval_text(row["factor"], row["factor_low"], row["factor_high"])


def _change_row(change: pd.DataFrame, *, norm: str, mode: str, method: str) -> pd.Series | None:
    rows = _single(change)
    rows = rows[(rows["norm"] == norm) & (rows["mode"] == mode) & (rows["method"] == method)]
    return None if rows.empty else rows.iloc[0]


def margin_paragraph(change: pd.DataFrame | None) -> str:
    """The answer to "does the margin grow or shrink while the network learns?".

    Args:
        change: the margins stage's ``margin_change`` table
            (:func:`lib.analysis.margins.margin_change` rows with a ``mode`` column), or None.
    """
    if change is None or change.empty:
        return ("The margins stage did not run in this build, so the margin over training is "
                "not measured.")
    main = _change_row(change, norm="linf", mode="targeted", method=BEST_OF_SCHEDULES)
    if main is None:
        return "No image was attacked at two checkpoints, so no margin change is measured."
    epochs = (f"from epoch {int(main['first_epoch'])} to epoch {int(main['last_epoch'])}"
              if np.isfinite(main["first_epoch"]) else "from each model's first to its last "
              "attacked checkpoint")
    text = [
        f"{epochs.capitalize()}, the median Linf margin (an image's smallest targeted distance "
        f"over every target and schedule, at the boundary) of the "
        f"{counted(int(main['n_images']), 'image')} attacked at both ends went from "
        f"{distance_text(main['median_first'], 'linf')} to "
        f"{distance_text(main['median_last'], 'linf')}. Paired image by image, the margin "
        f"is multiplied by {_factor(main)} (median factor, 95 % interval; "
        f"{counted(int(main['n_models']), 'model')}, {int(main['n_attacks'])} attacks): the "
        f"Linf margin {_direction_words(main['direction'])}."]
    others = []
    for norm in NORMS[1:]:
        row = _change_row(change, norm=norm, mode="targeted", method=BEST_OF_SCHEDULES)
        if row is not None:
            others.append(f"{NORM_NAMES[norm]} {_factor(row)} ({row['direction']})")
    if others:
        text.append("In the other norms the factor is " + "; ".join(others) + ".")
    for mode, method, words in (("untargeted", BEST_OF_SCHEDULES, "the untargeted borderline "
                                 "distance"), ("any", BEST_KNOWN, "the best-known distance "
                                 "(every attack of the run, reference attacks included)")):
        row = _change_row(change, norm="linf", mode=mode, method=method)
        if row is not None and int(row["n_images"]) > 0:
            text.append(f"For {words} the Linf factor is {_factor(row)} "
                        f"({row['direction']}, {counted(int(row['n_images']), 'image')}).")
    return " ".join(text)


def fair_paragraph(matched: pd.DataFrame | None, *, name: str = "loss-adaptive") -> str:
    """The claim "``name`` finds closer borderline images", decided at matched success.

    Args:
        matched: the margins stage's ``matched_success`` table
            (:func:`lib.analysis.pareto.closer_at_matched_success` rows with ``model``), or
            None (no lr0 sweep).
    """
    if matched is None or matched.empty:
        return (f"The run has no lr0 sweep with {name} and its comparison schedules, so the "
                "comparison at matched success is not made.")
    rows = _single(matched)
    others = " and ".join(dict.fromkeys(rows["second"]))
    levels = " and ".join(f"{100 * v:.0f} %" for v in sorted(rows["level"].unique()))
    first = rows.iloc[0]
    parts = []
    for norm in [n for n in NORMS if n in set(rows["norm"])]:
        part = rows[rows["norm"] == norm]
        decisive = part[part["decisive"].astype(bool)].iloc[0]
        grey = norm in GREY_NORMS
        difference = interval_text(decisive["estimate"], decisive["low"], decisive["high"],
                                   scale=255.0 if grey else 1.0, unit="/255" if grey else "")
        parts.append(
            f"{NORM_NAMES[norm]}: **{part['claim_verdict'].iloc[0]}** (deciding comparison: "
            f"{name} minus {decisive['second']} at {100 * decisive['level']:.0f} % success = "
            f"{difference})")
    return (f"Compared where every schedule reaches the same success rate across the lr0 sweep "
            f"({levels}; the smallest median distance of the successes among the lr0 values "
            f"that reach it), the claim that {name} finds closer borderline images than "
            f"{others} is, per norm: " + "; ".join(parts) + f". Behind it: "
            f"{counted(int(first['n_images']), 'image')}, "
            f"{counted(int(first['n_models']), 'model')}, {len(rows)} paired comparisons, each "
            "of which must agree for the claim to agree.")


def claims_paragraph(claims: pd.DataFrame | None, *, source: str = "the results chapter"
                     ) -> str:
    """How many claims of a claims table agree, disagree or stay inconclusive, and which.

    Args:
        claims: a table with ``claim`` and ``verdict`` (e.g. the analysis stage's
            ``paper_claims``), or None.
        source: the chapter that checks them, for the sentence.
    """
    if claims is None or claims.empty:
        return f"No claims table from {source} in this build."
    count = claims["verdict"].value_counts()
    named = {v: [str(c) for c in claims.loc[claims["verdict"] == v, "claim"]]
             for v in statistics.VERDICTS}
    text = (f"Of {counted(len(claims), 'claim')} checked in {source}: "
            f"{count.get(statistics.AGREES, 0)} agree, {count.get(statistics.DISAGREES, 0)} "
            f"disagree, {count.get(statistics.INCONCLUSIVE, 0)} inconclusive.")
    if named[statistics.DISAGREES]:
        text += " Disagreeing: " + "; ".join(named[statistics.DISAGREES]) + "."
    return text


def _units(row: pd.Series) -> str:
    """The units behind a claims-table row: images and models (with the attacks) where the
    table gives them, else its ``n`` of what it ``counted``."""
    if "images" in row.index and pd.notna(row.get("images")):
        text = f"{counted(int(row['images']), 'image')}"
        if pd.notna(row.get("models")):
            text += f", {counted(int(row['models']), 'model')}"
        if pd.notna(row.get("attacks")):
            text += f", {int(row['attacks'])} {row.get('counted', 'attacks')}"
        return text
    return f"{row['n']} {row['counted']}"


def claim_sentence(claims: pd.DataFrame | None, words: Sequence[str]) -> str:
    """The claims of a claims table whose text holds every one of ``words``, each in a
    sentence: its verdict, quantity, interval and units (and, where several models were
    compared, how many agree on their own); "" when there is none."""
    if claims is None or claims.empty:
        return ""
    chosen = claims[[all(w in str(c) for w in words) for c in claims["claim"]]]
    sentences = []
    for _, row in chosen.iterrows():
        text = (f"Read as the paper reads it, over successful attacks only, \"{row['claim']}\" "
                f"gets the verdict **{row['verdict']}**: {row['quantity']} = "
                f"{interval_text(row['estimate'], row['low'], row['high'])} ({_units(row)})")
        models = row.get("models")
        if pd.notna(models) and int(models) > 1 and pd.notna(row.get("models_agreeing")):
            text += (f"; {int(row['models_agreeing'])} of {int(models)} models agree on their "
                     "own")
        sentences.append(text + ".")
    return " ".join(sentences)


def sweep_claim_sentence(claims: pd.DataFrame | None, words: Sequence[str]) -> str:
    """The verdicts of the claims holding every one of ``words`` at each lr0 of the sweep
    (the analysis stage's ``claims_lr0``); "" when there is none."""
    if claims is None or claims.empty:
        return ""
    chosen = claims[[all(w in str(c) for w in words) for c in claims["claim"]]]
    sentences = []
    for claim, part in chosen.groupby("claim", sort=False):
        at = "; ".join(f"lr0 {r.lr0_255:.2g}/255: {r.verdict}"
                       for r in part.sort_values("lr0").itertuples())
        sentences.append(f"Checked the same way at every lr0 of the sweep, \"{claim}\" reads: "
                         f"{at}.")
    return " ".join(sentences)


def minimality_paragraph(ratios: pd.DataFrame | None, verdicts: dict[str, dict[str, str]]
                         ) -> str:
    """Minimality per norm at the last compared checkpoint.

    Args:
        ratios: the minimality stage's ``ratios`` table
            (:func:`lib.analysis.minimality_norms.minimality_by_norm`), or None.
        verdicts: per norm, :func:`lib.analysis.minimality_norms.closeness_verdict` of
            loss-adaptive at that checkpoint.
    """
    if ratios is None or ratios.empty or "norm" not in ratios.columns:
        return "The minimality stage did not run per norm in this build."
    last = ratios[ratios["epoch"] == ratios["epoch"].max()]
    parts = []
    for norm in [n for n in NORMS if n in set(last["norm"])]:
        part = last[last["norm"] == norm]
        verdict = verdicts.get(norm, {}).get("outcome", statistics.INCONCLUSIVE)
        parts.append(f"{NORM_NAMES[norm]} {part['median_ratio'].min():.3g} to "
                     f"{part['median_ratio'].max():.3g} times the best known (loss-adaptive "
                     f"closest: {verdict})")
    pairs = int(last["pairs"].max())
    closest = last.loc[last["median_ratio"].idxmin(), "norm"]
    why = " (the geometry of a sign step)" if closest == "linf" else ""
    return (f"At epoch {int(last['epoch'].iloc[0])}, on {pairs} pairs, the schedules' median "
            "distances are " + "; ".join(parts) + f". They come closest to minimal in "
            f"{NORM_NAMES[closest]}{why}.")


def failure_paragraph(outcomes: pd.DataFrame | None, rescued: pd.DataFrame | None,
                      gradients: pd.DataFrame | None = None) -> str:
    """Why attacks fail, and whether the logit margin solves them.

    Args:
        outcomes: the margins stage's ``failure_outcomes``
            (:func:`lib.analysis.failures.outcome_shares`), or None.
        rescued: the margins stage's ``rescued_by_outcome``
            (:func:`lib.analysis.loss_comparison.rescued_by_outcome`), or None.
        gradients: the margins stage's ``frozen_gradients``
            (:func:`lib.run.margins_stage.frozen_gradients`), or None.
    """
    if outcomes is None or outcomes.empty:
        return "The outcome classes of failed attacks were not computed in this build."
    totals = outcomes.groupby("outcome", sort=False)["failures"].sum()
    totals = totals[totals > 0].sort_values(ascending=False, kind="stable")
    total = int(totals.sum())
    if total == 0:
        return "No attack failed in this build."
    shares = ", ".join(f"{name} {int(n)} ({100 * n / total:.0f} %)" for name, n in totals.items())
    text = f"Of {total} failed attacks, by outcome: {shares}."
    if rescued is not None and int(rescued["rerun"].sum()) > 0:
        run = rescued[rescued["rerun"] > 0]
        by_class = ", ".join(f"{r.outcome} {int(r.solved)} of {int(r.rerun)}"
                             for r in run.itertuples())
        text += (f" Run again with the logit-margin loss, {int(run['solved'].sum())} of "
                 f"{int(run['rerun'].sum())} sampled failures succeed ({by_class}). A failure "
                 "the other loss solves was the attack's; one that neither solves is out of "
                 "reach of this budget and these step sizes.")
    if gradients is not None and len(gradients):
        zero = int((gradients["zero_share"] == 1).sum())
        text += (f" Of {counted(len(gradients), 'saturated failure')} whose loss froze, run "
                 f"again, {zero} end on an image where the input gradient is exactly 0 in "
                 "every value, so no sign step can move it.")
    return text


def models_paragraph(change: pd.DataFrame | None) -> str:
    """What holds across trained models (only when the table has several).

    Args:
        change: the margins stage's ``margin_change`` table, or None.
    """
    if change is None or change.empty:
        return ""
    rows = change[(change["norm"] == "linf") & (change["mode"] == "targeted")
                  & (change["method"] == BEST_OF_SCHEDULES)]
    single = rows[rows["model"].astype(str) != POOLED]
    if len(single) < 2:
        return ("One trained model: every verdict here is about this one network; a second "
                "seed could change it.")
    counts = single["direction"].value_counts()
    pooled = rows[rows["model"].astype(str) == POOLED]
    text = (f"{len(single)} trained models: the Linf margin grows in "
            f"{counts.get('grows', 0)}, shrinks in {counts.get('shrinks', 0)} and is "
            f"inconclusive in {counts.get(statistics.INCONCLUSIVE, 0)} of them.")
    if len(pooled):
        text += (f" Pooled (models, then images resampled; with {len(single)} models the "
                 f"between-model part of the interval is coarse): {pooled['direction'].iloc[0]}.")
    return text


def limitations_paragraph(*, data_kind: str, image_size: int, models: int,
                          per_class: int, epochs: Sequence[int], max_iter: int, lr0: float,
                          sweep_images: int, pairs: int | None) -> str:
    """What the numbers above cannot say: the data, the model and the budget.

    Args:
        data_kind: the data stage's ``dataset_kind``.
        image_size: pixels per side. models: trained models compared.
        per_class: images attacked per tool and checkpoint. epochs: attacked checkpoints.
        max_iter: update budget per attack. lr0: the attack's initial step ([0, 1] units).
        sweep_images: images of the lr0 sweep. pairs: minimality pairs (None: not run).
    """
    data = ("a synthetic dataset in the Cholec80 layout: drawn frames, not surgical video; "
            "nothing here is a statement about real instruments"
            if data_kind == "synthetic" else f"the {data_kind} data")
    text = [f"**Data:** {data}.",
            f"**Model:** AlexNet at {image_size} px, {counted(models, 'trained model')}; another "
            "architecture or training recipe can move every margin.",
            f"**Budget:** {per_class} images per tool at each of the checkpoints "
            f"{', '.join(map(str, epochs))}, {max_iter} updates of initial step "
            f"{lr0 * 255:.2g}/255 per attack; the lr0 sweep has {sweep_images} images"
            + (f", the minimality comparison {pairs} pairs." if pairs else ".")
            + " A margin is the smallest distance an attack found within its budget: an upper "
            "bound of the true margin, and a failed search counts as no boundary found, not as "
            "robustness."]
    return "\n\n".join(text)
