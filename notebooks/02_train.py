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
# # Training
#
# ## Overview
#
# AlexNet learns to name the tool in each single-tool frame. After every epoch the stage keeps
# a checkpoint and evaluates it on the **whole** test split; the attack stage later measures
# the robustness of each of these checkpoints. The accuracy and F1 per epoch are the paper's
# Figure 1.
#
# ## Prerequisites
#
# The data stage (01_data) has written the run folder's `data/`. The table below gives the
# parameters of this build; the meaning of each names its paper-scale value for Cholec80.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # the run folder: this stage reads what the stages before it wrote there and writes its own subfolder
epochs = 5  # training epochs, one checkpoint each (paper: 10)
batch_size = 64  # images per SGD step (paper scale: 64)
lr = 0.01  # SGD learning rate of the first epoch (AlexNet's 0.01)
lr_decay = 0.5  # the learning rate is multiplied by this after every epoch; 1 keeps it constant (paper), 0.5 halves it (a constant 0.01 loses accuracy after the first epoch)
momentum = 0.9  # SGD momentum (paper scale: 0.9)
weight_decay = 0.0005  # L2 penalty (paper scale: 0.0005)
augment = True  # random flip, crop and brightness/contrast jitter
balance = "sampler"  # "none", "weights" (inverse-frequency loss) or "sampler" (balanced batches, which give a first checkpoint that classifies some images of every tool)
seeds = [0, 1, 2]  # one trained model per seed, each fixing its initialisation, order, augmentation and dropout; the models differ only in it (replicates). Increasing; the first model is the one every chapter shows in full; [0] trains one model
precision = "auto"  # training forwards: "float32", "bfloat16" (autocast, float32 weights) or "auto" (bfloat16 where the device computes it natively)
weights_path = ""  # local ImageNet AlexNet weights to start from; "" trains from scratch
workers = 0  # DataLoader worker processes reading the frame cache (results do not change)
device = "cpu"  # "cpu", "cuda" or "cuda:N"
overwrite = False  # discard this stage's results (and those of every later stage) if they were made with other parameters

# %% tags=["remove-input"]
from myst_nb import glue

from lib.analysis import figures
from lib.analysis.readable import html
from lib.model.precision import resolve as resolve_precision
from lib.run import data_stage, layout, pipeline, tables
from lib.run.chapters import precision_sentence
from lib.run.layout import TRAIN_STAGE
from lib.run.parameters import from_namespace
from lib.train.loop import fit

pipeline.start_stage(TRAIN_STAGE, run_dir=run_dir, overwrite=overwrite,
                     parameters=from_namespace(TRAIN_STAGE, globals()))
first_dir = layout.model_dir(run_dir, seeds[0])  # the first model, shown in full below
train_set = data_stage.load_run_split(run_dir, "train")
test_set = data_stage.load_run_split(run_dir, "test")
print(f"{len(train_set)} training and {len(test_set)} test images of {train_set.image_size} px; "
      f"forwards in {resolve_precision(precision, device)}")
glue("train_precision", precision_sentence(run_dir, TRAIN_STAGE, globals()), display=False)

# %% [markdown]
# ## Training with a checkpoint per epoch
#
# The classes are imbalanced. `balance` chooses how training sees them: not at all (`"none"`),
# through a cross-entropy weighted by inverse class frequency (`"weights"`), or through batches
# drawn with replacement so that every tool comes up equally often (`"sampler"`). Every random
# choice (initial weights, order, augmentation, dropout) comes from the seed and the epoch
# number, so on the CPU a rerun gives identical checkpoints, and an interrupted run continues
# from its last finished epoch with the same result.
#
# **Why the default build trains this way.** The parameters' defaults are the default build's
# values (the stages' settings classes in `lib` hold them; the table of this build's parameters
# above marks any value a build sets otherwise). The default run trains AlexNet from random
# weights, and such a network needs a few thousand images before it tells the seven tools apart:
# in our trials on the synthetic data the test accuracy stayed near chance for the first thousand
# images and passed 0.5 only after about 3,000 (learning rate 0.01) or 5,000 (0.003); a 15-step
# warm-up to 0.01 or AdamW at 1e-4 were no faster in the first 2,900 images. The attack stage
# studies every checkpoint from the first one on, so the first epoch alone must already give a
# working classifier, with some correctly classified images of every tool. The data stage
# therefore generates 16 videos of 15 minutes, about 3,900 single-tool training frames (3-minute
# videos, 812 frames, left the first checkpoint at chance), rather than training many short epochs
# over a small set; every 3 minutes of all 16 videos cost about 40 s to render and decode. The
# learning rate is AlexNet's 0.01 with momentum 0.9, halved after every epoch: measured with the
# weighted loss, a constant 0.01 took the test accuracy from 0.60 after epoch 1 down to 0.32 and
# 0.25 after epochs 2 and 3; multiplied by 0.7 per epoch it fell to 0.42 after epoch 2 and reached
# 0.81 after epoch 5; halved, 0.87. Batches of 64 were the fastest per image on two cores (32 was
# no better per image seen). The rarest tool, the scissors (5 % of the frames), decides the
# balancing. With the weighted loss or with no balancing, the first checkpoint of our trials
# classified none of the 185 test scissors correctly; with balanced batches it classified 23. No
# balancing gave the best last checkpoint (0.96 against 0.91 in the same trials), but a first
# checkpoint with no correct scissors leaves the attack stage nothing to attack for that tool, so
# the default is the sampler. Five epochs, about 19,500 images in all, brought the last checkpoint
# of those trials to an accuracy of about 0.9; the table below gives this build's. The attack
# stage leaves out the checkpoint of epoch 2: in a one-thread trial it classified only 2 of the
# 430 Clipper test frames correctly (the boundary between Grasper, Clipper and Scissors was still
# moving), while epochs 3 to 5 had at least 40 correctly classified images of every tool. The
# paper profile keeps the paper's own scale (10 epochs over Cholec80's 31,477 frames).

