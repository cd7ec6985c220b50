"""The claims table: every claim pooled over the trained models and on each model alone, and
the schedule claims over the lr0 sweep.

A verdict about one trained network may be a verdict about its seed. So every claim of
:data:`CLAIMS` is checked twice over: once on every model pooled (the two-level bootstrap:
models drawn, then images within each drawn model) and once on each model alone; the table says
how many models agree on their own. With three models the between-model part of a pooled
interval is coarse (three values to draw from), which the per-model verdicts beside it make
visible. The claims about schedules hold at one lr0; :func:`claims_over_lr0` checks them at
every lr0 of the sweep (one model, one checkpoint, fewer images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.analysis import statistics
from lib.analysis.claims import (
    AttackSetting,
    ClaimRules,
    Finding,
    accuracy_stable,
    constant_largest_l1,
    falls_short,
    most_iterations,
    reaches_full_success,
    smaller_l1,
    step_before_exponential,
    success_stable,
)


@dataclass(frozen=True)
class Claim:
    """One claim of the paper.

    Attributes:
        claim: the claim in words.
        paper: where the paper makes it, with its numbers.
        check: ``check(results, predictions, rules) -> Finding``.
        attack: whether it is about the attacks (then it depends on lr0 and the budget).
        one_checkpoint: whether one checkpoint can decide it (the lr0 sweep checks these).
        bounded: the schedule whose bounded total step makes the claim hold by construction
            (when the setting bounds it), or "".
    """

    claim: str
    paper: str
    check: Callable[..., Finding]
    attack: bool = True
    one_checkpoint: bool = True
    bounded: str = ""


def _claims() -> tuple[Claim, ...]:
    reach = [Claim(f"{name} reaches 100 % success within max_iter",
                   "Fig. 2: 100 % at every epoch", reaches_full_success(name))
             for name in ("constant", "iteration", "loss-adaptive")]
    short = [Claim(f"{name} falls short of 100 % success", "Fig. 2: below 100 %",
                   falls_short(name), bounded=name) for name in ("step", "exponential")]
    smaller = [Claim(f"{name} gives a smaller mean L1 than constant and iteration", "Fig. 3",
                     smaller_l1(name)) for name in ("step", "exponential", "loss-adaptive")]
    return (*reach, *short,
            Claim("constant gives the largest mean L1 (successful attacks)", "Fig. 3",
                  constant_largest_l1),
            *smaller,
            Claim("step and exponential need the most iterations (last epoch)",
                  "Fig. 4: mean 50 (step) and 83 (exponential) at epoch 10", most_iterations),
            Claim("step needs fewer iterations than exponential (last epoch)",
                  "Fig. 4: step 50 < exponential 83 at epoch 10", step_before_exponential),
            Claim("success rate changes little across epochs",
                  "Fig. 2: about the same at every epoch", success_stable,
                  one_checkpoint=False),
            Claim("clean accuracy changes little across epochs",
                  "Fig. 1: similar at every epoch", accuracy_stable, attack=False,
                  one_checkpoint=False))


#: The paper's claims, in the order of its figures.
CLAIMS: tuple[Claim, ...] = _claims()
#: The default verdict levels.
DEFAULT_RULES = ClaimRules()

#: The columns of the claims table (:func:`paper_claims`).
CLAIM_COLUMNS = ("claim", "paper", "quantity", "estimate", "low", "high", "images", "models",
                 "attacks", "counted", "comparisons", "model_comparisons", "verdict",
                 "model_verdicts",
                 "models_agreeing", "setting", "construction")


def construction(claim: Claim, setting: AttackSetting | None) -> str:
    """Why ``claim`` holds by construction at ``setting``, or "" when it does not."""
    if not claim.bounded or setting is None or not setting.bounded(claim.bounded):
        return ""
    total = setting.total_step(claim.bounded)
    return (f"by construction: the steps of {claim.bounded} sum to at most "
            f"{total / setting.lr0:.3g} lr0 ({total * 255:.3g}/255 per pixel value) however "
            "many updates remain, so a target farther away in Linf is out of reach")


def _wording(claim: Claim, rules: ClaimRules) -> str:
    if "changes little" in claim.claim:
        return (f"{claim.paper} (we call a change within +-{100 * rules.stable_within:.0f} "
                "points little)")
    return claim.paper


def _per_model(claim: Claim, results: pd.DataFrame, predictions: pd.DataFrame | None,
               rules: ClaimRules) -> list[tuple[int, Finding]]:
    """The claim's finding on each model alone, smallest seed first."""
    models = sorted(set(results["model"]) if claim.attack else set(
        predictions["model"] if predictions is not None else []))
    return [(int(model), claim.check(
        results[results["model"] == model],
        None if predictions is None else predictions[predictions["model"] == model], rules))
        for model in models]


