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
# each checked against our numbers with an interval and a verdict, pooled over every trained
# model and on each model alone.
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

from lib.analysis import aggregates, attack_figures, figures, paired, readable, statistics, trends
from lib.analysis.claim_table import (
    claims_conclusion,
    claims_over_lr0,
    paper_claims,
    readable_claims,
)
from lib.analysis.claims import AttackSetting
from lib.analysis.gallery import gallery_examples, gallery_picture, gallery_summary
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
setting = AttackSetting(job["lr0"], job["max_iter"], job["schedule_constants"])
first_model = int(job["models"][0])  # attacked at every chosen checkpoint: the views beyond the paper show it
first = results[results["model"] == first_model]
last_epoch = int(first["epoch"].max())
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
glue("analysis_images", f"{results.groupby('model')['image_id'].nunique().sum():,}", display=False)
glue("analysis_models", str(results["model"].nunique()), display=False)
glue("analysis_first_model", str(first_model), display=False)
glue("analysis_epochs", ", ".join(map(str, sorted(first["epoch"].unique()))), display=False)
glue("analysis_replicate_epochs", ", ".join(map(str, job["replicate_epochs"])) or "none",
     display=False)
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
# The run trained {glue:text}`analysis_models` model(s) that differ only in their seed and
# attacked the first (seed {glue:text}`analysis_first_model`) at the checkpoints of epochs
# {glue:text}`analysis_epochs`, every other one at epochs
# {glue:text}`analysis_replicate_epochs`: {glue:text}`analysis_attacks` attacks on
# {glue:text}`analysis_images` (model, image) units in all, with an initial step of
# {glue:text}`analysis_lr0_255`/255 and a budget of {glue:text}`analysis_max_iter` updates.
# {glue:text}`analysis_skipped` attacks ended with a model output that was not finite; they
# enter no average below.
#
# ```{admonition} How uncertainty is shown
# :class: note
# Every number compared below carries a 95 % interval and the units behind it. The unit is
# the test image: the six attacks on one image (one per target) share that image's distances
# to the class boundaries, so they are not six independent observations. Rates, means,
# medians and paired differences therefore have *image-bootstrap* intervals: images are drawn
# with replacement and keep all their attacks ({glue:text}`rule_resamples` resamples with a
# fixed seed, so a rebuild draws the same bounds); a rate of 0 % or 100 %, where every
# resample agrees, gets the Wilson interval with one trial per image. Where several trained
# models are pooled, models are drawn first, then images within each drawn model. Tables give
# `images` beside `attacks`. Only clean accuracy, where every test image of one checkpoint is
# one independent trial, keeps its Wilson interval. Every schedule attacks the same (image,
# target) pairs, so schedules are compared *paired*: the difference per pair, averaged, with
# its image-bootstrap interval and a Wilcoxon signed-rank test over the images' mean
# differences. The method chapter gives the details and the verdict rules.
# ```
#
# ## Clean accuracy over training
#
# {numref}`fig-accuracy-f1` repeats the paper's first figure: how well each checkpoint of each
# trained model classifies the whole test split. It is the baseline against which the
# robustness of the same checkpoints is read in the following figures.

# %% mystnb={"figure": {"caption": "Accuracy and macro F1 on the test split after every training epoch, one panel per trained model, with 95 % intervals (Wilson for accuracy, every test image one trial; bootstrap over test images for macro F1; the paper's Figure 1).", "name": "fig-accuracy-f1"}} tags=["hide-input"]
accuracy = save(aggregates.accuracy_f1_intervals(predictions), "accuracy_f1")
figures.per_model(figures.accuracy_f1_chart, accuracy)

# %% [markdown]
# ## How often the attack reaches its target
#
# An attack counts as successful when the model names the target class within the update
# budget. {numref}`fig-success-rate` shows the share of successful attacks per schedule and
# checkpoint with its 95 % image-bootstrap interval, one panel per trained model (the paper's
# Figure 2): how the rate moves over training is read model by model. Schedules whose steps
# shrink quickly have a bounded total step length, so some targets stay out of reach however
# many iterations remain.

# %% mystnb={"figure": {"caption": "Share of attacks that reached their target class within the update budget, per step-size schedule and checkpoint, one panel per trained model, with 95 % intervals resampling images (the paper's Figure 2).", "name": "fig-success-rate"}} tags=["hide-input"]
rates = save(aggregates.success_rates(results), "success_rate")
figures.per_model(attack_figures.success_rate_chart, rates)

