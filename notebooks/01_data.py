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
# # Data
#
# ## Overview
#
# Cholec80 holds 80 videos of laparoscopic cholecystectomy, each annotated once per second with
# the presence of seven tools {cite:p}`twinanda2017endonet`. This stage reads a folder in that
# layout, keeps the annotated frames that show exactly one tool, labels each with its tool,
# splits them by video into training and test frames, and caches the decoded frames at the
# run's image size so that no later stage decodes video again.
#
# ```{admonition} Which data this build used
# :class: note
# The parameters of this build (the table below) say which dataset this page was built from.
# The default build uses a **synthetic** dataset written by `lib.data.synthetic` in the exact
# Cholec80 layout (mp4 videos at 25 fps and `tool_annotations/videoNN-tool.txt` files); it is
# read by the same Cholec80 reader as the real data, but its frames are drawn, not filmed.
# ```
#
# ## Prerequisites
#
# Nothing but a dataset folder. With `dataset_kind = "synthetic"` the folder is generated when
# it does not exist yet; with `"cholec80"` it must hold the real `videos/` and
# `tool_annotations/` folders; with `"imagefolder"` it holds `train/<Tool>/` and `test/<Tool>/`
# image folders.

# %% tags=["parameters"]
run_dir = "data/runs/default"  # the run folder: this stage reads what the stages before it wrote there and writes its own subfolder
dataset_kind = "synthetic"  # "synthetic" (generated if missing), "cholec80" or "imagefolder"
dataset_root = "data/cholec80-synthetic"  # the dataset folder (Cholec80 layout or ImageFolder)
train_videos = "1-40"  # video ids of the training split (paper: 1-40; ids not present are skipped)
test_videos = "41-80"  # video ids of the test split (paper: 41-80)
image_size = 64  # frames are resized to image_size x image_size (paper scale: 224)
cache_dir = "data/cache"  # decoded frames, one folder per dataset and image size
synthetic_videos = 16  # synthetic only: number of videos (2-80; half train, half test)
synthetic_seconds = 900  # synthetic only: annotated seconds per video; 15 minutes give a first epoch large enough to learn every tool
synthetic_width = 192  # synthetic only: frame width in pixels, even (Cholec80: 854)
synthetic_height = 108  # synthetic only: frame height in pixels, even (Cholec80: 480)
seed = 0  # synthetic only: the generator's seed
workers = 2  # processes decoding videos in parallel (1: in this process)
overwrite = False  # discard this stage's results (and those of every later stage) if they were made with other parameters

# %% tags=["remove-input"]
import torch
from IPython.display import display
from myst_nb import glue

from lib import TOOLS
from lib.analysis import figures
from lib.analysis.readable import html
from lib.data import datasets, synthetic
from lib.data.counts import (
    PUBLISHED_COUNTS,
    class_counts,
    compare_with_published,
    tools_per_frame,
)
from lib.run import data_stage, pipeline
from lib.run.layout import DATA_STAGE
from lib.run.parameters import from_namespace

data_dir = pipeline.start_stage(DATA_STAGE, run_dir=run_dir, overwrite=overwrite,
                                parameters=from_namespace(DATA_STAGE, globals()))
if dataset_kind == "synthetic":
    synthetic.ensure(
        dataset_root, n_videos=synthetic_videos, seconds_per_video=synthetic_seconds,
        width=synthetic_width, height=synthetic_height, seed=seed,
    )
splits = datasets.load(
    dataset_kind, dataset_root, image_size=image_size, train_videos=train_videos,
    test_videos=test_videos, cache_dir=cache_dir, workers=workers,
)
data_stage.write_run_data(run_dir, splits)
pipeline.finish_stage(DATA_STAGE, run_dir=run_dir)
decoded = len(splits["train"].meta.get("decoded_videos", []))  # one list for the whole load
print(f"{len(splits['train'])} training and {len(splits['test'])} test frames of "
      f"{image_size} px;\nvideos decoded now: {decoded} (the others came from the cache)")

