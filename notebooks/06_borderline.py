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
# # Does training on borderline images widen the margins?
#
# ## Overview
#
# The paper ends by proposing to use its borderline images as additional training samples,
# which "might" make the network more robust {cite:p}`ding2023adaptive`. This chapter tries
# it. Three *arms* continue the same clean checkpoint of the training stage, under the clean
# run's own learning-rate schedule, and differ only in what each SGD step trains on:
#
# - **control**: the clean images only (the clean run continued);
# - **borderline**: the clean images and, for every correctly classified image of the batch,
#   its borderline image found by our attack (the paper's loss-adaptive schedule by default,
#   toward the nearest boundary, refined to it), labelled with the image's *true* class; the
#   loss mixes the two terms as MMA training does {cite:p}`ding2020mma` (1/3 clean, 2/3
#   borderline by default);
# - **PGD**: projected gradient descent adversarial training {cite:p}`madry2018pgd` at a fixed
#   radius, its step count chosen so that it costs as many forward and backward passes per
#   training image as the borderline arm.
#
# A defence must never be judged by the attack it was trained on. Every model (the start
# checkpoint and each arm's last epoch) is therefore measured on the same test images with
# attacks none of the arms used: FMN {cite:p}`pintor2021fmn`, which searches the smallest
# perturbation that changes the class (the image's *margin*) in the L-infinity and the L2
# norm, and APGD {cite:p}`croce2020apgd` at a fixed radius. Guards check that a wider margin is
# not a masked gradient.
#
# ## What this build found
#
# {glue:text}`bl_found_linf` {glue:text}`bl_found_l2` {glue:text}`bl_found_accuracy`
# {glue:text}`bl_found_pgd` {glue:text}`bl_found_guards`
#
# **Limits.** {glue:text}`bl_limits`
#
# ## Prerequisites
#
# The training stage (02_train) has written its checkpoints; the arms continue its first model
# (the smallest seed). Unless `pgd_epsilon` is given, the attack stage (03_attack) has attacked
# the start checkpoint: the PGD arm's radius is the median of its images' Linf margins there. The defaults fit a small budget: one epoch per arm
# on 512 of the training images, 35 measured test images, FMN with 40 steps (the default
# build gives this chapter a few minutes of two CPU cores; the {doc}`../reproduce` chapter
# gives its measured cost); the paper profile holds the full-scale values.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # the run folder: this stage reads what the stages before it wrote there and writes its own subfolder
start_epoch = 0  # the clean checkpoint every arm continues from; 0 for the last trained epoch
epochs = 1  # fine-tuning epochs of every arm, at the clean run's learning rates continued
train_images = 512  # training images the arms fine-tune on, a seeded draw from the training split (the same for every arm); 0 for all of them
schedule = "loss-adaptive"  # the step-size schedule that finds the borderline images during training
lr0 = 0.008  # that schedule's initial step (pixel units, > 0)
max_updates = 10  # the update cap of each borderline search during training (at least 1)
target = "nearest"  # "nearest" (untargeted: the nearest boundary the search reaches) or "random" (a drawn other class)
share = 1.0  # the share of each batch's correctly classified images that is attacked, in (0, 1]
border_weight = 0.6666666666666666  # the borderline term's weight in the loss, in [0, 1] (MMA training's 2/3); the clean term gets the rest
margin_cap = None  # only images whose borderline image lies closer than this (Linf, pixel units, > 0) enter the borderline term; None for no cap
pgd_epsilon = None  # the PGD arm's Linf radius (pixel units, > 0); None for the start checkpoint's median Linf margin from the attack stage
eval_per_class = 5  # test images per tool measured with the independent attacks, the same images for every model
fmn_steps = 40  # the budget of the minimum-norm attack (FMN) per image and norm (at least 2)
apgd_steps = 10  # APGD's iterations per loss at the fixed epsilon (at least 2)
held_out = 32  # other test images whose PGD robust accuracy is checked after every epoch (catastrophic overfitting), at least 1
accuracy_cost = 2.0  # the clean-accuracy cost (percentage points, 0 or more) that the claim "borderline training costs at most this" allows
seed = 0  # seeds the training subset, the arms' draws, the measured images and the attacks
device = "cpu"  # "cpu", "cuda" or "cuda:N"
progress = True  # a progress bar over the stage's work (stderr)
overwrite = False  # discard this stage's results (and those of every later stage) if they were made with other parameters