# %% [markdown]
# The same rates per model and checkpoint (rows) and schedule (columns), each with its 95 %
# interval and the images and attacks behind it:

# %% tags=["remove-input"]
at_last = rates[(rates["model"] == first_model)
                & (rates["epoch"] == last_epoch)].set_index("schedule")
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
# image-bootstrap intervals of the mean, one panel per trained model.

# %% mystnb={"figure": {"caption": "Mean L1 distance (grey levels of 1/255 per pixel value) between original and borderline images, successful attacks only, per schedule and checkpoint, one panel per trained model, with 95 % intervals resampling images (the paper's Figure 3).", "name": "fig-l1-distance"}} tags=["hide-input"]
l1 = save(aggregates.mean_l1(results), "mean_l1")
figures.per_model(attack_figures.l1_chart, l1)

# %% [markdown]
# The same means (x 1/255) per model, checkpoint and schedule, each with its 95 % interval and
# the images and successful attacks behind it:

# %% tags=["remove-input"]
readable.html(readable.interval_pivot(l1, value="mean_l1_255", order=order, count="successes"))

# %% [markdown]
# ### Schedules compared pair by pair
#
# The means above average over different sets of attacks when the schedules' successes
# differ, and the spread between images is much larger than the difference between schedules.
# Both problems vanish when each schedule is compared with the reference schedule
# ({glue:text}`rule_reference`) on the same (image, target) pairs where both succeeded.
# {numref}`fig-paired-l1` shows the mean of those per-pair differences with its 95 %
# image-bootstrap interval: an interval to the left of zero means the schedule finds closer
# borderline images than the reference.

# %% mystnb={"figure": {"caption": "Mean paired difference of L1 (1/255) between each schedule and the reference schedule on the (image, target) pairs where both succeeded, with 95 % intervals resampling images, per checkpoint, one row of panels per trained model.", "name": "fig-paired-l1"}} tags=["hide-input"]
paired_l1 = save(paired.paired_schedule_differences(results, reference=reference_schedule),
                 "paired_l1")
figures.per_model(lambda part: attack_figures.paired_difference_chart(
    part, title=f"L1 minus {reference_schedule}'s L1 (x 1/255), paired"), paired_l1)

# %% [markdown]
# The same differences in numbers: for each model, checkpoint and schedule (the reference it
# is compared with is named in the column's header), the images and the pairs where both
# succeeded, the mean difference of L1 (x 1/255) with its 95 % interval, and the p-value of
# the Wilcoxon signed-rank test of the images' mean differences (a p-value below 0.0001 prints
# as such; "-" where every difference is zero or there are too few images).

# %% tags=["remove-input"]
readable.html(readable.paired_table(paired_l1, unit="L1, x 1/255"))

# %% [markdown]
# ## Effort and step size at the last checkpoint
#
# {numref}`fig-iterations-lr` gives, for every model's last attacked checkpoint (epoch
# {glue:text}`analysis_last_epoch` of the first), the mean number of updates per attack (a
# failed attack counts the whole budget) and the mean step size actually taken (the paper's
# Figure 4), with 95 % image-bootstrap intervals. The table after it compares the iterations
# paired, against the reference schedule, on every attack of that checkpoint (a failed attack
# counts the whole budget): mean difference of iterations with its 95 % interval, the images
# and pairs behind it, and the signed-rank p-value of the images' mean differences.

# %% mystnb={"figure": {"caption": "Mean number of iterations (left; failed attacks count the full budget) and mean step size (right, in 1/255) per schedule at the last attacked checkpoint, one row per trained model, with 95 % intervals resampling images (the paper's Figure 4).", "name": "fig-iterations-lr"}} tags=["hide-input"]
effort = save(aggregates.iterations_and_lr(results), "iterations_lr")
figures.per_model(attack_figures.iterations_lr_chart, effort)

# %% tags=["remove-input"]
paired_iterations = paired.paired_schedule_differences(
    aggregates.last_epochs(results), reference=reference_schedule, value="iterations",
    successful_only=False, scale=1.0)
readable.html(readable.paired_table(save(paired_iterations, "paired_iterations"),
                                    unit="iterations"))

# %% [markdown]
# ## Beyond the paper
#
# The views of this part show the first model (seed {glue:text}`analysis_first_model`), which
# was attacked at every chosen checkpoint with the most images, unless they say otherwise.
#
# ### Distances between classes
#
# Averaging the distance per pair of source and target tool gives a map of how close the
# classes' regions lie for each checkpoint ({numref}`fig-class-pairs`). The matrix need not
# be symmetric: leaving the Hook region toward the Grasper can be easier than the reverse.
# Choose the schedule with the selector; each panel is one checkpoint. Each cell shows its mean
# and, below it, how many successful attacks it averages (`n`; each image is attacked once per
# target, so these are images too): a cell with a handful of attacks is a rough estimate, and
# an empty cell has no successful attack.

