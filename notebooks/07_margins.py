# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Margins, robustness curves and a fair comparison
#
# ## Overview
#
# The results chapter reports the paper's measures: a targeted distance per (image, target),
# averaged over the attacks that succeeded. The field compares networks differently. The
# robustness index of a correctly classified image is its **margin**: the smallest
# perturbation that changes its class, over every wrong class. From the margins of all test
# images follows **robust accuracy** against a budget epsilon: the share of test images that
# are classified correctly and whose margin exceeds epsilon. Both are measured in Linf (the
# geometry of a sign step) and L2, with the paper's L1 beside them.
#
# This chapter computes them from the attack stage's results and answers four questions:
#
# 1. Does the margin grow or shrink while the network trains? Each image's margin at the
#    first and at the last attacked checkpoint, compared image by image.
# 2. Which schedule gives the closer borderline images at *equal success*? A mean over
#    successful attacks favours a schedule that fails on the hard pairs; the lr0 sweep lets us
#    compare the schedules where they reach the same success rate.
# 3. Why do attacks fail? Each failed attack gets an outcome class from its loss and step-size
#    traces.
# 4. Are the failures the attack's or the model's? A sample of attacks runs again with the
#    logit-margin loss of Carlini and Wagner {cite:p}`carlini2017towards` instead of
#    cross-entropy.
#
# Every interval resamples images (all attacks on an image move together), and with several
# trained models, models then images.
#
# ## Prerequisites
#
# The attack stage (03_attack) has written `attack/`; where the minimality stage (05) ran, its
# reference attacks enter the best-known margins. This stage adds two small jobs of its own at
# the first and the last attacked checkpoint: an untargeted attack of every selected image per
# schedule, and the logit-margin reruns. They use the attack stage's step size, budget and
# precision, and are kept in the run folder, so the chapter re-executes in seconds.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # the run folder: this stage reads what the stages before it wrote there and writes its own subfolder
epochs = []  # checkpoints of the untargeted attacks and the logit-margin reruns; [] for the first and the last attacked one
untargeted_schedules = ["constant", "iteration", "exponential", "step", "loss-adaptive"]  # schedules of the untargeted attacks (every image the attack stage selected at those checkpoints, once per schedule); [] for none
rerun_failures = 8  # failed attacks per checkpoint and schedule run again with the logit margin instead of cross-entropy (a seeded draw)
rerun_successes = 3  # successful attacks per checkpoint and schedule run again the same way, to compare the distances of the two losses
success_levels = [0.5, 0.75]  # success rates at which the schedules' distances are compared across the lr0 sweep (matched success), each in (0, 1]
epsilon_points = 51  # points of the epsilon grid of the robust-accuracy curves
seed = 0  # seeds the draw of the reruns
device = "cpu"  # "cpu", "cuda" or "cuda:N"
progress = True  # a progress bar over the stage's work (stderr)
overwrite = False  # discard this stage's results (and those of every later stage) if they were made with other parameters

# %% tags=["remove-input"]
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from lib import TOOLS
from lib.analysis import conclusions, failures, loss_comparison, margin_figures, margins, pareto
from lib.analysis.readable import html
from lib.run import margins_stage, pipeline, tables
from lib.run.layout import MARGINS_STAGE
from lib.run.parameters import from_namespace, stage_settings

values = from_namespace(MARGINS_STAGE, globals())
pipeline.start_stage(MARGINS_STAGE, run_dir=run_dir, overwrite=overwrite, parameters=values)
settings = stage_settings(MARGINS_STAGE, values)
results = tables.read_results(run_dir)
predictions = tables.read_predictions(run_dir)
reference = tables.read_table(run_dir, "reference", missing_ok=True)
sweep = tables.read_sweep(run_dir)
compared = margins_stage.compared_epochs(results, settings)
several = "model" in results.columns and results["model"].nunique() > 1