# %% tags=["remove-input"]
import pandas as pd
from myst_nb import glue

from lib.analysis import arm_figures, arm_verdicts
from lib.analysis import arms as arm_analysis
from lib.analysis.readable import html, interval_text
from lib.run import (
    borderline_measures,
    borderline_stage,
    data_stage,
    layout,
    manifest,
    pipeline,
    tables,
)
from lib.run.layout import BORDERLINE_STAGE, DATA_STAGE
from lib.run.parameters import from_namespace, stage_settings

values = from_namespace(BORDERLINE_STAGE, globals())
pipeline.start_stage(BORDERLINE_STAGE, run_dir=run_dir, overwrite=overwrite, parameters=values)
settings = stage_settings(BORDERLINE_STAGE, values)
train_set = data_stage.load_run_split(run_dir, "train")
test_set = data_stage.load_run_split(run_dir, "test")
MODEL_WORDS = {"start": "start checkpoint", "control": "control", "borderline": "borderline",
               "pgd": "PGD"}

# %% [markdown]
# ## Three arms from one checkpoint
#
# Every arm fine-tunes the same clean checkpoint on the same training images, with the clean
# run's batch size, momentum, weight decay, augmentation, class balance and seed, at the
# learning rate the clean schedule gives the epochs after the start (the SGD momentum starts
# at zero in every arm). The borderline search and the PGD steps run with the model in eval
# mode and its weights frozen; only the update runs in train mode. After every epoch each arm
# keeps a checkpoint and is evaluated on the whole test split, as the training stage does.

# %% tags=["hide-input"]
trained = borderline_stage.train_arms(run_dir, settings, train_set=train_set,
                                      test_set=test_set, device=device, progress=progress)
subset_size = len(borderline_stage.training_subset(train_set, settings))
print(f"start: epoch {trained.start_epoch} of the model of seed {trained.model}; arms trained "
      f"to epoch {trained.last_epoch} on {subset_size:,} training images; PGD radius "
      f"{trained.pgd_epsilon * 255:.2f}/255 (Linf), {trained.pgd_steps} PGD steps")

# %% [markdown]
# ## What each arm costs
#
# A *pass* is one image through a forward and a backward pass: a training pass updates the
# weights, an attack pass only asks for the gradient with respect to the image, and a forward
# alone (checking which images are correct, bisecting to the boundary) counts as a third of a
# pass. The table gives the passes per training image of every arm and its multiple of the
# control arm's.

# %% tags=["hide-input"]
steps = {arm: tables.read_train_table(layout.arm_dir(run_dir, arm), "steps")
         for arm in ("control", "borderline", "pgd")}
costs = arm_analysis.cost_table(steps, tables.read_table(run_dir, "arm_timings"))
html(costs.assign(model=costs["model"].map(MODEL_WORDS)).round(2)[[
    "model", "steps", "images", "train", "attack", "forwards", "passes", "multiple"]].rename(
    columns={"model": "arm", "steps": "SGD steps", "images": "training images",
             "train": "training passes per image", "attack": "attack passes per image",
             "forwards": "forwards per image", "passes": "passes per image",
             "multiple": "multiple of control"}))

# %% tags=["hide-input"]
print("wall time per epoch on this machine (training and the whole-test-split evaluation): "
      + "; ".join(f"{MODEL_WORDS[row.model]} {row.seconds_per_epoch:.1f} s"
                  for row in costs.itertuples()))

# %% [markdown]
# The PGD arm's {glue:text}`bl_pgd_steps` steps cost {glue:text}`bl_pgd_passes` passes per
# image against the borderline arm's {glue:text}`bl_border_passes` ({glue:text}`bl_pgd_match`).
#
# ## Clean accuracy
#
# Each model on the whole test split, with its 95 % Wilson interval (every test image one
# trial).

# %% tags=["hide-input"]
clean = tables.read_predictions(run_dir)
predictions = {"start": clean[(clean["model"] == trained.model)
                              & (clean["epoch"] == trained.start_epoch)]}
for arm in ("control", "borderline", "pgd"):
    table = tables.read_train_table(layout.arm_dir(run_dir, arm), "predictions")
    predictions[arm] = table[table["epoch"] == trained.last_epoch]
accuracy = arm_analysis.accuracy_table(predictions)
html(pd.DataFrame({
    "model": accuracy["model"].map(MODEL_WORDS), "epoch": accuracy["epoch"],
    "test images": accuracy["test_images"], "correct": accuracy["correct"],
    "accuracy [95 % interval]": [interval_text(r.accuracy, r.low, r.high)
                                 for r in accuracy.itertuples()]}))