def paper_claims(results: pd.DataFrame, predictions: pd.DataFrame | None = None, *,
                 rules: ClaimRules = DEFAULT_RULES,
                 setting: AttackSetting | None = None) -> pd.DataFrame:
    """The paper's claims, each checked on the pooled models and on every model alone.

    Args:
        results: ``attack/results.csv`` (every model).
        predictions: every model's predictions (with the ``model`` column) for the claim on
            clean accuracy; None leaves it inconclusive.
        rules: the levels of the verdicts.
        setting: the attack's lr0, budget and schedule constants (``job.json``): named beside
            every attack claim, and deciding which claims hold by construction.

    Returns:
        :data:`CLAIM_COLUMNS`: the claim, the paper's figure, the quantity estimated (where a
        claim needs several comparisons, the one that decides), its pooled estimate with the
        95 % interval ``low, high``, the ``images`` (model, image units), ``models`` and
        ``attacks`` (rows: attacks, pairs or test images, as ``counted`` says) behind it, the
        ``comparisons`` its pooled verdict rests on (``model_comparisons``: those of every
        model's own verdicts together), the pooled ``verdict``, each model's own
        (``model_verdicts``: "seed 0: agrees; ..."), how many models agree on their own
        (``models_agreeing``), the ``setting`` it was checked at and, when it holds by
        construction, why (``construction``).
    """
    rows = []
    for claim in CLAIMS:
        pooled = claim.check(results, predictions, rules)
        alone = _per_model(claim, results, predictions, rules)
        interval = pooled.interval
        rows.append({
            "claim": claim.claim, "paper": _wording(claim, rules), "quantity": pooled.quantity,
            "estimate": interval.estimate, "low": interval.low, "high": interval.high,
            "images": interval.n_images, "models": interval.n_models,
            "attacks": interval.n_attacks, "counted": pooled.counted,
            "comparisons": pooled.comparisons,
            "model_comparisons": sum(f.comparisons for _, f in alone),
            "verdict": pooled.verdict,
            "model_verdicts": "; ".join(f"seed {m}: {f.verdict}" for m, f in alone),
            "models_agreeing": sum(f.verdict == statistics.AGREES for _, f in alone),
            "setting": setting.words() if setting is not None and claim.attack else "",
            "construction": construction(claim, setting)})
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


#: The columns of :func:`claims_over_lr0`.
SWEEP_CLAIM_COLUMNS = ("claim", "lr0", "lr0_255", "quantity", "estimate", "low", "high",
                       "images", "attacks", "verdict", "construction")


def claims_over_lr0(sweep: pd.DataFrame, *, rules: ClaimRules = DEFAULT_RULES,
                    setting: AttackSetting | None = None) -> pd.DataFrame:
    """The claims one checkpoint can decide, checked at every lr0 of the sweep.

    Args:
        sweep: ``attack/lr0_sweep.csv`` (the result columns and ``lr0``; one model, one
            checkpoint).
        rules: the levels of the verdicts.
        setting: the main attack's setting; its budget and constants apply at every lr0.

    Returns:
        :data:`SWEEP_CLAIM_COLUMNS`, one row per (claim, lr0), claims in :data:`CLAIMS` order.
    """
    rows = []
    for claim in (c for c in CLAIMS if c.one_checkpoint):
        for lr0, part in sweep.groupby("lr0", sort=True):
            found = claim.check(part.drop(columns="lr0"), None, rules)
            at = (None if setting is None else
                  AttackSetting(float(lr0), setting.max_iter, setting.schedule_constants))
            rows.append({"claim": claim.claim, "lr0": float(lr0), "lr0_255": float(lr0) * 255,
                         "quantity": found.quantity, "estimate": found.interval.estimate,
                         "low": found.interval.low, "high": found.interval.high,
                         "images": found.interval.n_images, "attacks": found.interval.n_attacks,
                         "verdict": found.verdict, "construction": construction(claim, at)})
    return pd.DataFrame(rows, columns=list(SWEEP_CLAIM_COLUMNS))


