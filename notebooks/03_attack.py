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
# # Attacking every checkpoint
#
# ## Overview
#
# For each chosen checkpoint this stage picks correctly classified test images, pushes each
# one toward every other tool class with targeted I-FGSM, and stops the moment the model's
# answer flips to the target. The image at that moment sits just across the decision
# boundary: a *borderline* image. How far it had to move from the original (its L1 distance)
# is our measure of how robust the checkpoint is around that image. Every attack is repeated
# with each step-size schedule, so the schedules can be compared on identical inputs.
#
# The stage writes one row per attack into the run folder's `attack/results.csv`, the step
# sizes and losses of every iteration into `attack/traces.npz`, a few borderline images into
# `attack/gallery.npz`, and a small sweep over the initial step size into
# `attack/lr0_sweep.csv`. The analysis stage draws every figure from these files.
#
# ## Prerequisites
#
# The training stage (02_train) has written the checkpoints and `train/predictions.csv`. The
# table below gives the parameters of this build; the meaning of each names the paper's value
# where the paper gives one.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # the run folder: this stage reads what the stages before it wrote there and writes its own subfolder
epochs = [1, 3, 4, 5]  # checkpoints of the first model to attack; [] for every trained epoch (paper: all 10)
models = []  # seeds of the trained models to attack, increasing; the first is attacked at epochs with n_per_class images, the others (replicates) at replicate_epochs with replicate_per_class; [] for every trained model
replicate_epochs = []  # checkpoints of every model but the first; [] for the first and the last of the first model's attacked epochs
schedules = ["constant", "iteration", "exponential", "step", "loss-adaptive"]  # step-size schedules (lib.attack.schedules), in the order rows use them
lr0 = 0.008  # initial step size > 0 in [0, 1] pixel units, about 2/255 (the paper does not give it)
max_iter = 100  # update budget per attack; no flip by then is a failure (paper: 100)
n_per_class = 4  # correctly classified test images per class and checkpoint (paper: 50)
replicate_per_class = 1  # the same for every model but the first (n_per_class where that is smaller): the replicates trade images for models, which the budget of the default build needs
mode = "targeted"  # "targeted": every other class as target (paper); "untargeted": leave the class
seed = 0  # seed of the one test-split permutation all checkpoints share
batch_size = 128  # attacks in flight per forward/backward pass; float32 results depend on it
chunk_size = 840  # attacks per chunk (one engine call, written atomically): the unit of resume; fewer, longer chunks keep the batch full longer
schedule_constants = {}  # per schedule, constants other than the method chapter's, e.g. {"step": {"drop": 0.5}}
sweep_lr0 = [0.004, 0.008, 0.04]  # lr0 values of the sensitivity sweep, a factor 10 around lr0; [] for no sweep
sweep_per_class = 1  # images per class in the sweep (ranks 0 .. k-1 of the main selection)
sweep_epoch = 0  # checkpoint of the sweep; 0 for the last attacked one
gallery_images = 7  # the first classes that have an image at the last attacked checkpoint; their first image is kept as pictures (every schedule; target ``(source + 1) mod 7``)
precision = "auto"  # model forwards: "float32", "bfloat16" (autocast; successes confirmed in float32) or "auto" (bfloat16 where the device computes it natively)
refine_tolerance = 0.001  # None: off; else bisect each success's last step to this Linf width (pixel units) and report the refined distances beside the path distances
certify = True  # finish attacks that interval bounds prove cannot succeed before their budget ends (lib.attack.stop); outcomes stay those of the full loop; False: the paper's loop to the end
device = "cpu"  # "cpu", "cuda" or "cuda:N"
progress = True  # a progress bar over the stage's work (on the terminal of the stage command)
overwrite = False  # discard this stage's results (and those of every later stage) if they were made with other parameters

# %% tags=["remove-input"]
from IPython.display import display
from myst_nb import glue