# %% mystnb={"figure": {"caption": "Mean L1 (1/255) of successful attacks per source (rows) and target (columns) tool, one panel per checkpoint, with the number of attacks behind each cell; the selector chooses the schedule.", "name": "fig-class-pairs"}} tags=["hide-input"]
pairs = save(aggregates.class_pair_l1(first), "class_pair_l1")
attack_figures.class_pair_chart(pairs)

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
    shown = gallery_summary(gallery_examples(gallery, first))  # the first model's gallery
    glue("gallery_summary", (
        f"Of the {shown['attacks']} attacks shown, {shown['failed']} failed. In the successful "
        f"ones no pixel value changed by more than {shown['largest_change_255']:.1f} grey "
        f"levels (of 255), and their mean L1 is {shown['mean_l1_255']:.2f}/255; whether such "
        "a change is visible depends on the image, so compare each borderline image with its "
        "original."), display=False)
    display(gallery_picture(gallery, first, schedules=order))
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
histogram = save(aggregates.l1_histogram(first, bins=histogram_bins), "l1_histogram")
attack_figures.l1_histogram_chart(histogram)

# %% [markdown]
# ### Robustness over training, image by image
#
# Each checkpoint attacks its own selection of correctly classified images, so the means of
# {numref}`fig-l1-distance` compare partly different images. Images that every attacked
# checkpoint of a model classifies correctly and selects are *followed*:
# {numref}`fig-per-image` draws each followed image's mean L1 at every epoch (over the same
# targets at every epoch) beside the mean over each checkpoint's own selection, one row of
# panels per trained model. Lines that rise show images around which training widened the
# margin; the table gives, per model, the mean change per image from the first to the last
# attacked epoch, paired per image and resampled by image, with its 95 % interval and the
# signed-rank p-value. A trend that every model shows is one of the training, not of one
# network.

# %% mystnb={"figure": {"caption": "L1 (1/255) of each followed image at every attacked checkpoint (thin lines, coloured by tool; the same targets at every epoch) and the mean over each checkpoint's own selection with its 95 % interval (black), one panel per schedule, one row per trained model.", "name": "fig-per-image"}} tags=["hide-input"]
attacked = tables.read_table(run_dir, "selection")
per_image = save(trends.per_image_l1(results, attacked), "per_image_l1")
if per_image.empty:
    display(Markdown("*No image was attacked, and attacked successfully, at every attacked "
                     "checkpoint: there is nothing to follow in this run.*"))
else:
    display(figures.per_model(lambda part: attack_figures.per_image_chart(
        part, l1[l1["model"] == part["model"].iloc[0]]), per_image))

# %% tags=["remove-input"]
change = save(trends.per_image_change(per_image), "per_image_change")
followed = per_image.groupby("model")["image_id"].nunique()
glue("followed_images", ", ".join(f"{n} of seed {m}" for m, n in followed.items()) or "none",
     display=False)
glue("followed_of", str(attacked.groupby("model")["image_id"].nunique().sum()), display=False)
readable.html(readable.per_image_change_table(change))

# %% [markdown]
# Followed images with a successful attack at every checkpoint: {glue:text}`followed_images`
# (of {glue:text}`followed_of` attacked (model, image) units).
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
    changed = changes.loc[changes["changed"], ["model", "epoch"]].itertuples(index=False)
    changed = [f"seed {m} epoch {e}" for m, e in changed]
    display(Markdown(
        f"Ordered from the smallest mean L1, the schedules rank differently once the overshoot "
        f"is removed at {len(changed)} of {len(changes)} checkpoint(s) of the trained models"
        + (f" ({', '.join(changed)})." if changed else ".")
        + " The chart gives each schedule's mean L1 along the path (the first iterate past "
        "the boundary) and refined (at the boundary), successful attacks only, with 95 % "
        "intervals resampling images, one panel per checkpoint and one row per trained model:"))
    display(figures.per_model(attack_figures.refinement_chart, ranking))
    display(Markdown("The schedules ordered by mean L1 at each checkpoint, smallest first, "
                     "along the path and refined:"))
    display(readable.html(readable.ranking_table(changes)))
    display(Markdown(
        f"The refined distances compared pair by pair, as the path distances were above: each "
        f"schedule minus {reference_schedule} on the (image, target) pairs where both "
        "succeeded, mean difference of refined L1 (x 1/255) with its 95 % interval, the images "
        "and pairs behind it, and the signed-rank p-value:"))
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
trace_table = save(aggregates.trace_summary(traces, first), "traces_summary")
attack_figures.trace_chart(trace_table)

