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
# # Results: robustness over training
#
# ## Overview
#
# This chapter turns the tables of the training and attack stages into the paper's four
# figures {cite:p}`ding2023adaptive` and into several views the paper does not show: which
# pairs of tools lie close to each other, what borderline images look like, how the distances
# spread, how the step sizes behave while an attack runs, how each image's distance changes
# over training, how much of the distance is overshoot past the boundary, and how much the
# comparison of schedules depends on the initial step size. It ends with the paper's claims,
# each checked against our numbers with an interval and a verdict.
#
# Nothing here attacks or evaluates a model: every number is read from the run folder, so the
# chapter can be re-executed in seconds.
#
# ## Prerequisites
#
# The attack stage (03_attack) has written `attack/` into the run folder.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # the run folder: this stage reads what the stages before it wrote there and writes its own subfolder
full_success = 0.95  # "reaches 100 %" agrees when the success rate's 95 % lower bound is at least this
stable_within = 0.05  # "changes little across epochs" agrees when the change's 95 % interval lies within +- this
reference_schedule = "constant"  # every other schedule is compared with this one, paired per (image, target)
histogram_bins = 30  # bins of the L1 distributions
overwrite = False  # discard this stage's results (and those of every later stage) if they were made with other parameters

# %% tags=["remove-input"]

import pandas as pd
from IPython.display import HTML, Markdown, display
from myst_nb import glue

from lib.analysis import aggregates, figures, paired, readable, statistics
from lib.analysis.claims import claims_conclusion, paper_claims, readable_claims
from lib.analysis.gallery import gallery_examples, gallery_picture, gallery_summary
from lib.attack import selection
from lib.run import manifest, pipeline, tables
from lib.run.layout import ANALYSIS_STAGE, DATA_STAGE
from lib.run.parameters import from_namespace, stage_settings

values = from_namespace(ANALYSIS_STAGE, globals())
analysis_dir = pipeline.start_stage(ANALYSIS_STAGE, run_dir=run_dir, overwrite=overwrite,
                                    parameters=values)
rules = stage_settings(ANALYSIS_STAGE, values).rules
results = tables.read_results(run_dir)
training = tables.read_training_metrics(run_dir)
predictions = tables.read_predictions(run_dir)
job = tables.read_record(run_dir, "job")["settings"]
last_epoch = int(results["epoch"].max())
skipped = aggregates.skipped_counts(results)
order = aggregates.schedule_order(results)


