"""Operating points: thresholds measured on validation photos, and the rule the count Lambda applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml import decisions, operating


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
    # No placeholder threshold (the old 1.0 / 1.0 / 0.0): none at all.
    assert point == {"threshold": None, "reached": False, "accepted": 0, "coverage": 0.0, "precision": None}


def test_unreachable_targets_leave_the_decision_out_with_a_reason() -> None:
    generator = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 7, (300,), generator=generator)
    # A model that knows nothing: every photo gets the same probabilities.
    probabilities = torch.full((300, 7), 1 / 7)
    point = operating.operating_point(probabilities, truth, probabilities.max(1))
    for key in operating.THRESHOLD_KEYS:
        assert point[key] is None
        assert "never decided" in point["not_decided"][key]
    assert operating.summary_metrics(point)["op_decisions_taken"] == 0.0
    assert not any(f"op_{key}" in operating.summary_metrics(point) for key in operating.THRESHOLD_KEYS)


def test_a_threshold_never_splits_equal_scores() -> None:
    confidence = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.2])
    correct = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    # Precision 0.75 is reached by the top 4 together (3/4), never by the top 3 alone (one of four equals).
    point = operating._widest_threshold(confidence, correct, 0.75, min_support=1, descending=True)
    assert point["accepted"] in (4, 5)
    assert point["threshold"] in (pytest.approx(0.9), pytest.approx(0.2))


def test_consignments_at_a_rate_weigh_right_and_wrong_pairs_as_the_rate_says() -> None:
    truth = torch.tensor([0, 3, 6, 2])
    probabilities = torch.full((4, 7), 1 / 7)
    prior = [1 / 7] * 7
    for mix in operating.WRONG_MIXES:
        c = operating.consignments(probabilities, truth, prior, 0.05, mix)
        assert len(c.photo) == 4 * 7
        share_wrong = float(c.weight[c.wrong].sum() / c.weight.sum())
        assert share_wrong == pytest.approx(0.05, abs=1e-5)
    near = operating.consignments(probabilities, truth, prior, 0.05, "near")
    distance = (near.expected - near.truth).abs()
    # Half the wrong weight is off by one, half off by two or more, for every photo.
    assert float(near.weight[distance == 1].sum()) == pytest.approx(float(near.weight[distance >= 2].sum()))


def test_operating_point_meets_its_targets_on_the_photos_it_was_measured_on() -> None:
    generator = torch.Generator().manual_seed(3)
    truth = torch.randint(0, 7, (2000,), generator=generator)
    # A model that is right about half the time, and more confident when right.
    logits = torch.randn(2000, 7, generator=generator)
    right = torch.rand(2000, generator=generator) < 0.5
    logits[right, truth[right]] += 4.0
    probabilities = logits.softmax(1)
    point = operating.operating_point(probabilities, truth, probabilities.max(1))
    targets = operating.Targets()
    assert point["count"]["reached"]
    assert point["count"]["precision"] >= targets.count_precision
    table = point["consignment"]
    assert table["match"]["precision"] >= targets.match_precision
    assert table["mismatch"]["precision"] >= targets.mismatch_precision
    assert point["match_max_discrepancy"] < point["mismatch_min_discrepancy"]
    assert point["consignment_error_rate"] == targets.error_rate
    for group in operating.OFFSETS:
        row = table["by_offset"][group]
        assert row["match"] + row["mismatch"] + row[operating.ABSTAIN] == pytest.approx(1.0, abs=1e-3)
    # Right consignments are taken for a match far more often than wrong ones.
    by_offset = table["by_offset"]
    assert by_offset["0"]["match"] > 3 * max(by_offset["1"]["match"], by_offset["2+"]["match"])
    # Reviewing more photos by discrepancy probability catches more of the wrong consignments, and the top
    # 10 % catch more than 10 % of them.
    caught = [row["wrong_caught"] for row in table["review_top"]]
    assert caught == sorted(caught) and caught[1] > 0.1
    curve = point["accuracy_coverage"]
    assert [row["coverage"] for row in curve][-1] == 1.0
    assert curve[0]["accuracy"] >= curve[-1]["accuracy"]


def test_the_consignment_rule_decides_match_below_mismatch_above_else_abstains() -> None:
    q = torch.tensor([0.01, 0.1, 0.2, 0.6])
    point = {"match_max_discrepancy": 0.02, "mismatch_min_discrepancy": 0.5}
    assert operating.decide(q, point).tolist() == [1, 0, 0, 2]
    assert operating.decide(q, point | {"mismatch_min_discrepancy": None}).tolist() == [1, 0, 0, 0]


def test_training_writes_the_operating_point_into_the_model_config_and_metrics(tiny_run: dict) -> None:
    config = json.loads((Path(tiny_run["model_dir"]) / "model-config.json").read_text())
    point = config["operating_point"]
    # Every threshold is a number in [0, 1] or null with its reason: what model_fn accepts.
    decisions.check_operating_point(point, config["num_classes"])
    assert point["measured_on"]["photos"] > 0
    assert point["targets"]["count_precision"] == operating.Targets.count_precision
    assert config["temperature"] > 0
    metrics = json.loads((Path(tiny_run["output_dir"]) / "metrics.json").read_text())
    assert metrics["operating_point"]["op_decisions_taken"] == len(decisions.decided(point))
    assert {"temperature", "ece_before", "ece_after"} <= set(metrics)
    # Printed in the name=value; form that SageMaker metric definitions capture.
    assert "op_decisions_taken=" in tiny_run["log"]


def test_the_trainers_precision_knobs_default_to_the_operating_point_targets() -> None:
    from ml.train import parse_args

    args = parse_args(["--train", "x"])
    targets = operating.Targets()
    assert (args.count_precision, args.match_precision, args.mismatch_precision, args.consignment_error_rate) == (
        targets.count_precision, targets.match_precision, targets.mismatch_precision, targets.error_rate)