# %% [markdown]
# ### Sensitivity to the initial step size
#
# The paper does not give its initial step size, and every schedule scales with it. The
# attack stage therefore repeats a subset of the attacks at several values of `lr0`
# ({numref}`fig-lr0-sensitivity`): the first model's last attacked checkpoint, a subset of its
# images. Where the intervals of two schedules separate and then cross, the ranking of the
# schedules depends on this free choice; the claims below are checked at every swept lr0 too.

# %% mystnb={"figure": {"caption": "Success rate and mean L1 (1/255) of successful attacks against the initial step size lr0, per schedule, on a subset of the first model's images at its last attacked checkpoint, with 95 % intervals resampling images.", "name": "fig-lr0-sensitivity"}} tags=["hide-input"]
sweep = tables.read_sweep(run_dir)
if sweep is None:
    print("the attack stage ran without an lr0 sweep (sweep_lr0 = [])")
else:
    sensitivity = save(aggregates.lr0_sensitivity(sweep), "lr0_sensitivity")
    display(attack_figures.lr0_sensitivity_chart(sensitivity))

# %% [markdown]
# ## The paper's claims, checked
#
# Each row states one claim of the paper as the paper states it, the quantity we estimate for
# it, the estimate with its 95 % interval pooled over every trained model (models drawn, then
# images within each drawn model), the images, models and attacks (or pairs) behind it, and the
# pooled verdict. Beside it stand the verdict each model gives on its own and how many models
# agree: a claim that holds pooled but for one model only is a statement about that network.
# With {glue:text}`analysis_models` models, the between-model part of a pooled interval rests
# on that many values and is coarse. Every claim about the attacks holds at one setting, named
# in the last column with the reason where a claim holds by construction (a schedule whose
# steps have a bounded sum cannot reach a far boundary; its number still says how far it
# gets). The verdict is read off the interval, never off the point estimate:
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
# "Changes little across epochs" compares the epochs every model was attacked at, pairing the
# same (image, target) attacks (success) or the same test images (accuracy). The levels are
# parameters of this chapter (`full_success`, `stable_within`).

# %% tags=["remove-input"]
claims = save(paper_claims(results, predictions, rules=rules, setting=setting), "paper_claims")
# to_html writes every cell in full (a DataFrame's own display cuts text at 50 characters)
display(HTML(readable_claims(claims).to_html(index=False)))

# %% [markdown]
# ### The claims over the lr0 sweep
#
# The paper does not give its lr0, so each claim that one checkpoint can decide is checked
# again at every lr0 of the sweep (the first model's last attacked checkpoint and the sweep's
# images only, so the intervals are wider). A verdict that changes along a row depends on
# lr0; the setting of the table above is one column of it.

# %% tags=["remove-input"]
if sweep is None:
    display(Markdown("*This run has no lr0 sweep (`sweep_lr0 = []` in 03_attack).*"))
else:
    over_lr0 = save(claims_over_lr0(sweep, rules=rules, setting=setting), "claims_lr0")
    display(HTML(over_lr0.assign(
        cell=[f"{r.verdict}: {readable.interval_text(r.estimate, r.low, r.high)} ({r.images} images)"
              for r in over_lr0.itertuples()],
        lr0=[f"lr0 = {v:.3g}/255" for v in over_lr0["lr0_255"]])
        .pivot(index="claim", columns="lr0", values="cell")
        .reindex(list(dict.fromkeys(over_lr0["claim"]))).to_html()))

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
# (and, when the run has them, `lr0_sensitivity.csv`, `claims_lr0.csv`, `refined_ranking.csv`
# and `ranking_changes.csv` in the run folder's `analysis/`).
#
# ## Summary
#
# The figures from {numref}`fig-accuracy-f1` to {numref}`fig-iterations-lr` are the paper's
# four figures for this run, each with its 95 % intervals; {numref}`fig-paired-l1` compares the
# schedules pair by pair. The class-pair matrix, the gallery, the distance distributions, the
# per-image view, the traces and the lr0 sweep show what the averages hide. Every table is in
# the run folder's `analysis/` and downloadable above.
