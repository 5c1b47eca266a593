"""Operating points: thresholds measured on validation photos, and the rule the count Lambda applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml import operating


def test_the_count_threshold_is_the_widest_that_keeps_the_stated_precision() -> None:
    # Ten answers by falling confidence; the first six are right, then right/wrong alternate.
    confidence = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3])
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    point = operating._widest_threshold(confidence, correct, 0.85, min_support=3, descending=True)
    # Top 8 are 7/8 = 0.875 right: the widest set at >= 0.85; top 9 would be 7/9.
    assert point["threshold"] == pytest.approx(0.5)
    assert point["accepted"] == 8
    assert point["coverage"] == pytest.approx(0.8)


def test_an_unreachable_precision_counts_nothing_and_says_so() -> None:
    confidence = torch.linspace(0.9, 0.1, 30)
    correct = torch.zeros(30, dtype=torch.bool)
    point = operating._widest_threshold(confidence, correct, 0.8, min_support=5, descending=True)
    assert point == {"threshold": 1.0, "reached": False, "accepted": 0, "coverage": 0.0, "precision": None}


def test_a_threshold_never_splits_equal_scores() -> None:
    confidence = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.2])
    correct = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    # Precision 0.75 is reached by the top 4 together (3/4), never by the top 3 alone (one of four equals).
    point = operating._widest_threshold(confidence, correct, 0.75, min_support=1, descending=True)
    assert point["accepted"] in (4, 5)
    assert point["threshold"] in (pytest.approx(0.9), pytest.approx(0.2))


def test_each_photo_becomes_one_true_one_off_by_one_and_one_far_off_consignment() -> None:
    truth = torch.tensor([0, 3, 6])
    photos, expected, groups = operating.simulate_consignments(truth, num_classes=7, seed=0)
    assert photos.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert groups.tolist() == [0, 1, 2] * 3
    distance = (expected - truth[photos]).abs()
    assert distance[groups == 0].tolist() == [0, 0, 0]
    assert distance[groups == 1].tolist() == [1, 1, 1]
    assert (distance[groups == 2] >= 2).all()
    assert ((expected >= 0) & (expected <= 6)).all()
    # Seeded: the same validation photos give the same consignments, so a threshold can be reproduced.
    assert torch.equal(expected, operating.simulate_consignments(truth, 7, seed=0)[1])


def test_operating_point_meets_its_targets_on_the_photos_it_was_measured_on() -> None:
    generator = torch.Generator().manual_seed(3)
    truth = torch.randint(0, 7, (600,), generator=generator)
    # A model that is right about half the time, and more confident when right.
    logits = torch.randn(600, 7, generator=generator)
    right = torch.rand(600, generator=generator) < 0.5
    logits[right, truth[right]] += 3.0
    probabilities = logits.softmax(1)
    point = operating.operating_point(probabilities, truth, probabilities.max(1))
    targets = operating.Targets()
    assert point["count"]["reached"]
    assert point["count"]["precision"] >= targets.count_precision
    table = point["consignment"]
    assert table["match"]["precision"] >= targets.match_precision
    assert table["mismatch"]["precision"] >= targets.mismatch_precision
    assert point["mismatch_threshold"] <= point["match_threshold"]
    shares = [table["by_offset"][g][d] for g in operating.OFFSETS for d in ("match", "mismatch", operating.ABSTAIN)]
    assert all(0.0 <= s <= 1.0 for s in shares)
    for group in operating.OFFSETS:
        row = table["by_offset"][group]
        assert row["match"] + row["mismatch"] + row[operating.ABSTAIN] == pytest.approx(1.0, abs=1e-3)
    # True consignments are taken for a match far more often than wrong ones.
    by_offset = table["by_offset"]
    assert by_offset["0"]["match"] > 5 * max(by_offset["1"]["match"], by_offset["2+"]["match"])
    curve = point["accuracy_coverage"]
    assert [row["coverage"] for row in curve][-1] == 1.0
    assert curve[0]["accuracy"] >= curve[-1]["accuracy"]


def test_the_consignment_rule_decides_match_first_then_mismatch_else_abstains() -> None:
    p = torch.tensor([0.7, 0.5, 0.3, 0.05])
    assert operating.decide(p, match_threshold=0.6, mismatch_threshold=0.1) == [
        operating.MATCH, operating.ABSTAIN, operating.ABSTAIN, operating.MISMATCH]


def test_training_writes_the_operating_point_into_the_model_config_and_metrics(tiny_run: dict) -> None:
    config = json.loads((Path(tiny_run["model_dir"]) / "model-config.json").read_text())
    point = config["operating_point"]
    for key in operating.THRESHOLD_KEYS:
        assert 0.0 <= point[key] <= 1.0
    assert point["measured_on"]["photos"] > 0
    assert point["targets"]["count_precision"] == operating.Targets.count_precision
    metrics = json.loads((Path(tiny_run["output_dir"]) / "metrics.json").read_text())
    assert metrics["operating_point"]["op_count_threshold"] == pytest.approx(point["count_threshold"])
    # Printed in the name=value; form that SageMaker metric definitions capture.
    assert "op_match_threshold=" in tiny_run["log"]


def test_the_trainers_precision_knobs_default_to_the_operating_point_targets() -> None:
    from ml.train import parse_args

    args = parse_args(["--train", "x"])
    targets = operating.Targets()
    assert (args.count_precision, args.match_precision, args.mismatch_precision) == (
        targets.count_precision, targets.match_precision, targets.mismatch_precision)