# %% [markdown]
# **Several models.** Every verdict of the book would otherwise be a statement about one
# network: one initialisation, one order of the images, one draw of augmentation and dropout.
# The stage therefore trains one model per seed in `seeds`, with every other setting equal, each
# into its own folder (`train/seed_S/`), one after the other; a stopped run continues with the
# model and epoch it stopped at. The first model is the one the chapters show in full; the
# others are replicates, attacked at fewer checkpoints and images (the attack chapter says how
# many), so that the results chapter can say which verdicts hold for every trained model. The
# table gives every model's test accuracy and macro F1 after every epoch.

# %% tags=["remove-input"]
for seed in seeds:
    fit(
        train_set, test_set, out_dir=layout.model_dir(run_dir, seed), epochs=epochs,
        batch_size=batch_size, lr=lr, lr_decay=lr_decay, momentum=momentum,
        weight_decay=weight_decay, augment=augment, balance=balance, seed=seed, device=device,
        weights_path=weights_path or None, num_workers=workers, precision=precision,
    )
pipeline.finish_stage(TRAIN_STAGE, run_dir=run_dir)
every_model = tables.read_training_metrics(run_dir)
metrics = every_model[every_model["model"] == seeds[0]].drop(columns="model")
html(every_model.round(4).rename(columns={
    "model": "model (seed)", "accuracy": "test accuracy", "macro_f1": "test macro F1",
    "train_loss": "training loss (mean over the epoch)", "test_loss": "test loss"}))

# %% [markdown]
# The table gives every checkpoint's test accuracy and macro F1 and the mean cross-entropy
# over the epoch's training batches and over the test split. The model's forwards computed in
# {glue:text}`train_precision`.
#
# ## Loss

# %% mystnb={"figure": {"caption": "Training loss of the first model at every SGD step (grey) and its running mean over 20 steps (black); epoch e ends at e on the horizontal axis.", "name": "fig-training-loss"}} tags=["hide-input"]
figures.loss_curve_chart(tables.read_train_table(first_dir, "losses"))

# %% [markdown]
# ## Accuracy and F1 per epoch
#
# {numref}`fig-training-accuracy-f1` is the paper's Figure 1 for this run: every checkpoint
# of every trained model evaluated on the whole test split. Because the classes are imbalanced,
# the macro F1 (the unweighted mean of the seven per-class F1 scores) is the fairer summary;
# accuracy is dominated by the frequent tools.

# %% mystnb={"figure": {"caption": "Test accuracy and macro F1 of the checkpoint after every epoch, one panel per trained model (the paper's Figure 1).", "name": "fig-training-accuracy-f1"}} tags=["hide-input"]
figures.per_model(figures.accuracy_f1_chart, every_model)

# %% tags=["remove-input"]
last = metrics.iloc[-1]
finals = every_model[every_model["epoch"] == every_model["epoch"].max()]
glue("train_final_accuracy", f"{last['accuracy']:.3f}", display=False)
glue("train_final_macro_f1", f"{last['macro_f1']:.3f}", display=False)
glue("train_epochs", int(last["epoch"]), display=False)
glue("train_models", str(len(seeds)), display=False)
glue("train_final_range", f"{finals['accuracy'].min():.3f} to {finals['accuracy'].max():.3f}",
     display=False)

# %% [markdown]
# After {glue:text}`train_epochs` epochs the first model's test accuracy is
# {glue:text}`train_final_accuracy` and its macro F1 {glue:text}`train_final_macro_f1`; the
# last checkpoints of the {glue:text}`train_models` trained models reach accuracies from
# {glue:text}`train_final_range`. The figures below show the first model.
#
# ## Per-class F1

# %% mystnb={"figure": {"caption": "F1 of every tool on the test split per epoch, the first model.", "name": "fig-training-per-class-f1"}} tags=["hide-input"]
per_class = tables.read_train_table(first_dir, "per_class")
figures.per_class_f1_chart(per_class)

# %% [markdown]
# ## Confusion matrix of the last checkpoint

# %% mystnb={"figure": {"caption": "Confusion matrix of the first model's last checkpoint on the test split; colour is the share of each true class, numbers are frame counts.", "name": "fig-training-confusion"}} tags=["hide-input"]
confusion = tables.read_train_table(first_dir, "confusion")
figures.confusion_chart(confusion[confusion["epoch"] == confusion["epoch"].max()])

# %% [markdown]
# ## Summary
#
# The run folder's `train/` now holds one folder per trained model (`seed_S/`), each with one
# checkpoint per epoch (safetensors: loading one never runs code) and the tables behind these
# figures: `metrics.csv`, `per_class.csv`, `confusion.csv`, `predictions.csv` (every test
# image, every epoch) and `losses.csv`. The attack stage selects each model's images from its
# `predictions.csv`.
