"""invmon review stats: the audit's precision with a Wilson interval, and wrong consignments caught."""

from __future__ import annotations

from decimal import Decimal

import pytest

from invmon import review


def _reviewed(model_status: str, *, count: int, person: int, expected: int | None = None, audit: bool = False,
              unusable: bool = False) -> dict:
    item = {"status": "reviewed", "modelStatus": model_status, "count": Decimal(count), "reviewAudit": audit,
            "reviewedCount": Decimal(person)}
    if expected is not None:
        item["expectedCount"] = Decimal(expected)
    if unusable:
        item["reviewUnusable"] = True
    return item


def test_audit_precision_comes_with_a_wilson_interval_and_caught_consignments_per_100_reviews():
    reviewed = (
        [_reviewed("counted", count=3, person=3, audit=True)] * 8
        + [_reviewed("counted", count=3, person=4, audit=True)] * 2
        + [_reviewed("match", count=2, person=2, expected=2, audit=True)] * 4
        + [_reviewed("mismatch", count=1, person=1, expected=3)] * 5  # a wrong consignment caught, each
        + [_reviewed("uncounted-low-confidence", count=1, person=2, expected=2)] * 1
    )
    figures = review.review_figures(reviewed)
    counted = figures["audit"]["counted"]
    assert (counted["audited"], counted["right"]) == (10, 8)
    assert counted["ci95"] == pytest.approx([0.4902, 0.9433], abs=1e-3)
    assert figures["audit"]["match"]["precision"] == 1.0
    assert figures["wrongConsignmentsCaught"] == 5
    assert figures["caughtPer100Reviews"] == pytest.approx(100 * 5 / 20)
    text = review.format_figures(figures)
    assert "0.800" in text and "0.490-0.943" in text and "25.0 per 100 reviews" in text
