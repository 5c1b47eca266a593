"""Score a trained model on an ABID folder: ``python -m ml.evaluate --model-dir DIR --data DIR``.

Prints a JSON report: the headline figures on the count range the product cares about (default 1-5:
accuracy, RMSE, MAE, within-one accuracy, with the argmax over every class and restricted to the range),
the same over every photo the model's classes cover, per-class precision/recall, the confusion matrix,
accuracy when answering only the most confident photos (coverage levels), and the decisions the model's own
operating point takes: the counted share, and at 1, 5 and 20 % wrong consignments (two wrong-count mixes,
``ml/operating.py``) the alert precision and recall with 95 % intervals over photos, match precision, the share
abstained, the share of wrong consignments caught by reviewing the top 5/10/20/30 % by discrepancy probability,
and the decisions by announced count and by how far it is off; ECE before and after the model's temperature.
Writes the report and PNG plots (confusion matrix, accuracy-coverage curve, consignment decisions at 5 %, alerts
and review by rate; training curves where the model dir holds a history) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ml import calibration, operating, plots
from ml import channel as mlchannel
from ml import data as mldata
from ml.model import load_model
from ml.train import class_truth, count_metrics, predict_logits

COVERAGE_LEVELS = (1.0, 0.9, 0.8, 0.7, 0.5, 0.3)


def per_class(pred: torch.Tensor, truth: torch.Tensor, classes: list[int]) -> dict[str, dict]:
    result = {}
    for c in classes:
        tp = int(((pred == c) & (truth == c)).sum())
        predicted = int((pred == c).sum())
        actual = int((truth == c).sum())
        result[str(c)] = {
            "precision": tp / predicted if predicted else None,
            "recall": tp / actual if actual else None,
            "support": actual,
        }
    return result


def confusion(pred: torch.Tensor, truth: torch.Tensor, classes: list[int]) -> list[list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for p, t in zip(pred.tolist(), truth.tolist(), strict=True):
        matrix[index[t]][index[p]] += 1
    return matrix


def coverage(confidence: torch.Tensor, correct: torch.Tensor, levels=COVERAGE_LEVELS) -> list[dict]:
    """Accuracy on the ``level`` most confident fraction: what a confidence threshold buys."""
    order = confidence.argsort(descending=True)
    rows = []
    for level in levels:
        n = max(1, round(len(order) * level)) if len(order) else 0
        chosen = order[:n]
        rows.append({
            "coverage": level,
            "n": n,
            "accuracy": float(correct[chosen].float().mean()) if n else None,
            "min_confidence": float(confidence[chosen].min()) if n else None,
        })
    return rows


def evaluate(model_dir: Path, data_dir: Path, *, eval_range: tuple[int, int] = (1, 5), tta: int | None = None,
             out: Path | None = None, batch_size: int = 64, save_logits: Path | None = None,
             logits_file: Path | None = None) -> dict:
    """Scores a model on a channel (an ABID folder or a folder of shards); ``tta`` None means what the model
    serves with (its config). ``save_logits`` keeps the photos' logits and counts (``torch.save``) in the form
    ``ml.recalibrate --logits`` reads; ``logits_file`` scores such a file instead of the photos (a recalibrated
    model has the same logits, so its figures need no second pass over the photos)."""
    model, config = load_model(model_dir)
    tta = max(1, min(8, config.tta if tta is None else tta))
    started = time.time()
    if logits_file is not None:
        saved = torch.load(logits_file)
        if saved.get("tta", 1) != tta:
            raise ValueError(f"{logits_file} holds logits averaged over {saved.get('tta', 1)} symmetries; this "
                             f"evaluation is at tta {tta}")
        logits, quantities, image_ids = saved["logits"], saved["quantities"], saved["image_ids"]
        rejected = saved.get("rejected", [])
    else:
        cached = mlchannel.load_channel(data_dir, config.image_size)
        logits = predict_logits(model, cached.images, config, torch.device("cpu"), batch_size=batch_size, tta=tta)
        quantities, image_ids = cached.quantities, [r.image_id for r in cached.records]
        rejected = [{"image_id": r.image_id, "reason": r.reason} for r in cached.rejected]
    if save_logits is not None:
        save_logits.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": logits, "quantities": quantities, "tta": tta, "image_ids": image_ids,
                    "rejected": rejected}, save_logits)
    report = score(config, logits, quantities, eval_range=eval_range)
    report = {"model_dir": str(model_dir), "data": str(data_dir), "model": config.model_id or config.model_name,
              "tta": tta, "images": len(image_ids), "rejected": rejected} | report
    report["seconds"] = round(time.time() - started, 1)
    if out is not None:
        write(report, out, config, name=Path(data_dir).name, history_file=Path(model_dir) / "history.json")
    return report


def score(config, logits: torch.Tensor, quantities: torch.Tensor, *, eval_range: tuple[int, int] = (1, 5),
          rates=operating.REPORT_RATES, bootstrap: int = 200) -> dict:
    """The report's figures from a model's logits (or log-probabilities) and the photos' true counts: served
    probabilities are the calibrated ones (the model's temperature)."""
    probabilities = calibration.calibrated(logits, config.temperature)
    classes = config.classes
    overflow_class = classes[-1] if config.overflow else None

    covered, truth_full = class_truth(quantities, config)
    # Scored as served: the answer rule of the model's config (which classes may be the count).
    confidence_full, pred_full = config.answer(probabilities[covered])

    lo, hi = eval_range
    inside = (quantities >= lo) & (quantities <= hi)
    truth_in = quantities[inside]
    confidence_in, pred_in = config.answer(probabilities[inside])
    restricted = probabilities[inside][:, lo : hi + 1]
    restricted_pred = restricted.argmax(1) + lo

    report = {
        "headline_range": [lo, hi],
        "headline": count_metrics(pred_in, truth_in),
        "headline_restricted": count_metrics(restricted_pred, truth_in),
        "full_range": count_metrics(pred_full, truth_full),
        "classes": classes,
        "overflow_class": overflow_class,
        "per_class": per_class(pred_full, truth_full, classes),
        "confusion_matrix": confusion(pred_full, truth_full, classes),
        "coverage": coverage(confidence_in, pred_in == truth_in),
        "coverage_full_range": coverage(confidence_full, pred_full == truth_full),
        "calibration": {"temperature": config.temperature,
                        "ece_uncalibrated": round(calibration.ece(logits[covered].softmax(-1), truth_full), 6),
                        "ece_served": round(calibration.ece(probabilities[covered], truth_full), 6)},
    }
    # The decisions the count Lambda would take with this model's own operating point (measured on its
    # validation split when it was trained); a model without one is measured here, and the report says so.
    point = config.operating_point or operating.operating_point(probabilities[covered], truth_full,
                                                                (confidence_full, pred_full))
    report["operating_point"] = operating.apply(point, probabilities[covered], truth_full,
                                                (confidence_full, pred_full), rates=rates, bootstrap=bootstrap)
    report["operating_point"]["source"] = "model config" if config.operating_point else "measured on these photos"
    return report


def write(report: dict, out: Path, config, *, name: str, history_file: Path | None = None) -> None:
    """evaluation.json and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    n = sum(map(sum, report["confusion_matrix"]))
    plots.confusion_png(report["confusion_matrix"], report["classes"], out / "confusion.png",
                        overflow_class=report["overflow_class"], title=f"{name}: confusion matrix ({n} photos)")
    applied = report["operating_point"]
    plots.coverage_png(applied["accuracy_coverage"], out / "coverage.png",
                       threshold_coverage=applied["count"]["coverage"],
                       title=f"{name}: accuracy by share answered ({n} photos)")
    by_rate = applied["consignment"]["prior"]
    five = by_rate.get("0.05") or next(iter(by_rate.values()))
    plots.consignment_png(five, out / "consignment.png",
                          title=f"{name}: consignment decisions at a 5 % error rate ({n} photos, every count)")
    plots.rates_png(applied["consignment"], out / "decisions.png",
                    title=f"{name}: alerts and review at the model's thresholds ({n} photos)")
    if history_file is not None and history_file.exists():
        plots.curves_png(json.loads(history_file.read_text()), out / "curves.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", required=True, help="ABID folder or s3:// prefix")
    parser.add_argument("--out", type=Path, default=None, help="folder for evaluation.json and PNG plots")
    parser.add_argument("--min-count", type=int, default=1, help="headline range")
    parser.add_argument("--max-count", type=int, default=5)
    parser.add_argument("--tta", type=int, default=None,
                        help="symmetries averaged per photo (1-8); default: what the model serves with")
    parser.add_argument("--save-logits", type=Path, default=None,
                        help="also write the photos' logits and counts here (torch.save), for ml.recalibrate --logits")
    parser.add_argument("--logits", type=Path, default=None,
                        help="score these saved logits (--save-logits of the same photos) instead of the photos")
    args = parser.parse_args(argv)
    report = evaluate(args.model_dir, mldata.resolve_data(args.data), eval_range=(args.min_count, args.max_count),
                      tta=args.tta, out=args.out, save_logits=args.save_logits, logits_file=args.logits)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