from lib import TOOLS
from lib.analysis.readable import html
from lib.run import attack_stage, pipeline, tables
from lib.run.chapters import checkpoints_sentence, precision_sentence
from lib.run.layout import ATTACK_STAGE
from lib.run.parameters import from_namespace, stage_settings

values = from_namespace(ATTACK_STAGE, globals())
attack_dir = pipeline.start_stage(ATTACK_STAGE, run_dir=run_dir, overwrite=overwrite,
                                  parameters=values)

# %% tags=["remove-input"]
settings = stage_settings(ATTACK_STAGE, values)
job = attack_stage.plan_job(run_dir, settings)
attack_stage.save_plan(job, run_dir)
main_rows = job.rows[job.rows["kind"] == "main"]
reused = " (the sweep's lr0 equal to lr0 reuses the main rows)" if lr0 in job.settings.sweep_lr0 else ""
first_model = job.settings.models[0]
replicates = (f"; the other models (seeds {list(job.settings.models[1:])}) at checkpoints "
              f"{list(job.settings.replicate_epochs)}" if len(job.settings.models) > 1 else "")
print(f"the first model (seed {first_model}) at checkpoints {list(job.settings.epochs)}"
      f"{replicates}: {len(main_rows)} attacks, "
      f"{len(job.rows) - len(main_rows)} more in the lr0 sweep, in {len(job.chunks)} chunks"
      + (f";\n{reused.strip(' ()')}" if reused else ""))
glue("attack_precision", precision_sentence(run_dir, ATTACK_STAGE, values), display=False)
predictions = tables.read_predictions(run_dir)
glue("attack_checkpoints", checkpoints_sentence(predictions[predictions["model"] == first_model],
                                                job.settings.epochs), display=False)

# %% [markdown]
# The stage plans every attack before running one: the models and checkpoints, the images each
# of them attacks, and the fixed chunks the rows are cut into. The model's forwards compute in
# {glue:text}`attack_precision`; a crossing is confirmed in float32 whatever the precision
# (the method chapter says how).
#
# ## Which checkpoints are attacked
#
# Every attacked checkpoint adds its own attacks to the stage's time, so a build may attack
# only some of them: the parameter `epochs` lists them for the first model.
# {glue:text}`attack_checkpoints` The default profile attacks the checkpoints of epochs 1, 3, 4
# and 5, the first and the last included, and leaves out epoch 2 by choice: in a trial run of
# the profile the checkpoint of epoch 2 classified only 2 of the 430 Clipper test frames
# correctly, too few for the four images per tool the stage attacks, while those of epochs 3 to
# 5 had at least 40 of every tool (the training chapter gives the measurements).
#
# ## Which models and images are attacked
#
# The training stage trained one model per seed. The first model is attacked at every chosen
# checkpoint with `n_per_class` images per tool; every other model (a replicate, differing
# from the first only in its seed) at the checkpoints `replicate_epochs`, by default the first
# and the last, with `replicate_per_class` images per tool. The replicates trade images for
# models: a verdict that holds for every model is a statement about the training recipe, not
# about one network, and that needs several networks more than many images of each.
#
# One seeded shuffle of the test split serves every model and checkpoint. For each checkpoint
# and tool, the stage walks that shuffled list and keeps the first images the checkpoint gets
# right. Because the order is shared, two checkpoints that both classify an image correctly
# attack the same image, and differences between epochs come from the model rather than from
# a new draw of images.

# %% tags=["hide-input"]
images = job.selection.images
per_class = (images.groupby(["model", "epoch", "label"]).size().unstack(fill_value=0)
             .reindex(columns=range(len(TOOLS)), fill_value=0))
per_class.columns = list(TOOLS)
html(per_class.rename_axis(columns=None).reset_index())

# %% [markdown]
# A class with fewer correctly classified test images than asked for is attacked with what
# there is. The table below lists every such case, or says that there is none.

# %% tags=["remove-input"]
shortfall = job.selection.shortfall
glue("attack_shortfall_classes", str(len(shortfall)), display=False)
if shortfall.empty:
    print(f"No shortfall: {n_per_class} correctly classified images of every tool at every "
          "attacked checkpoint.")
