"""Borderline: borderline adversarial images of a surgical-tool CNN.

Modules, one job each:

- ``cholec80``: the Cholec80 layout (annotation parsing, video decoding, exact frame pairing)
- ``synthetic``: the generator of the default dataset, in the Cholec80 layout
- ``datasets``: one dataset interface over Cholec80 and ImageFolder; splits; the frame cache
- ``model``: AlexNet with the normalisation inside; checkpoint save and safe load
- ``training``: train and evaluate loops; per-epoch metrics
- ``schedules``: the step-size registry
- ``attack``: the batched stop-at-flip engine
- ``selection``: which test images each checkpoint attacks
- ``metrics``: distances, aggregates, the class-pair matrix
- ``figures``: altair chart builders shared by the notebooks
- ``pipeline``: stages, profiles, run folders and manifests, papermill execution
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