def save(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Keep an aggregated table as analysis/<name>.csv (the book offers it for download)."""
    tables.write_analysis_table(run_dir, name, table)
    return table


data_kind = manifest.read_manifest(run_dir)["stages"][DATA_STAGE]["parameters"]["dataset_kind"]
glue("analysis_data", {"synthetic": "the synthetic dataset (drawn frames in the Cholec80 layout)",
                       "cholec80": "the Cholec80 videos",
                       "imagefolder": "an image-folder dataset"}.get(data_kind, data_kind),
     display=False)
glue("analysis_attacks", f"{len(results):,}", display=False)
glue("analysis_epochs", ", ".join(map(str, sorted(results["epoch"].unique()))), display=False)
glue("analysis_last_epoch", str(last_epoch), display=False)
glue("analysis_lr0_255", f"{job['lr0'] * 255:.2g}", display=False)
glue("analysis_max_iter", str(job["max_iter"]), display=False)
glue("analysis_skipped", str(int(skipped["count"].sum())), display=False)
glue("rule_full_success", f"{100 * rules.full_success:.0f} %", display=False)
glue("rule_stable_within", f"{100 * rules.stable_within:.0f}", display=False)
glue("rule_reference", reference_schedule, display=False)
glue("rule_resamples", f"{statistics.RESAMPLES:,}", display=False)

# %% [markdown]
# ```{admonition} Which data these results come from
# :class: warning
# This build analyses {glue:text}`analysis_data`. With the default synthetic data the
# numbers exercise the whole pipeline and show how the analysis reads, but they say nothing
# about real surgical video; run the pipeline on Cholec80 (see the reproduce chapter) for
# results comparable with the paper.
# ```
#
# The run attacked the checkpoints of epochs {glue:text}`analysis_epochs`:
# {glue:text}`analysis_attacks` attacks in all, with an initial step of
# {glue:text}`analysis_lr0_255`/255 and a budget of {glue:text}`analysis_max_iter` updates.
# {glue:text}`analysis_skipped` attacks ended with a model output that was not finite; they
# enter no average below.
#
# ```{admonition} How uncertainty is shown
# :class: note
# Every number compared below carries a 95 % interval and the count behind it. Rates
# (success, accuracy) have Wilson score intervals; means and medians have bootstrap
# intervals ({glue:text}`rule_resamples` resamples with a fixed seed, so a rebuild draws the
# same bounds). Every schedule attacks the same (image, target) pairs, so schedules are
# compared *paired*: the difference per pair, averaged, with its interval and a Wilcoxon
# signed-rank test. The method chapter gives the details and the verdict rules.
# ```
#
# ## Clean accuracy over training
#
# {numref}`fig-accuracy-f1` repeats the paper's first figure: how well each checkpoint
# classifies the whole test split. It is the baseline against which the robustness of the
# same checkpoints is read in the following figures.

# %% mystnb={"figure": {"caption": "Accuracy and macro F1 on the test split after every training epoch, with 95 % intervals (Wilson for accuracy, bootstrap over test images for macro F1; the paper's Figure 1).", "name": "fig-accuracy-f1"}} tags=["hide-input"]
accuracy = save(aggregates.accuracy_f1_intervals(predictions), "accuracy_f1")
figures.accuracy_f1_chart(accuracy)

# %% [markdown]
# ## How often the attack reaches its target
#
# An attack counts as successful when the model names the target class within the update
# budget. {numref}`fig-success-rate` shows the share of successful attacks per schedule and
# checkpoint with its 95 % Wilson interval (the paper's Figure 2). Schedules whose steps shrink
# quickly have a bounded total step length, so some targets stay out of reach however many
# iterations remain.

# %% mystnb={"figure": {"caption": "Share of attacks that reached their target class within the update budget, per step-size schedule and checkpoint, with 95 % Wilson intervals (the paper's Figure 2).", "name": "fig-success-rate"}} tags=["hide-input"]
rates = save(aggregates.success_rates(results), "success_rate")
figures.success_rate_chart(rates)

# %% [markdown]
# The same rates per checkpoint (rows) and schedule (columns), each with its 95 % Wilson
# interval and the number of attacks behind it:

# %% tags=["remove-input"]
at_last = rates[rates["epoch"] == last_epoch].set_index("schedule")
for name, row in at_last.iterrows():
    glue(f"success_{name.replace('-', '_')}",
         f"{100 * row['success_rate']:.1f} % [{100 * row['success_rate_low']:.1f}, "
         f"{100 * row['success_rate_high']:.1f}]", display=False)
readable.html(readable.interval_pivot(rates, value="success_rate", order=order,
                                      count="attacks", percent=True))

# %% [markdown]
# ## How far the borderline images lie
#
# {numref}`fig-l1-distance` shows the mean L1 distance between the original and the
# borderline image, over the successful attacks only (the paper's Figure 3). The distance is
# the mean absolute change per pixel value, in grey levels of 1/255. A larger distance means
# the checkpoint needed a larger push before it changed its answer; the bars are 95 %
# bootstrap intervals of the mean.

# %% mystnb={"figure": {"caption": "Mean L1 distance (grey levels of 1/255 per pixel value) between original and borderline images, successful attacks only, per schedule and checkpoint, with 95 % bootstrap intervals (the paper's Figure 3).", "name": "fig-l1-distance"}} tags=["hide-input"]
l1 = save(aggregates.mean_l1(results), "mean_l1")
figures.l1_chart(l1)

# %% [markdown]
# The same means (x 1/255) per checkpoint and schedule, each with its 95 % bootstrap interval
# and the number of successful attacks behind it:

# %% tags=["remove-input"]
readable.html(readable.interval_pivot(l1, value="mean_l1_255", order=order, count="successes"))

# %% [markdown]
# ### Schedules compared pair by pair
#
# The means above average over different sets of attacks when the schedules' successes
# differ, and the spread between images is much larger than the difference between schedules.
# Both problems vanish when each schedule is compared with the reference schedule
# ({glue:text}`rule_reference`) on the same (image, target) pairs where both succeeded.
# {numref}`fig-paired-l1` shows the mean of those per-pair differences with its 95 % interval:
# an interval to the left of zero means the schedule finds closer borderline images than the
# reference.

# %% mystnb={"figure": {"caption": "Mean paired difference of L1 (1/255) between each schedule and the reference schedule on the (image, target) pairs where both succeeded, with 95 % bootstrap intervals, per checkpoint.", "name": "fig-paired-l1"}} tags=["hide-input"]
paired_l1 = save(paired.paired_schedule_differences(results, reference=reference_schedule),
                 "paired_l1")
figures.paired_difference_chart(
    paired_l1, title=f"L1 minus {reference_schedule}'s L1 (x 1/255), paired")

# %% [markdown]
# The same differences in numbers: for each checkpoint and schedule, the reference it is
# compared with, the pairs where both succeeded, the mean difference of L1 (x 1/255) with its
# 95 % interval, and the p-value of the Wilcoxon signed-rank test of the differences (a
# p-value below 0.0001 prints as such; "-" where every difference is zero or there are too
# few pairs).

# %% tags=["remove-input"]
readable.html(readable.paired_table(paired_l1, unit="L1, x 1/255"))

# %% [markdown]
# ## Effort and step size at the last checkpoint
#
# {numref}`fig-iterations-lr` gives, for the checkpoint of epoch
# {glue:text}`analysis_last_epoch`, the mean number of updates per attack (a failed attack
# counts the whole budget) and the mean step size actually taken (the paper's Figure 4), with
# 95 % bootstrap intervals. The table after it compares the iterations paired, against the
# reference schedule, on every attack of that checkpoint (a failed attack counts the whole
# budget): mean difference of iterations with its 95 % interval and the signed-rank p-value.

# %% mystnb={"figure": {"caption": "Mean number of iterations (left; failed attacks count the full budget) and mean step size (right, in 1/255) per schedule at the last attacked checkpoint, with 95 % bootstrap intervals (the paper's Figure 4).", "name": "fig-iterations-lr"}} tags=["hide-input"]
effort = save(aggregates.iterations_and_lr(results), "iterations_lr")
figures.iterations_lr_chart(effort)

# %% tags=["remove-input"]
paired_iterations = paired.paired_schedule_differences(
    results[results["epoch"] == last_epoch], reference=reference_schedule, value="iterations",
    successful_only=False, scale=1.0)
readable.html(readable.paired_table(save(paired_iterations, "paired_iterations"),
                                    unit="iterations"))

# %% [markdown]
# ## Beyond the paper
#
# ### Distances between classes
#
# Averaging the distance per pair of source and target tool gives a map of how close the
# classes' regions lie for each checkpoint ({numref}`fig-class-pairs`). The matrix need not
# be symmetric: leaving the Hook region toward the Grasper can be easier than the reverse.
# Choose the schedule with the selector; each panel is one checkpoint. Each cell shows its mean
# and, below it, how many successful attacks it averages (`n`): a cell with a handful of
# attacks is a rough estimate, and an empty cell has no successful attack.

# %% mystnb={"figure": {"caption": "Mean L1 (1/255) of successful attacks per source (rows) and target (columns) tool, one panel per checkpoint, with the number of attacks behind each cell; the selector chooses the schedule.", "name": "fig-class-pairs"}} tags=["hide-input"]
pairs = save(aggregates.class_pair_l1(results), "class_pair_l1")
figures.class_pair_chart(pairs)

# %% [markdown]
# ### What borderline images look like
#
# {numref}`fig-gallery` shows, for the first selected image of several tools at the last
# checkpoint, the original and the image each schedule reached toward the next tool in label
# order, with each perturbation amplified below it so that mid-grey means unchanged.
# {glue:text}`gallery_summary`

# %% mystnb={"figure": {"caption": "Borderline images at the last attacked checkpoint, one block per attacked image. First row: the original, then each schedule's borderline image with its L1 distance (x 1/255); a red frame and \"failed\" mark an attack that did not reach the target within its budget (its image is the last iterate). Second row: each perturbation, amplified by the factor written above the block (mid-grey: no change).", "name": "fig-gallery"}} tags=["hide-input"]
gallery = tables.read_arrays(run_dir, "gallery")
if gallery is not None:
    shown = gallery_summary(gallery_examples(gallery, results))
    glue("gallery_summary", (
        f"Of the {shown['attacks']} attacks shown, {shown['failed']} failed. In the successful "
        f"ones no pixel value changed by more than {shown['largest_change_255']:.1f} grey "
        f"levels (of 255), and their mean L1 is {shown['mean_l1_255']:.2f}/255; whether such "
        "a change is visible depends on the image, so compare each borderline image with its "
        "original."), display=False)
    display(gallery_picture(gallery, results, schedules=order))
else:
    glue("gallery_summary", "This run kept no borderline images.", display=False)
    display(Markdown("*This run kept no borderline images (parameter `gallery_images` of "
                     "03_attack).*"))

# %% [markdown]
# ### Spread of the distances
#
# A mean hides how the distances spread. {numref}`fig-l1-histogram` shows the distribution
# of the L1 distance of the successful attacks at the last checkpoint for every schedule.

# %% mystnb={"figure": {"caption": "Distribution of the L1 distance (1/255) of successful attacks at the last checkpoint, one row per schedule.", "name": "fig-l1-histogram"}} tags=["hide-input"]
histogram = save(aggregates.l1_histogram(results, bins=histogram_bins), "l1_histogram")
figures.l1_histogram_chart(histogram)

# %% [markdown]
# ### Robustness over training, image by image
#
# Each checkpoint attacks its own selection of correctly classified images, so the means of
# {numref}`fig-l1-distance` compare partly different images. Images that every attacked
# checkpoint classifies correctly and selects are *followed*: {numref}`fig-per-image` draws
# each followed image's mean L1 at every epoch (over the same targets at every epoch) beside
# the mean over each checkpoint's own selection. Lines that rise show images around which
# training widened the margin; the table after the figure gives, per schedule, the mean change
# of a followed image's L1 from the first to the last attacked epoch, paired per image, with
# its 95 % interval and the signed-rank p-value.

# %% mystnb={"figure": {"caption": "L1 (1/255) of each followed image at every attacked checkpoint (thin lines, coloured by tool; the same targets at every epoch) and the mean over each checkpoint's own selection with its 95 % interval (black), one panel per schedule.", "name": "fig-per-image"}} tags=["hide-input"]
attacked = tables.read_table(run_dir, "selection")
followed = selection.followed_images(attacked)
per_image = save(aggregates.per_image_l1(results, followed["image_id"]), "per_image_l1")
if per_image.empty:
    display(Markdown("*No image was attacked, and attacked successfully, at every attacked "
                     "checkpoint: there is nothing to follow in this run.*"))
else:
    display(figures.per_image_chart(per_image, l1))

# %% tags=["remove-input"]
change = save(aggregates.per_image_change(per_image), "per_image_change")
glue("followed_images", str(len(followed)), display=False)
glue("followed_of", str(attacked["image_id"].nunique()), display=False)
readable.html(readable.per_image_change_table(change))

# %% [markdown]
# {glue:text}`followed_images` of the {glue:text}`followed_of` attacked images are followed.
#
# ### Distance to the boundary, not past it
#
# An attack that crosses the boundary at update k has overshot it by up to one step, and a
# larger step overshoots more. When the attack stage refines each successful attack (bisecting
# along its last step until the crossing is located within a tolerance), the run records the
# distance at the boundary beside the path distance. The comparison below shows whether the
# ranking of the schedules by mean L1 changes once the overshoot is removed, which separates
# the step size's share of the distance from the schedule's path.

# %% tags=["hide-input"]
ranking = aggregates.refinement_ranking(results)
if ranking is None:
    display(Markdown("**No refined distances in this run**: the attack stage ran without "
                     "refinement (or wrote no `refined_l1` column), so the schedules are ranked "
                     "by path distance only."))
else:
    save(ranking, "refined_ranking")
    changes = save(aggregates.ranking_changes(ranking), "ranking_changes")
    changed = changes.loc[changes["changed"], "epoch"].tolist()
    display(Markdown(
        f"Ordered from the smallest mean L1, the schedules rank differently once the overshoot "
        f"is removed at {len(changed)} of {len(changes)} checkpoint(s)"
        + (f" (epochs {', '.join(map(str, changed))})." if changed else ".")
        + " The chart gives each schedule's mean L1 along the path (the first iterate past "
        "the boundary) and refined (at the boundary), successful attacks only, with 95 % "
        "bootstrap intervals, one panel per checkpoint:"))
    display(figures.refinement_chart(ranking))
    display(Markdown("The schedules ordered by mean L1 at each checkpoint, smallest first, "
                     "along the path and refined:"))
    display(readable.html(readable.ranking_table(changes)))
    display(Markdown(
        f"The refined distances compared pair by pair, as the path distances were above: each "
        f"schedule minus {reference_schedule} on the (image, target) pairs where both "
        "succeeded, mean difference of refined L1 (x 1/255) with its 95 % interval and the "
        "signed-rank p-value:"))
    display(readable.html(readable.paired_table(paired.paired_schedule_differences(
        results, reference=reference_schedule, value="refined_l1"), unit="refined L1, x 1/255")))

# %% [markdown]
# ### Step sizes and losses while the attacks run
#
# {numref}`fig-traces` follows the attacks of the last checkpoint iteration by iteration: the
# mean step size, the mean cross-entropy toward the target, and how many attacks are still
# running (the others have flipped or used their budget). The loss-adaptive schedule scales
# its step by the current loss relative to the largest loss so far, so its steps shrink as
# the image approaches the target region.

# %% mystnb={"figure": {"caption": "Mean step size (1/255), mean target loss and number of attacks still running over the iterations, at the last checkpoint.", "name": "fig-traces"}} tags=["hide-input"]
traces = tables.read_arrays(run_dir, "traces")
trace_table = save(aggregates.trace_summary(traces, results), "traces_summary")
figures.trace_chart(trace_table)

# %% [markdown]
# ### Sensitivity to the initial step size
#
# The paper does not give its initial step size, and every schedule scales with it. The
# attack stage therefore repeats a subset of the attacks at several values of `lr0`
# ({numref}`fig-lr0-sensitivity`). Where the intervals of two schedules separate and then
# cross, the ranking of the schedules depends on this free choice.

# %% mystnb={"figure": {"caption": "Success rate and mean L1 (1/255) of successful attacks against the initial step size lr0, per schedule, on a subset of the images, with 95 % intervals.", "name": "fig-lr0-sensitivity"}} tags=["hide-input"]
sweep = tables.read_sweep(run_dir)
if sweep is None:
    print("the attack stage ran without an lr0 sweep (sweep_lr0 = [])")
else:
    sensitivity = save(aggregates.lr0_sensitivity(sweep), "lr0_sensitivity")
    display(figures.lr0_sensitivity_chart(sensitivity))

# %% [markdown]
# ## The paper's claims, checked
#
# Each row states one claim of the paper, the quantity we estimate for it, the estimate with
# its 95 % interval, how many attacks, pairs or images are behind it, and the verdict. The
# verdict is read off the interval, never off the point estimate:
#
# - "reaches 100 %" **agrees** when the success rate's lower bound is at least
#   {glue:text}`rule_full_success`, **disagrees** when its upper bound is below that level;
#   "falls short of 100 %" is the mirror image;
# - "X is smaller (larger) than Y" **agrees** when the interval of the paired difference lies
#   wholly below (above) zero and **disagrees** when it lies wholly on the other side; where a
#   claim needs several comparisons to hold, every one must agree, and the row shows the one
#   that decides;
# - "changes little across epochs" **agrees** when the interval of the change between the
#   epochs with the highest and the lowest value lies within +-{glue:text}`rule_stable_within`
#   percentage points, and **disagrees** when it lies wholly outside;
# - everything else, including a claim whose schedules or epochs did not run, is
#   **inconclusive**.
#
# The levels are parameters of this chapter (`full_success`, `stable_within`).

# %% tags=["remove-input"]
claims = save(paper_claims(results, predictions, rules=rules), "paper_claims")
# to_html writes every cell in full (a DataFrame's own display cuts text at 50 characters)
display(HTML(readable_claims(claims).to_html(index=False)))

# %% [markdown]
# ## What the run says
#
# The paragraph below is written from the verdicts of the table above when the chapter runs.

# %% tags=["remove-input"]
display(Markdown(claims_conclusion(claims)))

# %% tags=["remove-input"]
save(skipped, "skipped")
pipeline.finish_stage(ANALYSIS_STAGE, run_dir=run_dir)

# %% [markdown]
# ## Downloads
#
# The aggregated tables behind every figure and the claims table:
# {download}`accuracy_f1.csv <analysis/accuracy_f1.csv>`,
# {download}`success_rate.csv <analysis/success_rate.csv>`,
# {download}`mean_l1.csv <analysis/mean_l1.csv>`,
# {download}`paired_l1.csv <analysis/paired_l1.csv>`,
# {download}`iterations_lr.csv <analysis/iterations_lr.csv>`,
# {download}`paired_iterations.csv <analysis/paired_iterations.csv>`,
# {download}`class_pair_l1.csv <analysis/class_pair_l1.csv>`,
# {download}`l1_histogram.csv <analysis/l1_histogram.csv>`,
# {download}`per_image_l1.csv <analysis/per_image_l1.csv>`,
# {download}`per_image_change.csv <analysis/per_image_change.csv>`,
# {download}`traces_summary.csv <analysis/traces_summary.csv>`,
# {download}`paper_claims.csv <analysis/paper_claims.csv>`,
# {download}`skipped.csv <analysis/skipped.csv>`
# (and, when the run has them, `lr0_sensitivity.csv`, `refined_ranking.csv` and
# `ranking_changes.csv` in the run folder's `analysis/`).
#
# ## Summary
#
# The figures from {numref}`fig-accuracy-f1` to {numref}`fig-iterations-lr` are the paper's
# four figures for this run, each with its 95 % intervals; {numref}`fig-paired-l1` compares the
# schedules pair by pair. The class-pair matrix, the gallery, the distance distributions, the
# per-image view, the traces and the lr0 sweep show what the averages hide. Every table is in
# the run folder's `analysis/` and downloadable above.