# %% [markdown]
# ## Frames per tool
#
# A frame enters the study when exactly one tool is annotated in it. The label is that tool.
# Frames with two or more tools are ambiguous for a single-label classifier and frames with no
# tool have no label, so both are left out, as in the paper.

# %% tags=["remove-input"]
counts = class_counts(splits)
table = counts.pivot(index="tool", columns="split", values="frames").loc[list(TOOLS), ["train", "test"]]
table.loc["all"] = table.sum()
glue("data_train_frames", f"{int(table.loc['all', 'train']):,}", display=False)
glue("data_test_frames", f"{int(table.loc['all', 'test']):,}", display=False)
published = PUBLISHED_COUNTS["train"]
for tool in ("Hook", "Scissors"):  # the most and the least frequent tool of Cholec80
    glue(f"data_{tool.lower()}_share",  # a no-break space keeps number and % on one line
         f"{100 * table.loc[tool, 'train'] / max(table.loc['all', 'train'], 1):.1f}\u00a0%",
         display=False)
    glue(f"cholec80_{tool.lower()}_share",
         f"{100 * published[tool] / sum(published.values()):.1f}\u00a0%", display=False)
html(table.rename(columns={"train": "training frames", "test": "test frames"})
     .rename_axis(index="tool", columns=None).reset_index())

# %% mystnb={"figure": {"caption": "Single-tool frames per tool in the training and test split.", "name": "fig-data-counts"}} tags=["hide-input"]
figures.class_counts_chart(counts)

# %% [markdown]
# The training split has {glue:text}`data_train_frames` single-tool frames and the test split
# {glue:text}`data_test_frames`. The tools are far from balanced: in this build the Hook makes
# up {glue:text}`data_hook_share` of the single-tool training frames and the Scissors
# {glue:text}`data_scissors_share`; in Cholec80's published counts the Hook makes up
# {glue:text}`cholec80_hook_share` and the Scissors {glue:text}`cholec80_scissors_share`. This
# is why the training chapter reports macro F1 beside accuracy.
#
# ## How many tools per annotated frame

# %% mystnb={"figure": {"caption": "Share of annotated frames that show no tool, one tool, or two or more.", "name": "fig-data-tools-per-frame"}} tags=["hide-input"]
if dataset_kind == "imagefolder":
    shares = None
    print("An ImageFolder dataset holds labelled images only: no per-frame annotation to count.")
else:
    shares = tools_per_frame(dataset_root, train_videos=train_videos, test_videos=test_videos)
    shares = shares[shares["split"] != "all"].rename(columns={"tools": "tools_present"})
    display(figures.tool_share_chart(shares))

# %% [markdown]
# ## Comparison with the published Cholec80 counts
#
# On the real Cholec80 (all 80 videos, split 1-40 / 41-80) the counts must equal the ones the
# paper reports: 31,477 training and 48,713 test frames. The table below compares them cell by
# cell; on the synthetic data they differ by construction.

# %% tags=["remove-input"]
comparison = compare_with_published(counts)
all_match = bool(comparison["match"].all())
glue("data_counts_match", "match" if all_match else "do not match", display=False)
html(comparison.assign(match=comparison["match"].map({True: "yes", False: "no"})).rename(
    columns={"frames": "frames here", "published": "frames in Cholec80 (published)",
             "match": "equal"}))

# %% [markdown]
# Our counts {glue:text}`data_counts_match` the published ones.
#
# ## Sample frames
#
# Four frames of each tool from the training split, at the resolution the network sees.

# %% tags=["remove-input"]
samples = []
for label in range(len(TOOLS)):
    picks = (splits["train"].labels == label).nonzero().flatten()[:4]
    samples.append(splits["train"].images[picks])
print("rows, top to bottom: " + ", ".join(TOOLS))
figures.image_grid(torch.cat(samples), columns=4, scale=2)

# %% [markdown]
# ## Summary
#
# The run folder's `data/` now holds `dataset.json` (where the frames came from and at which
# size), `frames.csv` (one row per single-tool frame: id, split, video, frame number, label)
# and `counts.csv`. The decoded frames live in the cache folder, one file per video and image
# size, so the next stages, and reruns of this one, decode nothing.
