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


def coverage_png(curve: Sequence[dict], path: Path, *, threshold_coverage: float | None = None,
                 title: str = "Accuracy by share answered") -> Path:
    """Accuracy of the most confident answers against the share of photos answered (ml.operating's curve)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([row["coverage"] for row in curve], [row["accuracy"] for row in curve], marker="o")
    if threshold_coverage is not None:
        axis.axvline(threshold_coverage, color="grey", linestyle="--", label="the model's count threshold")
        axis.legend()
    axis.set_xlabel("share of photos answered (most confident first)")
    axis.set_ylabel("accuracy of the answers given")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def consignment_png(table: dict, path: Path, *, title: str = "Consignment checks") -> Path:
    """Share of match / mismatch / abstain decisions for consignments whose expected count is right, off by
    one, or off by two or more (ml.operating's table)."""
    groups = list(table["by_offset"])
    labels = {"0": "expected = true count", "1": "off by 1", "2+": "off by 2 or more"}
    figure, axis = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(groups)
    for decision, colour in (("match", "tab:green"), ("mismatch", "tab:red"), ("uncounted-low-confidence", "0.7")):
        shares = [table["by_offset"][g][decision] or 0.0 for g in groups]
        axis.bar([labels.get(g, g) for g in groups], shares, bottom=bottom, color=colour, label=decision)
        bottom = [b + v for b, v in zip(bottom, shares, strict=True)]
    axis.set_ylabel("share of consignments")
    axis.set_ylim(0, 1)
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
