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
# spread, how the step sizes behave while an attack runs, and how much the comparison of
# schedules depends on the initial step size. It ends with the paper's claims, each checked
# against our numbers.
#
# Nothing here attacks or evaluates a model: every number is read from the run folder, so the
# chapter can be re-executed in seconds.
#
# ## Prerequisites
#
# The attack stage (03_attack) has written `attack/` into the run folder.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # run folder with train/ and attack/; this stage writes analysis/
stable_within = 0.05  # the largest change across epochs (max - min) the claims table calls "little"
histogram_bins = 30  # bins of the L1 distributions
overwrite = False  # discard analysis/ if made with other parameters

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from lib import figures, io, metrics, pipeline

analysis_dir = pipeline.start_stage(
    "04_analysis", run_dir=run_dir, overwrite=overwrite,
    parameters=pipeline.stage_parameters("04_analysis", globals()),
)
results = metrics.read_results(run_dir)
training = metrics.read_training_metrics(run_dir)
job = io.read_json(Path(run_dir) / "attack" / "job.json")["settings"]
last_epoch = int(results["epoch"].max())
skipped = metrics.skipped_counts(results)


def save(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Keep an aggregated table as analysis/<name>.csv (the book offers it for download)."""
    io.write_csv(analysis_dir / f"{name}.csv", table)
    return table


data_kind = pipeline.read_manifest(run_dir)["stages"]["01_data"]["parameters"]["dataset_kind"]
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
# ## Clean accuracy over training
#
# {numref}`fig-accuracy-f1` repeats the paper's first figure: how well each checkpoint
# classifies the whole test split. It is the baseline against which the robustness of the
# same checkpoints is read in the following figures.

# %% mystnb={"figure": {"caption": "Accuracy and macro F1 on the test split after every training epoch (the paper's Figure 1).", "name": "fig-accuracy-f1"}}
figures.accuracy_f1_chart(save(training, "accuracy_f1"))

# %% [markdown]
# ## How often the attack reaches its target
#
# An attack counts as successful when the model names the target class within the update
# budget. {numref}`fig-success-rate` shows the share of successful attacks per schedule and
# checkpoint (the paper's Figure 2). Schedules whose steps shrink quickly have a bounded total
# step length, so some targets stay out of reach however many iterations remain.

# %% mystnb={"figure": {"caption": "Share of attacks that reached their target class within the update budget, per step-size schedule and checkpoint (the paper's Figure 2).", "name": "fig-success-rate"}}
rates = save(metrics.success_rates(results), "success_rate")
figures.success_rate_chart(rates)

# %%
at_last = rates[rates["epoch"] == last_epoch].set_index("schedule")["success_rate"]
for name, value in at_last.items():
    glue(f"success_{name.replace('-', '_')}", f"{100 * value:.1f} %", display=False)
order = metrics.schedule_order(results)
rates.pivot(index="epoch", columns="schedule", values="success_rate")[order].round(3)

# %% [markdown]
# ## How far the borderline images lie
#
# {numref}`fig-l1-distance` shows the mean L1 distance between the original and the
# borderline image, over the successful attacks only (the paper's Figure 3). The distance is
# the mean absolute change per pixel value, in grey levels of 1/255. A larger distance means
# the checkpoint needed a larger push before it changed its answer; the error bars are one
# standard error of the mean.

# %% mystnb={"figure": {"caption": "Mean L1 distance (grey levels of 1/255 per pixel value) between original and borderline images, successful attacks only, per schedule and checkpoint; bars are one standard error (the paper's Figure 3).", "name": "fig-l1-distance"}}
l1 = save(metrics.mean_l1(results), "mean_l1")
figures.l1_chart(l1)

# %%
l1_last = l1[l1["epoch"] == last_epoch].set_index("schedule")["mean_l1_255"]
for name, value in l1_last.items():
    glue(f"l1_{name.replace('-', '_')}", f"{value:.3g}", display=False)
l1.pivot(index="epoch", columns="schedule", values="mean_l1_255")[order].round(3)

# %% [markdown]
# ## Effort and step size at the last checkpoint
#
# {numref}`fig-iterations-lr` gives, for the checkpoint of epoch
# {glue:text}`analysis_last_epoch`, the mean number of updates per attack (a failed attack
# counts the whole budget) and the mean step size actually taken (the paper's Figure 4).

# %% mystnb={"figure": {"caption": "Mean number of iterations (left; failed attacks count the full budget) and mean step size (right, in 1/255) per schedule at the last attacked checkpoint (the paper's Figure 4).", "name": "fig-iterations-lr"}}
effort = save(metrics.iterations_and_lr(results), "iterations_lr")
figures.iterations_lr_chart(effort)

# %%
for name, value in effort.set_index("schedule")["mean_iterations"].items():
    glue(f"iterations_{name.replace('-', '_')}", f"{value:.1f}", display=False)
effort.round(4)

# %% [markdown]
# ## Beyond the paper
#
# ### Distances between classes
#
# Averaging the distance per pair of source and target tool gives a map of how close the
# classes' regions lie for each checkpoint ({numref}`fig-class-pairs`). The matrix need not
# be symmetric: leaving the Hook region toward the Grasper can be easier than the reverse.
# Choose the schedule with the selector; each panel is one checkpoint, and an empty cell has
# no successful attack.

# %% mystnb={"figure": {"caption": "Mean L1 (1/255) of successful attacks per source (rows) and target (columns) tool, one panel per checkpoint; the selector chooses the schedule.", "name": "fig-class-pairs"}}
pairs = save(metrics.class_pair_l1(results), "class_pair_l1")
figures.class_pair_chart(pairs)

# %% [markdown]
# ### What borderline images look like
#
# {numref}`fig-gallery` shows, for the first selected image of several tools at the last
# checkpoint, the original, the borderline image each schedule found (toward the next tool in
# label order), and each perturbation amplified so that mid-grey means unchanged. The
# perturbations are far below what the eye notices in the borderline images themselves.

# %% mystnb={"figure": {"caption": "Borderline images at the last checkpoint. Per row: the original, the borderline image of each schedule, then each schedule's perturbation amplified (grey = no change; one amplification per row).", "name": "fig-gallery"}}
gallery = metrics.read_npz(run_dir, "gallery.npz")
if gallery is not None:
    display(figures.gallery_picture(gallery, scale=2))
else:
    display(Markdown("*This run kept no borderline images (parameter `gallery_images` of 03_attack).*"))

# %% [markdown]
# ### Spread of the distances
#
# A mean hides how the distances spread. {numref}`fig-l1-histogram` shows the distribution
# of the L1 distance of the successful attacks at the last checkpoint for every schedule.

# %% mystnb={"figure": {"caption": "Distribution of the L1 distance (1/255) of successful attacks at the last checkpoint, one row per schedule.", "name": "fig-l1-histogram"}}
histogram = save(metrics.l1_histogram(results, bins=histogram_bins), "l1_histogram")
figures.l1_histogram_chart(histogram)

# %% [markdown]
# ### Step sizes and losses while the attacks run
#
# {numref}`fig-traces` follows the attacks of the last checkpoint iteration by iteration: the
# mean step size, the mean cross-entropy toward the target, and how many attacks are still
# running (the others have flipped or used their budget). The loss-adaptive schedule scales
# its step by the current loss relative to the largest loss so far, so its steps shrink as
# the image approaches the target region.

# %% mystnb={"figure": {"caption": "Mean step size (1/255), mean target loss and number of attacks still running over the iterations, at the last checkpoint.", "name": "fig-traces"}}
traces = metrics.read_npz(run_dir, "traces.npz")
trace_table = save(metrics.trace_summary(traces, results), "traces_summary")
figures.trace_chart(trace_table)

# %% [markdown]
# ### Sensitivity to the initial step size
#
# The paper does not give its initial step size, and every schedule scales with it. The
# attack stage therefore repeats a small subset of the attacks at several values of `lr0`
# ({numref}`fig-lr0-sensitivity`). Where the lines cross, the ranking of the schedules
# depends on this free choice.

# %% mystnb={"figure": {"caption": "Success rate and mean L1 (1/255) of successful attacks against the initial step size lr0, per schedule, on a subset of the images.", "name": "fig-lr0-sensitivity"}}
sweep = metrics.read_sweep(run_dir)
if sweep is None:
    print("the attack stage ran without an lr0 sweep (sweep_lr0 = [])")
else:
    sensitivity = save(metrics.lr0_sensitivity(sweep), "lr0_sensitivity")
    display(figures.lr0_sensitivity_chart(sensitivity))

# %% [markdown]
# ## The paper's claims, checked
#
# Each row states one claim of the paper, what the paper reports, what our run gives, and
# whether they agree. The verdicts are computed from the tables above, not written by hand;
# "changes little" is our reading, made concrete as a change of at most the threshold in the
# parameters.

# %%
claims = save(metrics.paper_claims(results, training, stable_within=stable_within),
              "paper_claims")
agreed = int((claims["verdict"] == "agrees").sum())
glue("claims_agree", str(agreed), display=False)
glue("claims_total", str(len(claims)), display=False)
glue("claims_testable", str(int((claims["verdict"] != "not testable").sum())), display=False)
claims

# %%
save(skipped, "skipped")
pipeline.finish_stage("04_analysis", run_dir=run_dir)

# %% [markdown]
# Our run agrees with {glue:text}`claims_agree` of the {glue:text}`claims_total` claims
# ({glue:text}`claims_testable` could be tested with the epochs and schedules that ran).
#
# ## Downloads
#
# The aggregated tables behind every figure and the claims table:
# {download}`accuracy_f1.csv <analysis/accuracy_f1.csv>`,
# {download}`success_rate.csv <analysis/success_rate.csv>`,
# {download}`mean_l1.csv <analysis/mean_l1.csv>`,
# {download}`iterations_lr.csv <analysis/iterations_lr.csv>`,
# {download}`class_pair_l1.csv <analysis/class_pair_l1.csv>`,
# {download}`l1_histogram.csv <analysis/l1_histogram.csv>`,
# {download}`traces_summary.csv <analysis/traces_summary.csv>`,
# {download}`lr0_sensitivity.csv <analysis/lr0_sensitivity.csv>`,
# {download}`paper_claims.csv <analysis/paper_claims.csv>`,
# {download}`skipped.csv <analysis/skipped.csv>`.
#
# ## Summary
#
# The figures from {numref}`fig-accuracy-f1` to {numref}`fig-iterations-lr` are the paper's
# four figures for this run; the class-pair matrix, the gallery, the distance distributions, the
# traces and the lr0 sweep show what the averages hide. Every table is in the run folder's
# `analysis/` and downloadable above.
