"""How likely a consignment is wrong, and the checks on the thresholds that decide it. Standard library only:
serving (``ml/inference.py``), the count Lambda (``lambdas/count/records.py``), the deploy gate
(``lambdas/deploy/plan.py``) and the trainer share this one module.

The likelihood model
--------------------
A consignment announces an expected count ``e``; a share ``r`` of consignments is wrong (the stack's
``consignmentErrorRate``), whatever count they announce. The model gives calibrated class probabilities
``p(k|x)`` for the photo ``x`` (temperature-scaled, ``ml/calibration.py``), and ``pi(k)`` is the share of class
``k`` among its training photos (``class_prior`` in the operating point). Then

- the photo's likelihood under true class ``k`` is ``P(x|k) ∝ p(k|x) / pi(k)`` (Bayes, dropping ``P(x)``);
- right consignment: the true class is ``e``, so ``P(x|right) ∝ p(e|x) / pi(e)``;
- wrong consignment: the true class is any other, distributed as bins are: ``P(k|wrong, e) = pi(k) / (1 - pi(e))``
  for ``k != e``, so ``P(x|wrong) ∝ sum_{k != e} p(k|x) / (1 - pi(e)) = (1 - p(e|x)) / (1 - pi(e))``;

and the posterior that the consignment is wrong::

    q = r (1 - p_e) / (1 - pi_e)  /  [ r (1 - p_e) / (1 - pi_e) + (1 - r) p_e / pi_e ]

An expected count above the last exact class is the overflow class ("that many or more"): ``p_e`` and
``pi_e`` are the overflow class's. A model without an overflow class gives such a count probability 0, so
``q = 1`` (it holds that the bin cannot hold that many).

Decisions, on ``q`` (the keys of the operating point)
-----------------------------------------------------
- ``match`` when ``q <= match_max_discrepancy``; ``mismatch`` when ``q >= mismatch_min_discrepancy``;
  otherwise abstain (``uncounted-low-confidence``); a photo with no expected count is ``counted`` when its
  confidence is at least ``count_threshold``.
- A threshold is a finite number in [0, 1], or ``null`` with the reason in ``not_decided[<key>]`` (its
  precision target was not reached on validation): that decision is then never taken.
- ``match_max_discrepancy < mismatch_min_discrepancy``: no posterior can be both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

COUNT_KEY = "count_threshold"
MATCH_KEY = "match_max_discrepancy"
MISMATCH_KEY = "mismatch_min_discrepancy"
THRESHOLD_KEYS = (COUNT_KEY, MATCH_KEY, MISMATCH_KEY)
# The knob's default and its accepted range: below 0.1 % a review queue never sees a wrong consignment in a
# sample worth measuring, above 50 % "wrong" is the usual case and the announced count means little.
DEFAULT_ERROR_RATE = 0.05
ERROR_RATE_RANGE = (0.001, 0.5)
# A class never seen in training would divide by zero: its prior is floored (one photo in a million).
MIN_PRIOR = 1e-6


class OperatingPointError(ValueError):
    """A model's operating point that cannot be served; the message names the key."""


def expected_class(expected: int, classes: Sequence[int], overflow_class: int | None) -> int | None:
    """The index of the class an expected count is checked against, None when the model has none for it."""
    if overflow_class is not None and expected >= overflow_class:
        return list(classes).index(overflow_class)
    return list(classes).index(expected) if expected in classes else None


def discrepancy_probability(p_expected: float, prior_expected: float, rate: float) -> float:
    """``q``, the posterior probability that the consignment is wrong (the module's likelihood model)."""
    pi = min(max(prior_expected, MIN_PRIOR), 1.0 - MIN_PRIOR)
    p = min(max(p_expected, 0.0), 1.0)
    wrong = rate * (1.0 - p) / (1.0 - pi)
    right = (1.0 - rate) * p / pi
    return 1.0 if wrong + right == 0 else wrong / (wrong + right)


def for_answer(classes: Sequence[int], probabilities: Sequence[float], overflow_class: int | None, expected: int,
               prior: Sequence[float] | None, rate: float) -> float:
    """``q`` for one answer of the serving contract; a uniform prior where the answer carries none (a model
    measured before priors were recorded)."""
    index = expected_class(expected, classes, overflow_class)
    if index is None:
        return 1.0
    pi = prior[index] if prior else 1.0 / len(classes)
    return discrepancy_probability(probabilities[index], pi, rate)


def check_rate(rate: Any, name: str = "consignmentErrorRate") -> float:
    low, high = ERROR_RATE_RANGE
    if not _is_number(rate) or not low <= rate <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {rate!r}")
    return float(rate)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_operating_point(point: Mapping[str, Any], num_classes: int | None = None,
                          where: str = "operating_point") -> dict[str, Any]:
    """The operating point as served, or :class:`OperatingPointError` naming the first key that is wrong:
    thresholds not finite numbers in [0, 1] (NaN, infinity, strings, lists, out of range), a ``null`` threshold
    without its reason, inverted thresholds, a prior that is not a distribution over the classes, a rate out
    of range."""
    if not isinstance(point, Mapping):
        raise OperatingPointError(f"{where} must be an object, got {type(point).__name__}")
    not_decided = point.get("not_decided") or {}
    if not isinstance(not_decided, Mapping):
        raise OperatingPointError(f"{where}.not_decided must be an object of reasons")
    for key in THRESHOLD_KEYS:
        if key not in point:
            raise OperatingPointError(f"{where}.{key} is missing")
        value = point[key]
        if value is None:
            reason = not_decided.get(key)
            if not isinstance(reason, str) or not reason.strip():
                raise OperatingPointError(f"{where}.{key} is null without a reason in {where}.not_decided.{key}")
            continue
        if not _is_number(value):
            raise OperatingPointError(f"{where}.{key} must be a finite number in [0, 1], got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise OperatingPointError(f"{where}.{key} must be in [0, 1], got {value!r}")
    low, high = point[MATCH_KEY], point[MISMATCH_KEY]
    if low is not None and high is not None and not low < high:
        raise OperatingPointError(f"{where}.{MATCH_KEY} ({low}) must be below {where}.{MISMATCH_KEY} ({high}): "
                                  "inverted thresholds would call one consignment both match and mismatch")
    prior = point.get("class_prior")
    if prior is not None and (not isinstance(prior, list) or not all(_is_number(v) and v >= 0 for v in prior)
            or abs(sum(prior) - 1.0) > 1e-3 or (num_classes is not None and len(prior) != num_classes)):
        raise OperatingPointError(f"{where}.class_prior must be {num_classes or 'one per class'} non-negative "
                                  f"numbers summing to 1, got {prior!r}")
    if "consignment_error_rate" in point:
        try:
            check_rate(point["consignment_error_rate"], f"{where}.consignment_error_rate")
        except ValueError as error:
            raise OperatingPointError(str(error)) from None
    return dict(point)


def decided(point: Mapping[str, Any]) -> list[str]:
    """The decisions an operating point can take (``counted``, ``match``, ``mismatch``)."""
    names = {COUNT_KEY: "counted", MATCH_KEY: "match", MISMATCH_KEY: "mismatch"}
    return [names[key] for key in THRESHOLD_KEYS if point.get(key) is not None]


def decide(q: float, point: Mapping[str, Any]) -> str | None:
    """``match``, ``mismatch`` or None (abstain) for a posterior under a checked operating point."""
    if point.get(MATCH_KEY) is not None and q <= point[MATCH_KEY]:
        return "match"
    if point.get(MISMATCH_KEY) is not None and q >= point[MISMATCH_KEY]:
        return "mismatch"
    return None