# %% [markdown]
# ## Margins under attacks no arm trained on
#
# FMN searches each measured image's smallest perturbation that changes its class, once in
# L-infinity and once in L2 (pixel units in [0, 1]). A third search, for the transfer guard
# below, scales the perturbation FMN found on the control model along its direction until the
# class changes. Each of these ends at an image off the true class, so each bounds the margin
# from above in either norm; an image's margin in a norm is the smallest of them, the *best
# known* (a misclassified image has margin 0; `inf` where no search changed the class). The
# table gives, per model and norm, the median margin over the measured images with its 95 %
# interval resampling images, the quartiles, and on how many of the correctly classified
# images that norm's own FMN search found a boundary.

# %% tags=["hide-input"]
measured = borderline_measures.measure_all(run_dir, trained, test_set, settings, device=device)
margins = arm_analysis.best_known(measured["fmn_margins"], measured["transfer"])
summary = arm_analysis.margin_summary(margins)
scale = summary["norm"].map({"linf": 255, "l2": 1})
html(pd.DataFrame({
    "model": summary["model"].map(MODEL_WORDS),
    "norm": summary["norm"].map({"linf": "Linf (x 1/255)", "l2": "L2"}),
    "images": summary["images"], "correct": summary["correct"],
    "found by its own FMN": summary["found"],
    "median margin [95 % interval]": [interval_text(m * k, lo * k, hi * k) for m, lo, hi, k
                                      in zip(summary["median"], summary["low"],
                                             summary["high"], scale, strict=True)],
    "quartiles": [f"{q1 * k:.3g} to {q3 * k:.3g}" for q1, q3, k
                  in zip(summary["q25"], summary["q75"], scale, strict=True)]}))

# %% mystnb={"figure": {"caption": "Class-balanced robust accuracy against the perturbation size epsilon: the share of the measured test images (the same number per tool) that each model classifies correctly with a best-known margin above epsilon, with 95 % bands resampling images; top Linf (in grey levels, x 1/255), bottom L2 (in [0, 1] pixel units).", "name": "fig-borderline-robust-accuracy"}} tags=["hide-input"]
curves = pd.concat([arm_analysis.robust_accuracy_curves(margins, norm=norm)
                    for norm in ("linf", "l2")], ignore_index=True)
arm_figures.arm_robustness_chart(curves)

# %% [markdown]
# ## Per image: each arm against control
#
# The same images are measured under every model, so the arms are compared image by image:
# the change of an image's margin is the log of its ratio, and the table gives the median over
# images of that ratio (the median image's margin is multiplied by it) with its 95 % interval
# resampling images. An image misclassified by one model only counts as a change of known
# direction; one misclassified by both is left out.

# %% tags=["hide-input"]
compared = arm_analysis.comparisons(margins)
tables.write_table(run_dir, "comparisons", compared)
html(pd.DataFrame({
    "model": compared["model"].map(MODEL_WORDS),
    "against": compared["against"].map(MODEL_WORDS),
    "norm": compared["norm"].map({"linf": "Linf", "l2": "L2"}),
    "margin ratio, median image [95 % interval]": [
        interval_text(r.factor, r.factor_low, r.factor_high) for r in compared.itertuples()],
    "images": compared["n_images"],
    "grew / shrank / misclassified by both": [f"{r.grew} / {r.shrank} / {r.unresolved}"
                                              for r in compared.itertuples()],
    "direction": compared["direction"]}))

# %% mystnb={"figure": {"caption": "Each measured image's best-known margin under the borderline arm against its margin under the control arm (log axes; points above the dashed diagonal grew), Linf in grey levels (x 1/255) and L2 in [0, 1] pixel units.", "name": "fig-borderline-per-image"}} tags=["hide-input"]
arm_figures.arm_margin_chart(margins, model="borderline", against="control")

# %% [markdown]
# ## At a fixed radius
#
# APGD (first with the cross-entropy, then with the difference-of-logits ratio on the images
# that survived) at the PGD arm's radius, on the same images: the share that keeps its class,
# with its 95 % Wilson interval.

