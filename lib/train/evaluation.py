"""A checkpoint on a whole split: logits, predicted labels and the classification tables.

:func:`evaluate` classifies every image (eval mode, dropout off) and returns the tables the
training stage keeps per epoch: accuracy and macro F1, per-class precision, recall and F1, the
confusion matrix and every prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lib import NUM_CLASSES, TOOLS
from lib.model.network import resolve_device
from lib.progress import tracked
from lib.train.batches import dataset_image_ids, dataset_labels


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: str | torch.device,
    epoch: int,
    progress: bool = False,
) -> dict[str, pd.DataFrame]:
    """Classify the whole ``dataset``; the tables of :func:`classification_tables` plus
    ``predictions`` (epoch, image_id, label, predicted) and ``test_loss`` (mean unweighted
    cross-entropy) as a column of ``metrics``."""
    labels = dataset_labels(dataset, "dataset")
    logits = predict_logits(model, dataset, batch_size=batch_size, device=device, progress=progress)
    predicted = logits.argmax(dim=1)
    tables = classification_tables(labels.numpy(), predicted.numpy(), epoch=epoch)
    tables["metrics"]["test_loss"] = F.cross_entropy(logits.double(), labels).item()
    tables["predictions"] = pd.DataFrame(
        {
            "epoch": epoch,
            "image_id": dataset_image_ids(dataset),
            "label": labels.numpy(),
            "predicted": predicted.numpy(),
        }
    )
    return tables


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Logits float32 [N, num_classes] (on the CPU) for every image of ``dataset``, in order.

    The model runs in eval mode (dropout off); its previous mode is restored afterwards.
    """
    device = resolve_device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    try:
        batches = [
            model(images.to(device)).float().cpu()
            for images, _ in tracked(loader, total=len(loader), desc="evaluate", unit="batch",
                                     enabled=progress, leave=False)
        ]
    finally:
        model.train(was_training)
    return torch.cat(batches)


def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Predicted labels int64 [N] for every image of ``dataset`` (eval mode, in order)."""
    logits = predict_logits(model, dataset, batch_size=batch_size, device=device, progress=progress)
    return logits.argmax(dim=1)


def classification_tables(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, *, epoch: int
) -> dict[str, pd.DataFrame]:
    """Tidy scikit-learn metrics of one epoch's predictions over the 7 tool classes.

    Returns:
        ``metrics``: one row (epoch, accuracy, macro_f1); macro F1 is the unweighted mean over
        all 7 classes (a class never present nor predicted counts as F1 = 0).
        ``per_class``: 7 rows (epoch, tool, label, precision, recall, f1, support).
        ``confusion``: 49 rows (epoch, true, predicted, count), every cell, zeros included.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = list(range(NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    metrics = pd.DataFrame(
        {
            "epoch": [epoch],
            "accuracy": [float(accuracy_score(y_true, y_pred))],
            "macro_f1": [float(np.mean(f1))],
        }
    )
    per_class = pd.DataFrame(
        {
            "epoch": epoch,
            "tool": list(TOOLS),
            "label": labels,
            "precision": precision.astype(float),
            "recall": recall.astype(float),
            "f1": f1.astype(float),
            "support": support.astype(np.int64),
        }
    )
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    true, predicted = np.meshgrid(labels, labels, indexing="ij")
    confusion = pd.DataFrame(
        {
            "epoch": epoch,
            "true": true.ravel(),
            "predicted": predicted.ravel(),
            "count": matrix.ravel().astype(np.int64),
        }
    )
    return {"metrics": metrics, "per_class": per_class, "confusion": confusion}
