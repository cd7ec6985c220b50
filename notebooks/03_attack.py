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
# defaults below keep the whole default build within its time budget on two CPU cores; the
# comments give the paper's values.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # the run folder: this stage reads what the stages before it wrote there and writes its own subfolder
epochs = [1, 3, 4, 5]  # checkpoints to attack; [] for every trained epoch (paper: all 10)
schedules = ["constant", "iteration", "exponential", "step", "loss-adaptive"]  # step-size schedules (lib.attack.schedules), in the order rows use them
lr0 = 0.008  # initial step size > 0 in [0, 1] pixel units, about 2/255 (the paper does not give it)
max_iter = 100  # update budget per attack; no flip by then is a failure (paper: 100)
n_per_class = 4  # correctly classified test images per class and checkpoint (paper: 50)
mode = "targeted"  # "targeted": every other class as target (paper); "untargeted": leave the class
seed = 0  # seed of the one test-split permutation all checkpoints share
batch_size = 128  # attacks in flight per forward/backward pass; float32 results depend on it
chunk_size = 840  # attacks per chunk (one engine call, written atomically): the unit of resume; fewer, longer chunks keep the batch full longer
schedule_constants = {}  # per schedule, constants other than the method chapter's, e.g. {"step": {"drop": 0.5}}
sweep_lr0 = [0.004, 0.008, 0.016, 0.04]  # lr0 values of the sensitivity sweep, a factor 10 around lr0; [] for no sweep
sweep_per_class = 1  # images per class in the sweep (ranks 0 .. k-1 of the main selection)
sweep_epoch = 0  # checkpoint of the sweep; 0 for the last attacked one
gallery_images = 7  # classes whose first image is kept as pictures, at the last attacked checkpoint (every schedule; target ``(source + 1) mod 7``)
precision = "auto"  # model forwards: "float32", "bfloat16" (autocast; successes confirmed in float32) or "auto" (bfloat16 where the device computes it natively)
refine_tolerance = 0.001  # None: off; else bisect each success's last step to this Linf width (pixel units) and report the refined distances beside the path distances
certify = True  # finish attacks that interval bounds prove cannot succeed before their budget ends (lib.attack.stop); outcomes stay those of the full loop; False: the paper's loop to the end
device = "cpu"  # "cpu", "cuda" or "cuda:N"
progress = True  # a progress bar over the stage's work (stderr)
overwrite = False  # discard this stage's results (and those of every later stage) if they were made with other parameters

# %% tags=["remove-input"]
from IPython.display import display
from myst_nb import glue

from lib import TOOLS
from lib.model.precision import resolve as resolve_precision
from lib.run import attack_stage, pipeline, tables
from lib.run.layout import ATTACK_STAGE
from lib.run.parameters import from_namespace, stage_settings

values = from_namespace(ATTACK_STAGE, globals())
attack_dir = pipeline.start_stage(ATTACK_STAGE, run_dir=run_dir, overwrite=overwrite,
                                  parameters=values)

# %%
settings = stage_settings(ATTACK_STAGE, values)
job = attack_stage.plan_job(run_dir, settings)
attack_stage.save_plan(job, run_dir)
main_rows = job.rows[job.rows["kind"] == "main"]
reused = " (the sweep's lr0 equal to lr0 reuses the main rows)" if lr0 in job.settings.sweep_lr0 else ""
print(f"checkpoints {list(job.settings.epochs)}: {len(main_rows)} attacks, "
      f"{len(job.rows) - len(main_rows)} more in the lr0 sweep{reused}, in {len(job.chunks)} chunks; "
      f"model forwards in {resolve_precision(precision, device)} (precision {precision!r}), "
      "every success confirmed in float32")

# %% [markdown]
# The stage plans every attack before running one: the checkpoints, the images each of them
# attacks, and the fixed chunks the rows are cut into.
#
# ## Which images are attacked
#
# One seeded shuffle of the test split serves every checkpoint. For each checkpoint and tool,
# the stage walks that shuffled list and keeps the first images the checkpoint gets right.
# Because the order is shared, two checkpoints that both classify an image correctly attack
# the same image, and differences between epochs come from the model rather than from a new
# draw of images.

# %%
images = job.selection.images
per_class = (images.groupby(["epoch", "label"]).size().unstack(fill_value=0)
             .reindex(columns=range(len(TOOLS)), fill_value=0))
per_class.columns = list(TOOLS)
per_class

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
    display(shortfall)

# %% [markdown]
# ## Running the attacks
#
# The attacks are processed in fixed chunks of consecutive rows. Each chunk is one call of
# the batched engine, written to disk atomically when it finishes, so an interrupted stage
# resumes from its last finished chunk and a rerun gives the same numbers bit for bit.

# %%
attacked = attack_stage.run_chunks(job, run_dir, device=device, progress=progress)
written = attack_stage.merge(job, run_dir)  # the paths of the merged tables

# %% tags=["remove-input"]
pipeline.finish_stage(ATTACK_STAGE, run_dir=run_dir)
print(f"{attacked} chunks attacked now, {len(job.chunks) - attacked} found finished")

# %% [markdown]
# ## A first look
#
# Success rate within the budget, mean iterations and mean L1 of the successful attacks
# (in 1/255 grey levels) per schedule and checkpoint. The analysis chapter draws and discusses
# these numbers.

# %% tags=["remove-input"]
results = tables.read_results(run_dir)
overview = (
    results.assign(l1_success=results["l1_255"].where(results["success"]))
    .groupby(["epoch", "schedule"], sort=False)
    .agg(attacks=("row_id", "size"), success_rate=("success", "mean"),
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
overview.round(3)

# %% [markdown]
# ## Summary
#
# The stage attacked {glue:text}`attack_total` (image, target, schedule) combinations on the
# checkpoints of epochs {glue:text}`attack_epochs`; {glue:text}`attack_shortfall_classes`
# (epoch, class) pairs had fewer correctly classified images than asked for. The certified
# stop (the method chapter) finished {glue:text}`attack_certified` failing attacks before
# their budget ended (column `certified` above), which spared {glue:text}`attack_passes_saved`
# of the forward and backward passes the full loop takes for these attacks. The run folder's
# `attack/` holds `results.csv` (one row per attack), `traces.npz`, `gallery.npz`,
# `lr0_sweep.csv`, `selection.csv` and `shortfall.csv`; the chunks under `attack/chunks/` are
# what a resumed run continues from. The stage measures nothing about the machine it runs
# on: the cost of the paper-scale job is computed in {doc}`../reproduce` from the attack
# benchmark's measured rates.
