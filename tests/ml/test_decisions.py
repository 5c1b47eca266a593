"""The consignment posterior, the operating-point checks and temperature scaling (ml.decisions, ml.calibration).

Torch only for calibration; the decisions module is the standard library the Lambdas import. Cost: < 1 s."""

from __future__ import annotations

import math

import pytest
import torch

from ml import calibration, decisions

POINT = {"count_threshold": 0.7, "match_max_discrepancy": 0.02, "mismatch_min_discrepancy": 0.3,
         "class_prior": [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2], "consignment_error_rate": 0.05}


def test_the_posterior_matches_a_hand_computation() -> None:
    # p(e|x) = 0.3, pi(e) = 0.2, r = 0.05:
    #   wrong = r (1 - p) / (1 - pi) = 0.05 * 0.7 / 0.8 = 0.04375
    #   right = (1 - r) p / pi       = 0.95 * 0.3 / 0.2 = 1.425
    #   q = 0.04375 / (0.04375 + 1.425) = 0.0297872...
    assert decisions.discrepancy_probability(0.3, 0.2, 0.05) == pytest.approx(0.04375 / 1.46875, rel=1e-12)
    # The same photo is more likely wrong where more consignments are.
    assert decisions.discrepancy_probability(0.3, 0.2, 0.20) > decisions.discrepancy_probability(0.3, 0.2, 0.05)
    # A model sure of the expected count clears it, a model sure it is not convicts it.
    assert decisions.discrepancy_probability(1.0, 0.2, 0.05) == 0.0
    assert decisions.discrepancy_probability(0.0, 0.2, 0.05) == 1.0


def test_a_consignment_above_the_exact_classes_is_decided_with_the_overflow_class() -> None:
    classes = list(range(7))
    probabilities = [0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.5]
    # Expected 9 items, overflow class "6 or more": p = 0.5, pi = 0.2; by hand
    # wrong = 0.05 * 0.5 / 0.8 = 0.03125, right = 0.95 * 0.5 / 0.2 = 2.375.
    q = decisions.for_answer(classes, probabilities, 6, 9, POINT["class_prior"], 0.05)
    assert q == pytest.approx(0.03125 / 2.40625, rel=1e-12)
    assert q == decisions.for_answer(classes, probabilities, 6, 6, POINT["class_prior"], 0.05)
    # Without an overflow class the model holds that the bin cannot hold 9.
    assert decisions.for_answer(classes, probabilities, None, 9, POINT["class_prior"], 0.05) == 1.0
    # An answer without a prior is read with a uniform one.
    assert decisions.for_answer(classes, probabilities, 6, 2, None, 0.05) == pytest.approx(
        decisions.discrepancy_probability(0.1, 1 / 7, 0.05))


def test_the_posterior_rule_matches_below_mismatches_above_and_abstains_between() -> None:
    assert decisions.decide(0.01, POINT) == "match"
    assert decisions.decide(0.1, POINT) is None
    assert decisions.decide(0.3, POINT) == "mismatch"
    never_mismatch = POINT | {"mismatch_min_discrepancy": None}
    assert decisions.decide(0.99, never_mismatch) is None


@pytest.mark.parametrize(("key", "value", "says"), [
    ("match_max_discrepancy", float("nan"), "finite number"),
    ("mismatch_min_discrepancy", float("inf"), "finite number"),
    ("count_threshold", "0.7", "finite number"),
    ("count_threshold", [0.7], "finite number"),
    ("match_max_discrepancy", True, "finite number"),
    ("mismatch_min_discrepancy", 1.5, "in [0, 1]"),
    ("count_threshold", -0.1, "in [0, 1]"),
    ("match_max_discrepancy", 0.5, "must be below"),  # inverted: above the mismatch threshold
    ("count_threshold", None, "without a reason"),
])
def test_thresholds_that_cannot_be_served_are_refused_naming_the_key(key: str, value: object, says: str) -> None:
    with pytest.raises(decisions.OperatingPointError, match=key) as caught:
        decisions.check_operating_point(POINT | {key: value}, num_classes=7)
    assert says in str(caught.value)


def test_a_decision_never_taken_is_null_with_its_reason() -> None:
    point = POINT | {"match_max_discrepancy": None, "not_decided": {"match_max_discrepancy": "unreachable"}}
    assert decisions.check_operating_point(point, 7) == point
    assert decisions.decided(point) == ["counted", "mismatch"]


def test_a_prior_that_is_not_a_distribution_over_the_classes_is_refused() -> None:
    with pytest.raises(decisions.OperatingPointError, match="class_prior"):
        decisions.check_operating_point(POINT | {"class_prior": [0.5, 0.5]}, num_classes=7)
    with pytest.raises(decisions.OperatingPointError, match="consignment_error_rate"):
        decisions.check_operating_point(POINT | {"consignment_error_rate": 0.9}, num_classes=7)


def test_temperature_scaling_lowers_ece_on_an_overconfident_model() -> None:
    generator = torch.Generator().manual_seed(0)
    n, k = 4000, 7
    labels = torch.randint(0, k, (n,), generator=generator)
    # Calibrated logits: drawn so that the label follows their softmax; then made overconfident (x3).
    true_logits = torch.randn(n, k, generator=generator) * 1.5
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)
    overconfident = true_logits * 3.0
    before = calibration.ece(calibration.calibrated(overconfident, 1.0), labels)
    temperature = calibration.fit_temperature(overconfident, labels)
    after = calibration.ece(calibration.calibrated(overconfident, temperature), labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert after < before / 3
    # Scaling never changes the answer.
    assert torch.equal(calibration.calibrated(overconfident, temperature).argmax(1), overconfident.argmax(1))
    report = calibration.report(overconfident, labels)
    assert report["ece_after"] < report["ece_before"] and report["nll_after"] < report["nll_before"]


def test_ece_is_zero_for_answers_whose_confidence_is_their_accuracy() -> None:
    # Four answers at confidence 0.75, three of them right.
    probabilities = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert calibration.ece(probabilities, labels) == pytest.approx(0.0, abs=1e-6)
    assert math.isclose(calibration.ece(probabilities, torch.tensor([1, 1, 1, 1])), 0.75, rel_tol=1e-6)
