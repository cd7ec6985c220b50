"""Borderline: borderline adversarial images of a surgical-tool CNN.

The package is grouped by layer; data flows down the list. ``lib.data``, ``lib.model``,
``lib.attack`` and ``lib.analysis`` take and return tensors and tables and never import
``lib.run``; only ``lib.run`` (and ``lib.train``, for the files a training run writes) knows
where a run folder keeps its files. There is no import cycle.

- ``errors``: the error types every check raises; ``io``: atomic file writes and safe reads;
  ``checking``: the value checks every settings class uses; ``progress``: progress bars on
  the terminal that waits, never in a notebook
- Each stage's parameters have one owner, a settings class beside the code that uses them
  (``data.settings``, ``train.settings``, ``attack.plan``, ``analysis.settings``,
  ``run.minimality_stage``, ``run.borderline_stage``, ``run.margins_stage``): the only
  defaults (the default build's) and the only checks.
- ``data``: reading the data

  - ``cholec80``: the Cholec80 layout (annotation parsing, video decoding, exact frame pairing)
  - ``scene``, ``synthetic``: one synthetic video planned and drawn; the default dataset
    written in the Cholec80 layout
  - ``cache``: the frame cache (decoded frames per video and image size, memory-mapped)
  - ``frames``: ``FrameSet``, labelled frames read on demand
  - ``datasets``: one dataset interface over Cholec80 and ImageFolder; splits by video
  - ``counts``: frame counts, and Cholec80's published ones
  - ``settings``: the data stage's settings

- ``model``: the classifier

  - ``network``: AlexNet with the normalisation inside; the device; ``frozen``
  - ``checkpoints``: a fresh model, ImageNet weights, safetensors checkpoints
  - ``precision``: float32, bfloat16 autocast or "auto"

- ``train``: training the classifier

  - ``loop``: ``fit``, the one training loop (one process or DistributedDataParallel)
  - ``batches``: what an epoch draws (order, balance, augmentation, seeds)
  - ``evaluation``: a checkpoint on a whole split: predictions and classification tables
  - ``resume``: a training folder that a run continues, and the checkpoint it may start from
  - ``borderline``, ``margins``: the borderline-training arms (control, borderline, PGD) as
    batch objectives that ``fit`` calls; each training image's margin
  - ``settings``: the training stage's settings (``fit``'s defaults)

- ``attack``: the attack

  - ``results``: attack rows in, per-attack results out (the result tables' columns)
  - ``engine``: the batched stop-at-flip loop (float32-confirmed low precision)
  - ``api``: the engine's entry points, called as the field calls attacks; every input checked
  - ``boundary``: the crossing test and the refinement of a success's last step
  - ``stop``: the certified early stop: attacks proven unable to succeed finish at once
  - ``bounds``, ``step_bounds``: interval bounds of the logits over a box; bounds of each
    schedule's remaining steps
  - ``schedules``: the step-size registry
  - ``selection``: which test images each checkpoint attacks
  - ``plan``: the attack stage's settings; the attack job's rows and chunks, planned from
    tables
  - ``reference``: minimum-norm reference attacks (adv-lib)
  - ``losses``: the loss an attack follows (cross-entropy or the logit margin)

- ``analysis``: from tables to findings

  - ``statistics``: intervals (Wilson, Newcombe, seeded bootstrap), paired differences,
    three-way verdict rules
  - ``resampling``: the cluster bootstrap (the image as the unit) and the two-level one
    (models, then images); ``general_bootstrap``: the same for any statistic of the rows and
    for thousands of one-row units
  - ``aggregates``: the tables behind the figures, per model and checkpoint, with intervals
    and the images and attacks behind them
  - ``paired``: schedules compared pair by pair
  - ``trends``: over-training trends per model, image by image
  - ``claims``: the paper's claims, each with an interval and a verdict
  - ``minimality``: our distances against the best-known minimal ones; ``minimality_norms``:
    per norm, with image-bootstrap intervals and the verdict
  - ``resampling``: cluster and two-level bootstrap (the image, and the model, as the unit)
  - ``margins``: per-image margins, robust accuracy against epsilon, the margin over training
  - ``pareto``: the schedules at matched success across the lr0 sweep
  - ``failures``: an outcome class for every failed attack
  - ``loss_comparison``: the same attacks under two losses
  - ``conclusions``: conclusions in words, written from the tables
  - ``arms``, ``arm_verdicts``: the borderline-training arms compared per test image, their
    guards and claims
  - ``figures``: the look every chart shares and the data and training charts;
    ``attack_figures``, ``minimality_figures``, ``margin_figures`` and ``arm_figures``: the
    charts of the attack, minimality, margins and borderline-training chapters
  - ``gallery``: the borderline images drawn as one picture that fits the text column
  - ``readable``: tables as the book shows them (headers in words, intervals in one cell)
  - ``settings``: the analysis stage's settings

- ``run``: the run machinery

  - ``layout``: the stages (each name once) and every path in a run folder
  - ``parameters``: the stage registry (each stage's settings class, the runtime parameters),
    profiles and the one merge of defaults, profile and command line
  - ``manifest``: what ran in a run folder, with which parameters and versions
  - ``lock``: one stage at a time in a run folder
  - ``tables``: every table and record of the run folder: its columns and dtypes, its one
    reader and writer (the result columns derive from ``attack.results``; ``stage_columns``
    holds the columns of the margins and borderline-training stages' tables)
  - ``checks``: the checks before a stage (parameters, run folder, input files)
  - ``data_stage``, ``attack_stage``, ``minimality_stage``, ``margins_stage``: the stages' work
    on the run folder (``minimality_stage`` and ``margins_stage`` also hold their stage's
    settings)
  - ``borderline_stage``, ``borderline_measures``: the borderline-training stage's settings and
    arms, and its measurements of every model under attacks no arm trained on
  - ``findings``: the book's page of conclusions, written from the run folder
  - ``pipeline``: stage commands: papermill execution, ``start_stage``/``finish_stage``, the
    command line (``python -m lib.run.pipeline``)
  - ``book``: the book's generated pages
  - ``chapters``: what the chapters say about the build (its parameters, precision and
    attacked checkpoints)
  - ``rerun``: the rerun proof (``python -m lib.run.rerun``)
  - ``distributed``, ``ranks``: the torchrun launcher (``python -m lib.run.distributed``);
    a rank's place and the steps every rank agrees on
"""

#: The seven Cholec80 tools, in the order of the annotation columns; the index is the label.
TOOLS: tuple[str, ...] = (
    "Grasper",
    "Bipolar",
    "Hook",
    "Scissors",
    "Clipper",
    "Irrigator",
    "SpecimenBag",
)
NUM_CLASSES: int = len(TOOLS)

__version__ = "0.1.0"
