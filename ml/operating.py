"""Operating points: the decision thresholds a model is served with, measured on its validation split.

A fixed confidence threshold means something different for every model: 0.5 left 38 of 40 uploads uncounted
with a model whose confidences rarely reach it. So the trainer measures, at the end of every job, on the
validation photos as served:

- **counting** (no expected count): the lowest confidence at which the answered count is right at least
  ``count_precision`` of the time, with its coverage, and the whole accuracy-coverage curve;
- **consignment checks** (an expected count is known): the decision uses the probability the model gives the
  *expected* count, ``p``. ``match`` when ``p >= match_threshold``, ``mismatch`` when ``p <= mismatch_threshold``,
  otherwise abstain (``uncounted-low-confidence``). The thresholds are the widest at which ``match`` and
  ``mismatch`` are each right at least their stated share of the time on simulated consignments: every
  validation photo paired once with its true count, once with a count off by one and once with a count off by
  two or more (so one pair in three should match).

The counts are count *classes*: with an overflow class, an expected count of 6 or more is checked against the
probability of "6 or more", the same rule the count Lambda applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

MATCH = "match"
MISMATCH = "mismatch"
ABSTAIN = "uncounted-low-confidence"
OFFSETS = ("0", "1", "2+")
THRESHOLD_KEYS = ("count_threshold", "match_threshold", "mismatch_threshold")


@dataclass(frozen=True)
class Targets:
    """The shares of decisions that must be right; the trainer's ``--*-precision`` knobs."""

    count_precision: float = 0.8
    match_precision: float = 0.9
    mismatch_precision: float = 0.9
    # A threshold chosen on fewer decisions than this is noise: it is not taken.
    min_support: int = 20
    seed: int = 0


def _widest_threshold(scores: torch.Tensor, right: torch.Tensor, precision: float, min_support: int,
                      descending: bool) -> dict:
    """The threshold that accepts the most items (score >= t, or <= t when ascending) while the accepted ones
    are right at least ``precision`` of the time; ties are accepted or refused together."""
    n = len(scores)
    order = scores.argsort(descending=descending, stable=True)
    ranked, hits = scores[order].tolist(), right[order].float().cumsum(0).tolist()
    best = None
    for k in range(min_support, n + 1):
        # Only where the next score differs: a threshold cannot split equal scores.
        if k < n and ranked[k] == ranked[k - 1]:
            continue
        if hits[k - 1] / k >= precision:
            best = k
    if best is None:
        # Unreachable at this precision: a threshold nothing passes, said plainly.
        return {"threshold": 1.0 if descending else 0.0, "reached": False, "accepted": 0, "coverage": 0.0,
                "precision": None}
    return {"threshold": ranked[best - 1], "reached": True, "accepted": best, "coverage": best / n,
            "precision": hits[best - 1] / best}


def accuracy_coverage_curve(confidence: torch.Tensor, correct: torch.Tensor, points: int = 20) -> list[dict]:
    """Accuracy of the answers given when only the most confident share is answered, at even coverage steps."""
    order = confidence.argsort(descending=True, stable=True)
    hits = correct[order].float().cumsum(0)
    rows = []
    for step in range(1, points + 1):
        k = max(1, round(len(order) * step / points))
        rows.append({"coverage": round(step / points, 4), "min_confidence": round(float(confidence[order][k - 1]), 6),
                     "accuracy": round(float(hits[k - 1] / k), 6)})
    return rows