else:
    display(html(shortfall.drop(columns="label").rename(columns={
        "wanted": "images asked for", "available": "correctly classified"})))

# %% [markdown]
# ## Running the attacks
#
# The attacks are processed in fixed chunks of consecutive rows. Each chunk is one call of
# the batched engine, written to disk atomically when it finishes, so an interrupted stage
# resumes from its last finished chunk and a rerun gives the same numbers bit for bit.

# %% tags=["remove-input"]
attacked = attack_stage.run_chunks(job, run_dir, device=device, progress=progress)
written = attack_stage.merge(job, run_dir)  # the paths of the merged tables

# %% tags=["remove-input"]
pipeline.finish_stage(ATTACK_STAGE, run_dir=run_dir)
print(f"{attacked} chunks attacked now, {len(job.chunks) - attacked} found finished")

# %% [markdown]
# ## A first look
#
# Success rate within the budget, mean iterations and mean L1 of the successful attacks
# (in 1/255 grey levels) per model, checkpoint and schedule, with the images and attacks behind
# each and the failing attacks the certified stop ended early. The analysis chapter draws and
# discusses these numbers with their intervals. Attacks whose loss or gradient turned
# non-finite: {glue:text}`attack_not_finite` (they count as failures).

# %% tags=["remove-input"]
results = tables.read_results(run_dir)
overview = (
    results.assign(l1_success=results["l1_255"].where(results["success"]))
    .groupby(["model", "epoch", "schedule"], sort=False)
    .agg(attacks=("row_id", "size"), images=("image_id", "nunique"),
         success_rate=("success", "mean"),
         mean_iterations=("iterations", "mean"), mean_l1_255=("l1_success", "mean"),
         not_ok=("status", lambda s: int((s != "ok").sum())),
         certified=("certified_at", lambda s: int(s.notna().sum())))
)
full_passes = int((results["iterations"] + 1).sum())
run_passes = int(results["certified_at"].fillna(results["iterations"]).sum()) + len(results)
glue("attack_total", f"{len(results):,}", display=False)
glue("attack_certified", f"{int(results['certified_at'].notna().sum()):,}", display=False)
glue("attack_passes_saved", f"{1 - run_passes / full_passes:.1%}", display=False)
glue("attack_epochs", ", ".join(map(str, job.settings.epochs)), display=False)
glue("attack_models", str(len(job.settings.models)), display=False)
overview["images / attacks"] = [f"{i} / {a}" for i, a in zip(overview.pop("images"),
                                                             overview.pop("attacks"),
                                                             strict=True)]
glue("attack_not_finite", f"{int(overview.pop('not_ok').sum()):,}", display=False)
html(overview.round(3).rename(columns={
    "success_rate": "success rate", "mean_iterations": "mean iterations",
    "mean_l1_255": "mean L1 of successes (x 1/255)",
    "certified": "stopped, certified"}).reset_index())

# %% [markdown]
# ## Summary
#
# The stage attacked {glue:text}`attack_total` (image, target, schedule) combinations on
# {glue:text}`attack_models` trained model(s), the first at the checkpoints of epochs
# {glue:text}`attack_epochs`; {glue:text}`attack_shortfall_classes` (model, epoch, class)
# triples had fewer correctly classified images than asked for. The certified
# stop (the method chapter) finished {glue:text}`attack_certified` failing attacks before
# their budget ended (column `certified` above), which spared {glue:text}`attack_passes_saved`
# of the forward and backward passes the full loop takes for these attacks. The run folder's
# `attack/` holds `results.csv` (one row per attack), `traces.npz`, `gallery.npz`,
# `lr0_sweep.csv`, `selection.csv` and `shortfall.csv`; the chunks under `attack/chunks/` are
# what a resumed run continues from. The stage measures nothing about the machine it runs
# on: the cost of the paper-scale job is computed in {doc}`../reproduce` from the attack
# benchmark's measured rates.
