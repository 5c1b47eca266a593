"""Before/after tables of the recalibration, from saved logits (``torch.save`` of ``ml.train.predict_logits``'s
output with the photos' quantities): ``python models/abid-effnet-lite0/evaluation/compare.py LOGITS.pt``.

Before: the previous operating point (match when p(expected) >= 0.667, mismatch when <= 0.116, uncalibrated).
After: the posterior rule at the model's recalibrated thresholds (``ml.decisions``). Both on the same weighted
consignments (``ml.operating.consignments``) at 1, 5, 20 and 67 % wrong, for both wrong-count mixes; review
order: before by p(expected) ascending (the old rule's score), after by discrepancyProbability.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ml import calibration, operating
from ml.model import ModelConfig
from ml.train import class_truth

MODEL = Path(__file__).resolve().parents[1]
OLD = {"match": 0.667153, "mismatch": 0.116466}


def table(made: torch.Tensor, score: torch.Tensor, c: operating.Consignments) -> dict:
    w, wrong = c.weight, c.wrong
    alerts, matches = made == 2, made == 1
    order = score.argsort(descending=True, stable=True)
    taken = w[order].cumsum(0) / w.sum()
    caught = (w * wrong.double())[order].cumsum(0) / (w * wrong.double()).sum()
    top10 = float(caught[int(torch.searchsorted(taken, torch.tensor([0.1], dtype=torch.float64)))])
    return {"alerts_per_100": round(100 * float(w[alerts].sum() / w.sum()), 1),
            "alert_precision": round(float(w[alerts & wrong].sum() / w[alerts].sum()), 3) if alerts.any() else None,
            "alert_recall": round(float(w[alerts & wrong].sum() / w[wrong].sum()), 3),
            "match_precision": round(float(w[matches & ~wrong].sum() / w[matches].sum()), 3) if matches.any() else None,
            "right_flagged": round(float(w[alerts & ~wrong].sum() / w[~wrong].sum()), 3),
            "review_top10_caught": round(top10, 3)}


def main(path: str) -> None:
    saved = torch.load(path)
    config = ModelConfig.from_json((MODEL / "model-config.json").read_text())
    covered, truth = class_truth(saved["quantities"], config)
    logits = saved["logits"][covered]
    raw, served = logits.softmax(1), calibration.calibrated(logits, config.temperature)
    prior = config.operating_point["class_prior"]
    rows = []
    for mix in operating.WRONG_MIXES:
        for rate in (0.01, 0.05, 0.20, 0.67):
            before = operating.consignments(raw, truth, prior, rate, mix)
            p = raw[before.photo, before.expected]
            made = torch.where(p >= OLD["match"], 1, torch.where(p <= OLD["mismatch"], 2, 0))
            after = operating.consignments(served, truth, prior, rate, mix)
            rows.append({"mix": mix, "rate": rate, "before": table(made, -p, before),
                         "after": table(operating.decide(after.q, config.operating_point), after.q, after)})
    json.dump(rows, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