def save(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Keep a table as margins/<name>.csv (the book offers it for download)."""
    tables.write_table(run_dir, name, frame)
    return frame


def norm_order(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its norms named as the book names them, Linf first."""
    names = [margins.NORM_NAMES[n] for n in margins.NORMS]
    return frame.assign(norm=pd.Categorical(frame["norm"].map(margins.NORM_NAMES),
                                            categories=names))


glue("margins_epochs", " and ".join(map(str, compared)), display=False)

# %% [markdown]
# ## The stage's own attacks
#
# At the checkpoints of epochs {glue:text}`margins_epochs`, the untargeted attack leaves each
# selected image's true class toward whichever class is nearest; its distance is the margin the
# attack itself finds, beside the targeted margin (the smallest over the targeted attacks). The
# reruns repeat a seeded sample of the attack stage's failed and successful attacks with the
# logit-margin loss.

# %% tags=["hide-input"]
untargeted = margins_stage.untargeted_results(run_dir, settings, device=device,
                                              progress=progress)
margin_loss = margins_stage.margin_loss_results(run_dir, settings, device=device,
                                                progress=progress)
rerun_rows = margins_stage.rerun_model_rows(results)
print(f"{len(untargeted)} untargeted attacks, {untargeted['success'].sum()} successful")
print(f"{len(margin_loss)} logit-margin reruns, {margin_loss['success'].sum()} successful")

# %% [markdown]
# ## Every image's margin
#
# The margin of an image at a checkpoint is its smallest distance to the boundary over every
# target (and, for "best of schedules", over every schedule; "best known" adds the untargeted
# attacks and the minimality chapter's reference attacks where they ran). The distance is taken
# at the boundary where the attack stage refined the crossing. An image none of whose attacks
# succeeded has margin infinity: no boundary was found within the budget. The table gives the
# median margin over the attacked images per checkpoint, Linf and L1 in grey levels (x 1/255),
# L2 in [0, 1] pixel units.

# %% tags=["hide-input"]
own = margins_stage.as_rerun_model(untargeted, results)
everything = pd.concat([results, own], ignore_index=True) if len(own) else results
known = None if reference is None else margins_stage.as_rerun_model(reference, results)
margin_table = save(margins.image_margins(everything, known), "image_margins")
summary = (margin_table[margin_table["method"].isin([margins.BEST_OF_SCHEDULES,
                                                     margins.BEST_KNOWN])]
           .groupby(["norm", "mode", "method", "epoch"], sort=False)["margin"].median()
           .reset_index())
summary = norm_order(summary.assign(
    margin=[conclusions.distance_text(r.margin, r.norm) for r in summary.itertuples()]))
html(summary.pivot_table(index=["norm", "mode", "method"], columns="epoch", values="margin",
                         aggfunc="first", observed=True)
     .rename(columns=lambda e: f"epoch {e}").rename_axis(columns=None).reset_index()
     .rename(columns={"mode": "attack mode", "method": "over"}))

# %% [markdown]
# ## Robust accuracy against epsilon
#
# For every epsilon, robust accuracy is the share of all test images that are classified
# correctly and whose margin exceeds epsilon (a misclassified image counts as margin 0). Only
# a sample of the correctly classified images is attacked, so each tool's attacked images
# stand for that tool's correctly classified ones. At epsilon 0 the curve is the clean
# accuracy; the band is the 95 % image-bootstrap band (with the clean accuracy's own
# uncertainty). There is a curve per schedule, one for the best of the schedules, and one for
# the untargeted attacks where they ran; a lower curve is a stronger attack on the same
# network. The figures show the first trained model; the table after them gives every model
# (and, with several, the curve pooled over them: models, then images resampled).

# %% tags=["hide-input"]
accuracy = margins.clean_accuracy(predictions)
methods = [(name, "targeted") for name in dict.fromkeys(results["schedule"])]
methods += [(margins.BEST_OF_SCHEDULES, "targeted"), (margins.BEST_OF_SCHEDULES, "untargeted")]
curves, areas = [], []
for norm in ("linf", "l2"):
    grid = margins.epsilon_grid(margin_table, norm=norm, points=epsilon_points)
    for method, mode in methods:
        if margin_table[(margin_table["method"] == method) & (margin_table["mode"] == mode)].empty:
            continue
        for pooled in [False, True] if several else [False]:
            curve = margins.robust_accuracy(margin_table, accuracy, epsilons=grid, norm=norm,
                                            method=method, mode=mode, pool_models=pooled)
            curves.append(curve.assign(method=f"{method} ({mode})" if mode != "targeted"
                                       else method))
            areas.append(margins.robust_accuracy_area(
                margin_table, accuracy, eps_max=float(grid[-1]), norm=norm, method=method,
                mode=mode, pool_models=pooled))
curves = save(pd.concat(curves, ignore_index=True), "robust_accuracy")
areas = save(pd.concat(areas, ignore_index=True), "robust_accuracy_area")
shown_model = str(curves["model"].iloc[0])

# %% mystnb={"figure": {"caption": "Robust accuracy against the Linf budget epsilon (x 1/255) per checkpoint, one line per schedule, for the best of the schedules and for the untargeted attacks, with 95 % image-bootstrap bands.", "name": "fig-robust-accuracy-linf"}} tags=["hide-input"]
margin_figures.robust_accuracy_chart(
    curves[(curves["norm"] == "linf") & (curves["model"].astype(str) == shown_model)],
    norm="linf")

# %% mystnb={"figure": {"caption": "Robust accuracy against the L2 budget epsilon ([0, 1] pixel units) per checkpoint, as in the Linf figure.", "name": "fig-robust-accuracy-l2"}} tags=["hide-input"]
margin_figures.robust_accuracy_chart(
    curves[(curves["norm"] == "l2") & (curves["model"].astype(str) == shown_model)], norm="l2")

# %% [markdown]
# The curves' mean height over the whole epsilon range (their area divided by the range), per
# checkpoint, for the best of the schedules, with its 95 % interval:

# %% tags=["hide-input"]
best = norm_order(areas[areas["method"] == margins.BEST_OF_SCHEDULES])
html(best.assign(area=[conclusions.interval_text(r.estimate, r.low, r.high)
                       for r in best.itertuples()])
     .pivot_table(index=["model", "norm", "mode"], columns="epoch", values="area",
                  aggfunc="first", observed=True)
     .rename(columns=lambda e: f"epoch {e}").rename_axis(columns=None).reset_index()
     .rename(columns={"mode": "attack mode"}))

# %% [markdown]
# ## Does the margin grow or shrink over training?
#
# Each checkpoint selects its own correctly classified images; the images selected at both
# the first and the last attacked checkpoint are compared *paired*. An image's change is the
# ratio of its last to its first margin; the table gives the median ratio over images (the
# factor the median image's margin is multiplied by) with its 95 % image-bootstrap interval,
# and the verdict: "grows" when the whole interval lies above 1, "shrinks" when below,
# otherwise inconclusive. An image whose margin was found at one end only counts in its
# direction; one found at neither end is left out.

# %% tags=["hide-input"]
changes, pairs = [], []
choices = [("targeted", margins.BEST_OF_SCHEDULES), ("untargeted", margins.BEST_OF_SCHEDULES),
           ("any", margins.BEST_KNOWN)]
choices += [("targeted", name) for name in dict.fromkeys(results["schedule"])]
for norm in margins.NORMS:
    for mode, method in choices:
        chosen = margin_table[(margin_table["mode"] == mode) & (margin_table["method"] == method)]
        if chosen.empty:
            continue
        changes.append(margins.margin_change(margin_table, norm=norm, method=method,
                                             mode=mode).assign(mode=mode))
    pairs.append(margins.paired_log_ratios(margin_table, norm=norm).assign(norm=norm))
change = save(pd.concat(changes, ignore_index=True), "margin_change")
shown = norm_order(change[change["method"].isin([margins.BEST_OF_SCHEDULES,
                                                 margins.BEST_KNOWN])])
html(shown.assign(
    factor=[conclusions.interval_text(r.factor, r.factor_low, r.factor_high)
            for r in shown.itertuples()],
    over=shown["mode"] + ", " + shown["method"],
    counts=[f"{r.grew} / {r.shrank} / {r.unresolved}" for r in shown.itertuples()])
    [["model", "norm", "over", "factor", "n_images", "counts", "direction"]]
    .sort_values(["model", "norm"], kind="stable")
    .rename(columns={"over": "attacks, margin over", "n_images": "images",
                     "factor": "median factor last / first (95 % interval)",
                     "counts": "grew / shrank / neither end", "direction": "verdict"}))

# %% mystnb={"figure": {"caption": "Each image's margin (best of the schedules) at the first and the last attacked checkpoint, per norm, log scales; above the dashed diagonal the margin grew.", "name": "fig-margin-change"}} tags=["hide-input"]
margin_figures.margin_change_chart(pd.concat(pairs, ignore_index=True))

# %% tags=["remove-input"]
display(Markdown(conclusions.margin_paragraph(change)))

# %% [markdown]
# ## The schedules at equal success
#
# The attack stage repeats a subset of its attacks at several initial step sizes. Each
# (schedule, lr0) is a point: its success rate and the median distance of its successful
# attacks. A point is *Pareto-optimal* when no other point has at least its success and at
# most its distance, one of them strictly. The figure draws the points of each schedule joined
# in lr0 order.

# %% tags=["hide-input"]
if sweep is None or sweep.empty:
    fronts, matched = None, None
    display(Markdown("*The attack stage ran without an lr0 sweep (`sweep_lr0 = []`): "
                     "no comparison at equal success.*"))
else:
    swept = sorted(sweep["model"].unique())  # the sweep attacks the first model
    groups = [(str(swept[0]) if len(swept) == 1 else "pooled", sweep)]
    if len(swept) > 1:
        groups += [(str(m), part) for m, part in sweep.groupby("model", sort=True)]
    points, fronts, matched = [], [], []
    for model, part in groups:
        for norm in margins.NORMS:
            point = pareto.sweep_points(part, norm=norm).assign(model=model)
            points.append(point)
            fronts.append(pareto.pareto_front(point).assign(model=model, norm=norm))
        matched.append(pareto.closer_at_matched_success(
            part, "loss-adaptive", ["constant", "iteration"], levels=success_levels,
            norms=margins.NORMS).assign(model=model))
    save(pd.concat(points, ignore_index=True), "sweep_points")
    fronts = save(pd.concat(fronts, ignore_index=True), "pareto_front")
    matched = save(pd.concat(matched, ignore_index=True), "matched_success")
    display(margin_figures.pareto_chart(
        fronts[(fronts["norm"] == "linf") & (fronts["model"] == groups[0][0])], norm="linf"))

# %% [markdown]
# Read at a success rate s, the distance a schedule needs is the smallest median distance among
# its lr0 values whose success rate is at least s (infinite when none reaches s). The paper
# says that loss-adaptive finds closer borderline images; here that is the claim that its
# distance at matched success is below that of constant and of iteration at every level, each
# difference paired by image and decided by its 95 % interval (an interval wholly below zero
# agrees, wholly at or above zero disagrees). The sweep has few images, so many comparisons
# can be inconclusive; the table says which.

# %% tags=["hide-input"]
if matched is not None and not matched.empty:
    rows = norm_order(matched)
    scale = np.where(rows["norm"].astype(str) == "L2", 1.0, 255.0)
    html(rows.assign(
        difference=[conclusions.interval_text(e, lo, hi, scale=k) for e, lo, hi, k in zip(
            rows["estimate"], rows["low"], rows["high"], scale, strict=True)],
        level=(100 * rows["level"]).map("{:.0f} %".format))
        [["model", "norm", "second", "level", "difference", "n_images", "verdict",
          "claim_verdict"]].rename(columns={
            "second": "against", "level": "success level",
            "difference": "loss-adaptive minus it (95 % interval; Linf, L1 x 1/255)",
            "n_images": "images", "verdict": "comparison", "claim_verdict": "claim"}))
display(Markdown(conclusions.fair_paragraph(matched)))

# %% [markdown]
# ## Why attacks fail
#
# Every failed attack used its whole budget without reaching its target. Its last ten updates
# say why: it ended in a **third class** (neither source nor target), its steps had become too
# small to change an 8-bit image (**stuck**), the loss swung without net progress
# (**oscillating**), the loss sat on a high plateau (**saturated**: the target less likely
# than a uniform guess while steps are still taken), or the loss was still falling
# (**progressing**: more updates would likely have succeeded). The figure counts the failures
# per class.

# %% mystnb={"figure": {"caption": "Failed attacks per outcome class, per checkpoint (x) and schedule (panels).", "name": "fig-failure-outcomes"}} tags=["hide-input"]
traces = tables.read_arrays(run_dir, "traces")
failed = failures.failed_attacks(
    results, traces, keys=[k for k in ("model", "epoch", "row_id") if k in traces])
outcomes = save(failures.outcome_shares(failed), "failure_outcomes")
margin_figures.outcome_chart(outcomes)

# %% [markdown]
# A saturated loss whose value does not change at all over the last updates is *frozen*: the
# model's output no longer responds to the sign step. The table counts the frozen failures per
# schedule, tool of the attacked image and checkpoint.

# %% tags=["hide-input"]
frozen = (failed.assign(frozen_saturated=failed["frozen"] & (failed["outcome"] == "saturated"))
          .groupby(["model", "epoch", "schedule", "source"], sort=True)
          .agg(failures=("outcome", "size"), frozen=("frozen_saturated", "sum")).reset_index())
frozen = save(frozen.astype({"frozen": np.int64}), "frozen_failures")
shown = frozen[frozen["frozen"] > 0]
html(shown.assign(tool=shown["source"].map(dict(enumerate(TOOLS))))
     .pivot_table(index=["model", "schedule", "tool"], columns="epoch", values="frozen",
                  aggfunc="sum", fill_value=0)
     .rename(columns=lambda e: f"epoch {e}").rename_axis(columns=None).reset_index())

# %% [markdown]
# Why does the loss freeze? Those failures (at the last compared checkpoint) ran again unchanged,
# keeping their final images, and the gradient of the target's cross-entropy was taken there:
# a gradient that is exactly 0 in every pixel value makes every sign step 0, so the image stops
# moving however large the step size. The table counts, per checkpoint and schedule, the
# frozen failures run again, how many failed again, and how many have an exactly zero
# gradient everywhere.

# %% tags=["hide-input"]
gradients = margins_stage.frozen_gradients(run_dir, failed, settings, device=device,
                                           progress=progress)
html(gradients.assign(failed_again=~gradients["success"].astype(bool),
                      zero_gradient=gradients["zero_share"] == 1)
     .groupby(["epoch", "schedule"]).agg(rerun=("row_id", "size"),
                                         failed_again=("failed_again", "sum"),
                                         zero_gradient=("zero_gradient", "sum"))
     .reset_index().rename(columns={
         "rerun": "run again", "failed_again": "failed again",
         "zero_gradient": "input gradient 0 everywhere"}))

# %% [markdown]
# ## The same attacks with the logit-margin loss
#
# Cross-entropy toward the target can sit on a plateau while another wrong class dominates;
# the logit margin, the strongest other logit minus the target's, pushes only the target
# against its strongest competitor. The sampled attacks ran again with it, unchanged
# otherwise. The figure gives the share of the cross-entropy failures it solves; the tables
# give, per schedule and checkpoint, that share, the share of successes it keeps and the
# distances of both losses where both succeeded (the median of the log ratio; below 0 the
# margin loss stops closer), then the failures it solves per outcome class, and how often the
# reruns lower an image's margin.

# %% mystnb={"figure": {"caption": "Share of the sampled cross-entropy failures that the logit-margin loss solves, per schedule and checkpoint, with 95 % image-bootstrap intervals.", "name": "fig-margin-loss"}} tags=["hide-input"]
compared_losses = save(loss_comparison.loss_comparison(rerun_rows, margin_loss),
                       "loss_comparison")
rescued = save(loss_comparison.rescued_by_outcome(failed, margin_loss), "rescued_by_outcome")
margin_figures.loss_chart(compared_losses[compared_losses["quantity"] ==
                                          loss_comparison.RESCUED])

# %% tags=["hide-input"]
html(compared_losses.assign(
    value=[conclusions.interval_text(r.estimate, r.low, r.high) for r in
           compared_losses.itertuples()]).pivot_table(
    index=["schedule", "epoch"], columns="quantity", values="value", aggfunc="first")
    .rename_axis(columns=None).reset_index())

# %% tags=["hide-input"]
lowered = loss_comparison.margins_with_rerun(rerun_rows, margin_loss)
display(html(rescued.rename(columns={"rerun": "failures run again",
                                     "solved": "solved by the logit margin",
                                     "share": "share solved"})))
html(norm_order(lowered.assign(lower=lowered["both_losses"] < lowered["cross_entropy"]))
     .groupby(["norm", "epoch"], observed=True)
     .agg(images=("image_id", "size"), lowered=("lower", "sum")).reset_index()
     .rename(columns={"lowered": "margin lowered by the reruns"}))

# %% [markdown]
# ## What this chapter finds
#
# Written from the tables above when the chapter runs:

# %% tags=["remove-input"]
display(Markdown("\n\n".join([
    conclusions.margin_paragraph(change), conclusions.fair_paragraph(matched),
    conclusions.failure_paragraph(outcomes, rescued, gradients)])))

# %% [markdown]
# ## Downloads
#
# {download}`image_margins.csv <margins/image_margins.csv>`,
# {download}`robust_accuracy.csv <margins/robust_accuracy.csv>`,
# {download}`robust_accuracy_area.csv <margins/robust_accuracy_area.csv>`,
# {download}`margin_change.csv <margins/margin_change.csv>`,
# {download}`failure_outcomes.csv <margins/failure_outcomes.csv>`,
# {download}`loss_comparison.csv <margins/loss_comparison.csv>`,
# {download}`rescued_by_outcome.csv <margins/rescued_by_outcome.csv>`
# (and, when the run has an lr0 sweep, `sweep_points.csv`, `pareto_front.csv` and
# `matched_success.csv` in the run folder's `margins/`).
#
# ## Summary
#
# Per-image margins in three norms, robust-accuracy curves with their bands, the margin's
# paired change over training, the schedules at equal success, the outcome classes of failed
# attacks and a second loss: the measures a reader from the field compares, for this build.

# %% tags=["remove-input"]
pipeline.finish_stage(MARGINS_STAGE, run_dir=run_dir)  # after its last output
