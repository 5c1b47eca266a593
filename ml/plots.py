"""PNG plots for evaluation reports: confusion matrix and training curves (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training hosts or CI
import matplotlib.pyplot as plt


def class_label(value: int, overflow_class: int | None) -> str:
    return f"{value}+" if overflow_class is not None and value == overflow_class else str(value)


def confusion_png(matrix: Sequence[Sequence[int]], classes: Sequence[int], path: Path, *,
                  overflow_class: int | None = None, title: str = "Confusion matrix") -> Path:
    labels = [class_label(c, overflow_class) for c in classes]
    size = max(4.0, 0.6 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axis.text(j, i, str(value), ha="center", va="center",
                      color="white" if top and value > top / 2 else "black", fontsize=8)
    axis.set_xticks(range(len(labels)), labels)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted count")
    axis.set_ylabel("true count")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def curves_png(history: Sequence[dict], path: Path) -> Path:
    """Train loss and validation accuracy/RMSE per epoch, from the training job's history.json."""
    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    left.set_xlabel("epoch")
    left.set_title("training loss")
    left.legend()
    for key, label in (("valid_accuracy", "accuracy"), ("valid_rmse", "RMSE"), ("valid_within1", "within one")):
        if all(key in h for h in history):
            right.plot(epochs, [h[key] for h in history], marker="o", label=label)
    right.set_xlabel("epoch")
    right.set_title("validation (headline count range)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
