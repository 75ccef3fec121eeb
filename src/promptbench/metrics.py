"""Classification metrics from logits, via torchmetrics. Accuracies and ECE are reported in percent."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
)

ECE_BINS = 15
TOP5_MIN_CLASSES = 5


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 (micro), mean per-class accuracy over the classes present, top5 (>= 5 classes), ECE (15 bins)."""
    logits, labels = logits.float(), labels.long()
    num_classes = logits.shape[1]
    per_class = multiclass_accuracy(logits, labels, num_classes=num_classes, average=None)
    present = torch.bincount(labels, minlength=num_classes) > 0
    metrics = {
        "top1": multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro").item() * 100,
        "mean_per_class": per_class[present].mean().item() * 100,
        "ece": multiclass_calibration_error(logits.softmax(-1), labels, num_classes=num_classes, n_bins=ECE_BINS).item() * 100,
        "n": int(labels.numel()),
    }
    if num_classes >= TOP5_MIN_CLASSES:
        metrics["top5"] = multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro", top_k=5).item() * 100
    return metrics