def simulate_consignments(truth: torch.Tensor, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(photo index, expected class, offset group) of three consignments per photo: its true count, one off
    by one and one off by two or more, sides and distances drawn with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    photos, expected, groups = [], [], []
    classes = torch.arange(num_classes)
    for index, c in enumerate(truth.tolist()):
        distance = (classes - c).abs()
        for group, pool in ((0, classes[distance == 0]), (1, classes[distance == 1]), (2, classes[distance >= 2])):
            if len(pool):
                pick = int(torch.randint(len(pool), (1,), generator=generator))
                photos.append(index)
                expected.append(int(pool[pick]))
                groups.append(group)
    return torch.tensor(photos, dtype=torch.long), torch.tensor(expected, dtype=torch.long), torch.tensor(groups)


def decide(p_expected: torch.Tensor, match_threshold: float, mismatch_threshold: float) -> list[str]:
    """The consignment rule the count Lambda applies (lambdas/count/records.py)."""
    return [MATCH if p >= match_threshold else MISMATCH if p <= mismatch_threshold else ABSTAIN
            for p in p_expected.tolist()]


def consignment_table(decisions: Sequence[str], groups: torch.Tensor) -> dict:
    """Precision, recall and share of each decision, overall and by how far the expected count is off."""
    groups_list = groups.tolist()
    is_match = [g == 0 for g in groups_list]
    table: dict = {"pairs": len(decisions), "by_offset": {}}
    for g, name in enumerate(OFFSETS):
        chosen = [d for d, gg in zip(decisions, groups_list, strict=True) if gg == g]
        table["by_offset"][name] = {"n": len(chosen)} | {
            d: round(chosen.count(d) / len(chosen), 4) if chosen else None for d in (MATCH, MISMATCH, ABSTAIN)}
    for decision, truth_is in ((MATCH, True), (MISMATCH, False)):
        made = [m for d, m in zip(decisions, is_match, strict=True) if d == decision]
        relevant = sum(1 for m in is_match if m == truth_is)
        right = sum(1 for m in made if m == truth_is)
        table[decision] = {"precision": round(right / len(made), 4) if made else None,
                           "recall": round(right / relevant, 4) if relevant else None,
                           "share": round(len(made) / len(decisions), 4) if decisions else None}
    table[ABSTAIN] = {"share": round(decisions.count(ABSTAIN) / len(decisions), 4) if decisions else None}
    return table


def apply(point: dict, probabilities: torch.Tensor, truth: torch.Tensor,
          answer: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> dict:
    """How a model's own thresholds (``point``, from its config) decide on other photos: the counted share and
    its accuracy, and the consignment table on the same kind of simulated consignments."""
    confidence, answered = answer
    counted = confidence >= point["count_threshold"]
    photos, expected, groups = simulate_consignments(truth, probabilities.shape[1], seed)
    decisions = decide(probabilities[photos, expected], point["match_threshold"], point["mismatch_threshold"])
    return {
        "thresholds": {key: point[key] for key in THRESHOLD_KEYS},
        "count": {"coverage": round(float(counted.float().mean()), 4) if len(truth) else None,
                  "precision": round(float((answered == truth)[counted].float().mean()), 4) if counted.any() else None},
        "consignment": consignment_table(decisions, groups),
        "accuracy_coverage": accuracy_coverage_curve(confidence, answered == truth) if len(truth) else [],
    }


def operating_point(probabilities: torch.Tensor, truth: torch.Tensor, answer: tuple[torch.Tensor, torch.Tensor],
                    targets: Targets = Targets()) -> dict:
    """Everything ``model-config.json`` carries about how to decide with this model.

    ``probabilities`` (N, classes) and ``truth`` (N,) are count classes of the validation photos; ``answer`` is
    (confidence, class) as the model serves (its config's answer rule)."""
    confidence, answered = answer
    count = _widest_threshold(confidence, answered == truth, targets.count_precision, targets.min_support,
                              descending=True)
    photos, expected, groups = simulate_consignments(truth, probabilities.shape[1], targets.seed)
    p_expected = probabilities[photos, expected]
    is_match = groups == 0
    match = _widest_threshold(p_expected, is_match, targets.match_precision, targets.min_support, descending=True)
    mismatch = _widest_threshold(p_expected, ~is_match, targets.mismatch_precision, targets.min_support,
                                 descending=False)
    point = {
        "count_threshold": round(count["threshold"], 6),
        "match_threshold": round(match["threshold"], 6),
        # A pair cannot be both: where the two ranges would meet, match is decided first (as in the Lambda).
        "mismatch_threshold": round(min(mismatch["threshold"], match["threshold"]), 6),
    }
    # What those thresholds then decide on the same photos: the figures the targets were met with.
    applied = apply(point, probabilities, truth, answer, targets.seed)
    return point | {
        "targets": asdict(targets),
        "measured_on": {"photos": len(truth), "consignment_pairs": applied["consignment"]["pairs"]},
        "count": {"reached": count["reached"]} | applied["count"],
        "consignment": {"match_reached": match["reached"], "mismatch_reached": mismatch["reached"]}
        | applied["consignment"],
        "accuracy_coverage": applied["accuracy_coverage"],
    }


def summary_metrics(point: dict) -> dict[str, float]:
    """Flat ``op_*`` figures for the job's metrics and metric-definition lines."""
    table = point["consignment"]
    figures = {f"op_{key}": point[key] for key in THRESHOLD_KEYS}
    figures |= {"op_count_coverage": point["count"]["coverage"],
                "op_match_share": table[MATCH]["share"] or 0.0, "op_mismatch_share": table[MISMATCH]["share"] or 0.0,
                "op_abstain_share": table[ABSTAIN]["share"] or 0.0}
    return {k: float(v) for k, v in figures.items()}