def interval_text(estimate: float, low: float, high: float) -> str:
    """``"0.863 [0.788, 0.919]"``, or "-" for no estimate."""
    if not np.isfinite(estimate):
        return "-"
    return f"{estimate:.3g} [{low:.3g}, {high:.3g}]"


def units_text(images: int, models: int, attacks: int, counted: str) -> str:
    """``"35 images, 3 models; 672 attacks"``: the units resampled, then the rows."""
    model_words = f", {models} models" if models > 1 else ""
    return f"{images} image{'' if images == 1 else 's'}{model_words}; {attacks} {counted}"


def readable_claims(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table as the book shows it: the estimate and its interval in one cell, the
    units behind it, the pooled verdict beside each model's and the setting.

    Returns:
        ``claim, paper, quantity, estimate (95 % interval), n, verdict pooled (each model),
        checked at``; the verdict cell reads ``"agrees (2 of 3 agree; seed 0: agrees; ...)"``.
    """
    agreeing = models_agreeing(claims)
    return pd.DataFrame({
        "claim": claims["claim"], "paper": claims["paper"], "quantity": claims["quantity"],
        "estimate (95 % interval)": [interval_text(r.estimate, r.low, r.high)
                                     for r in claims.itertuples()],
        "n": [units_text(r.images, r.models, r.attacks, r.counted)
              for r in claims.itertuples()],
        "verdict pooled (each model)": [
            f"{r.verdict} ({k} agree; {r.model_verdicts})"
            for r, k in zip(claims.itertuples(), agreeing, strict=True)],
        "checked at": [" ".join(part for part in (r.setting, r.construction) if part)
                       for r in claims.itertuples()]})


def models_agreeing(claims: pd.DataFrame) -> list[str]:
    """Per claim ``"k of m"``: how many of the m trained models agree on their own."""
    models = claims["model_verdicts"].str.count("seed ")
    return [f"{k} of {m}" for k, m in zip(claims["models_agreeing"], models, strict=True)]


def claims_conclusion(claims: pd.DataFrame) -> str:
    """The chapter's conclusion, written from the verdicts (Markdown): how many claims agree,
    disagree or stay inconclusive pooled, which, how many models agree on their own, and how
    many comparisons the verdicts rest on."""
    shown = readable_claims(claims)
    count = claims["verdict"].value_counts()
    models = int(claims["model_verdicts"].str.count("seed ").max())
    lines = [f"Of the paper's {len(claims)} claims, our run **agrees** with "
             f"{count.get(statistics.AGREES, 0)}, **disagrees** with "
             f"{count.get(statistics.DISAGREES, 0)} and leaves "
             f"{count.get(statistics.INCONCLUSIVE, 0)} **inconclusive** (the 95 % interval "
             f"does not decide), pooled over {models} trained model(s).", ""]
    shown["models agreeing"] = models_agreeing(claims)
    for verdict in statistics.VERDICTS:
        chosen = shown[claims["verdict"].to_numpy() == verdict]
        if chosen.empty:
            continue
        lines.append(f"- {verdict.capitalize()}:")
        lines += [f"  - {row['claim']}: {row['quantity']} = {row['estimate (95 % interval)']}"
                  f" ({row['n']}); models agreeing on their own: {row['models agreeing']}"
                  for row in chosen.to_dict("records")]
    built = claims[claims["construction"] != ""]
    pooled, alone = int(claims["comparisons"].sum()), int(claims["model_comparisons"].sum())
    lines += ["", f"The pooled verdicts rest on {pooled} comparisons of an interval with a "
              f"level" + (f", the models' own verdicts on {alone} more" if models > 1 else "")
              + ", every verdict reported above, none chosen after the fact. "
              + (f"{len(built)} claim(s) hold by construction at this setting "
                 f"({'; '.join(built['claim'])}): their numbers say how far, not whether."
                 if len(built) else "No claim holds by construction at this setting.")]
    return "\n".join(lines)