# %% tags=["hide-input"]
fixed = arm_analysis.fixed_epsilon_table(measured["fixed_epsilon"])
html(pd.DataFrame({
    "model": fixed["model"].map(MODEL_WORDS), "epsilon (x 1/255)": (255 * fixed["epsilon"]).round(2),
    "images": fixed["images"], "correct": fixed["correct"], "robust": fixed["robust"],
    "robust share [95 % interval]": [interval_text(r.share, r.low, r.high)
                                     for r in fixed.itertuples()]}))

# %% [markdown]
# ## Guards
#
# A model can look robust to a gradient attack because its gradient is useless rather than
# because its boundary is far. Each model passes five checks: the minimum-norm attacks move
# every correctly classified image off its class (they are not stopped by a flat or noisy
# gradient); perturbations found on the control model, scaled along their direction, do not
# change the class of another model sooner than its own white-box (FMN) margin (where they do,
# the margins above already use the smaller, transferred distance); the gradient at the test
# images does not vanish; the held-out PGD robust accuracy does not collapse from one epoch to
# the next (catastrophic overfitting); and every forward of the attacks ran in eval mode.

# %% tags=["hide-input"]
guards = arm_verdicts.guard_table(measured)
html(pd.DataFrame({
    "model": guards["model"].map(MODEL_WORDS), "guard": guards["guard"],
    "passed": guards["passed"].map({True: "yes", False: "NO"}),
    "images": guards["images"], "what was measured": guards["detail"]}))

# %% [markdown]
# ## Claims
#
# The paper's proposal, made testable: four claims, each decided by its 95 % interval (agrees
# when the whole interval supports it, disagrees when the whole interval contradicts it,
# inconclusive otherwise). These are four comparisons on one build's models; the per-image
# comparisons above are descriptive.

# %% tags=["hide-input"]
accuracy_change = arm_analysis.accuracy_change(predictions["borderline"], predictions["control"])
claims = arm_verdicts.arm_claims(compared, accuracy_change, accuracy_cost=accuracy_cost,
                                 pgd_mismatch=trained.pgd_mismatch)
tables.write_table(run_dir, "claims", claims)
html(pd.DataFrame({
    "claim": claims["claim"], "quantity": claims["quantity"],
    "estimate [95 % interval]": [interval_text(r.estimate, r.low, r.high)
                                 for r in claims.itertuples()],
    "counted": [f"{n:,} {what}" for n, what in zip(claims["n"], claims["counted"],
                                                     strict=True)],
    "verdict": claims["verdict"], "detail": claims["detail"]}))

# %% tags=["remove-input"]
found = arm_verdicts.findings(claims, compared, guards, pgd_mismatch=trained.pgd_mismatch)
for name, sentence in found.items():
    glue(f"bl_found_{name}", sentence, display=False)
data_kind = manifest.read_manifest(run_dir)["stages"][DATA_STAGE]["parameters"]["dataset_kind"]
glue("bl_limits", f"{'Synthetic' if data_kind == 'synthetic' else 'Real'} data, one trained "
     f"model (seed {trained.model}), {settings.epochs} fine-tuning epoch(s) per arm on "
     f"{subset_size:,} training images, {int(summary['images'].iloc[0])} measured test images "
     f"and an FMN budget of {settings.fmn_steps} steps per image and norm: every verdict is "
     "this build's, and a small budget leaves many of them inconclusive.", display=False)
glue("bl_pgd_steps", str(trained.pgd_steps), display=False)
glue("bl_pgd_passes", f"{costs.set_index('model').loc['pgd', 'passes']:.2f}", display=False)
glue("bl_border_passes", f"{trained.borderline_passes:.2f}", display=False)
glue("bl_pgd_match", f"{trained.pgd_mismatch:.0%} apart, "
     + ("within" if trained.matched else "outside") + " the 10 % that counts as equal cost",
     display=False)
pipeline.finish_stage(BORDERLINE_STAGE, run_dir=run_dir)  # after its last output

# %% [markdown]
# ## Summary
#
# `borderline/arms/<arm>/` holds each arm's training folder (a checkpoint per epoch, the
# training stage's tables, `steps.csv` with the passes of every step, and for the borderline
# arm `margins_NN.csv`, each training image's margin as the search last found it);
# `borderline/fmn_margins.csv`, `fixed_epsilon.csv`, `transfer.csv`, `gradients.csv`,
# `held_out.csv` and `attack_modes.csv` the measurements; `comparisons.csv` and `claims.csv`
# the comparisons and verdicts (`timings.csv` the wall times, which differ from run to run).
