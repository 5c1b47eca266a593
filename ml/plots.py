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
    """Train loss, validation accuracy and validation RMSE per epoch, each on its own axes (one is a share, one
    a count error), from the training job's history.json."""
    epochs = [h["epoch"] for h in history]
    n = next((int(h["valid_n"]) for h in history if "valid_n" in h), None)
    photos = f" ({n} photos)" if n else ""
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = ((("train_loss", "train loss"), ("valid_loss", "validation loss")),
              (("valid_accuracy", "accuracy"), ("valid_within1", "within one")),
              (("valid_rmse", "RMSE"), ("valid_mae", "MAE")))
    titles = ("loss", f"validation accuracy, headline range{photos}", f"validation count error{photos}")
    for axis, panel, title in zip(axes, panels, titles, strict=True):
        for key, label in panel:
            if history and all(key in h for h in history):
                axis.plot(epochs, [h[key] for h in history], marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_title(title, fontsize=10)
        if axis.get_lines():  # a legend only for the lines drawn
            axis.legend()
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


def rates_png(by_mix: dict, path: Path, *, title: str = "Decisions at real discrepancy rates") -> Path:
    """Left: alert (mismatch) precision and recall at each error rate, at the model's thresholds. Right: share
    of the wrong consignments caught when reviewing the top share of photos by discrepancy probability. Solid
    lines: wrong counts distributed as bins are (the posterior's model); dashed: half off by one."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"prior": "-", "near": "--"}
    for mix, by_rate in by_mix.items():
        rates = [float(r) for r in by_rate]
        for key, colour in (("precision", "tab:red"), ("recall", "tab:blue")):
            values = [row["mismatch"][key] for row in by_rate.values()]
            if any(v is not None for v in values):
                left.plot([100 * r for r in rates], [v if v is not None else float("nan") for v in values],
                          styles.get(mix, "-"), marker="o", color=colour, label=f"alert {key} ({mix})")
        for (rate, row), colour in zip(by_rate.items(), ("tab:green", "tab:orange", "tab:purple", "tab:grey"),
                                       strict=False):
            curve = row["review_top"]
            right.plot([100 * c["reviewed"] for c in curve], [c["wrong_caught"] for c in curve], styles.get(mix, "-"),
                       marker="o", color=colour, label=f"{100 * float(rate):g} % wrong ({mix})")
    left.set_xscale("log")
    left.set_xlabel("share of wrong consignments (%)")
    left.set_ylabel("share")
    left.set_ylim(0, 1)
    left.set_title("alerts at the model's thresholds", fontsize=10)
    right.set_xlabel("photos reviewed, most likely wrong first (%)")
    right.set_ylabel("share of wrong consignments caught")
    right.set_ylim(0, 1)
    right.set_title("review by discrepancyProbability", fontsize=10)
    for axis in (left, right):
        if axis.get_lines():
            axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
