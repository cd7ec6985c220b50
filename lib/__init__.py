"""Borderline: borderline adversarial images of a surgical-tool CNN.

Modules, one job each (an arrow names what a module imports from lib; there is no cycle):

- ``errors``: the error types every check raises
- ``progress``: progress bars on the terminal that waits, never in a notebook
- ``io``: atomic file writes and safe reads
- ``stages``: the stage contract and the run folder: stage list and outputs, notebook
  parameters, profiles and their merge, every path in a run folder, manifests, the lock
  (-> io, errors)
- ``cholec80``: the Cholec80 layout (annotation parsing, video decoding, exact frame pairing)
- ``synthetic``: the generator of the default dataset, in the Cholec80 layout
- ``datasets``: one dataset interface over Cholec80 and ImageFolder; splits; the frame cache
- ``model``: AlexNet with the normalisation inside; checkpoint save and safe load; ``frozen``
- ``precision``: float32, bfloat16 autocast or "auto": the capability check, the resolution,
  the low-precision forward
- ``ranks``: a process's place in a torchrun launch; steps every rank agrees on
- ``training``: the one training loop (one process or DistributedDataParallel), evaluation,
  per-epoch metrics (-> model, precision, ranks, stages, io)
- ``schedules``: the step-size registry
- ``attack``: the batched stop-at-flip engine: float32-confirmed low-precision checks, the
  optional boundary refinement (-> model, precision, schedules)
- ``selection``: which test images each checkpoint attacks
- ``robustness``: the attack stage: its settings, plan, chunks and merged tables
  (-> attack, schedules, selection, stages, io)
- ``statistics``: intervals (Wilson, Newcombe, seeded bootstrap), paired differences,
  three-way verdict rules
- ``metrics``: aggregates with their intervals and counts, paired schedule comparisons, the
  class-pair matrix, per-image tracking, the paper's claims (-> statistics, stages, minimality)
- ``minimality``: minimum-norm reference attacks and the comparison with our schedules
- ``figures``: altair chart builders shared by the notebooks
- ``checks``: the checks before a stage: parameters, run folder, input files (-> stages)
- ``book``: the book's generated pages (-> stages)
- ``pipeline``: stage commands: papermill execution, ``start_stage``/``finish_stage`` for the
  notebooks, the command line (-> stages, checks, book)
- ``distributed``: the torchrun launcher: process groups, sharding, the command line
  (-> ranks, robustness, pipeline, stages)
- ``rerun``: the rerun proof (strict nbval, result digests) (-> stages)
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
