"""Which count records go to a person, and in what order: the review queue as a sparse index on the counts table.

A record joins the queue when its status is one of ``REVIEW_STATUSES`` (default mismatch and
uncounted-low-confidence), or, for a confident decision (counted, match), when it falls in the audit sample
(``REVIEW_AUDIT_RATE``, default 2 %). Queued records carry two extra attributes, and only queued records carry
them, so the ``reviewQueue`` global secondary index holds the queue and nothing else (a sparse index: "DynamoDB
writes a corresponding index entry only if the index sort key value is present in the item", DynamoDB developer
guide, "Take advantage of sparse indexes"):

    reviewQueue   "pending"                       the index's partition key
    reviewRank    "<1 - priority, 6 places>#<countedAt>"  its sort key: a Query in ascending order gives the
                                                  most likely discrepancy first, then the oldest

The priority is the probability that the consignment is wrong (``discrepancyProbability``, written by the
decision rule on every record with an expected count); where a record has none, 1 - the model's confidence.
An answer removes both attributes (the record leaves the index) and records the review on the item.

The audit draw is a hash of the photo's identity (key and version), not a random number: a redelivered upload
gets the same decision, and the rate is still the configured one over many photos (tests/lambdas/test_review.py
checks it within binomial tolerance).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from lambdas.count.records import COUNTED, LOW_CONFIDENCE, MATCH, MISMATCH

QUEUE_INDEX = "reviewQueue"
QUEUE_KEY = "reviewQueue"
RANK_KEY = "reviewRank"
PENDING = "pending"
AUDIT_STATUSES = (COUNTED, MATCH)
DEFAULT_STATUSES = (MISMATCH, LOW_CONFIDENCE)
DEFAULT_AUDIT_RATE = 0.02
DEFAULT_MAX_PER_DAY = 500
# One item per UTC day counts the photos queued that day, so reviewMaxPerDay holds across concurrent counters.
DAY_COUNTER_SK = "review-day"


@dataclass(frozen=True)
class QueuePolicy:
    statuses: tuple[str, ...] = DEFAULT_STATUSES
    audit_rate: float = DEFAULT_AUDIT_RATE
    max_per_day: int = DEFAULT_MAX_PER_DAY

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> QueuePolicy:
        env = os.environ if environ is None else environ
        statuses = tuple(s for s in env.get("REVIEW_STATUSES", ",".join(DEFAULT_STATUSES)).split(",") if s)
        return cls(statuses=statuses, audit_rate=float(env.get("REVIEW_AUDIT_RATE", DEFAULT_AUDIT_RATE)),
                   max_per_day=int(env.get("REVIEW_MAX_PER_DAY", DEFAULT_MAX_PER_DAY)))


def audit_draw(key: str, version_id: str | None) -> float:
    """A number in [0, 1) fixed by the photo's identity, uniform over photos."""
    digest = hashlib.sha256(f"{key}\x00{version_id or 'null'}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def priority(item: Mapping[str, Any]) -> float:
    """The probability that the consignment is wrong; 1 - confidence where the record has none."""
    value = item.get("discrepancyProbability")
    if value is None:
        confidence = item.get("confidence")
        value = 1.0 - float(confidence) if confidence is not None else 1.0
    return min(1.0, max(0.0, float(value)))


def rank(item: Mapping[str, Any]) -> str:
    return f"{1.0 - priority(item):.6f}#{item.get('countedAt', '')}"


def reason_to_review(item: Mapping[str, Any], policy: QueuePolicy) -> str | None:
    """"status" (the status needs a person), "audit" (sampled confident decision), or None."""
    status = item.get("status")
    if status in policy.statuses:
        return "status"
    if status in AUDIT_STATUSES and audit_draw(str(item.get("key", "")), item.get("versionId")) < policy.audit_rate:
        return "audit"
    return None


def mark(item: dict[str, Any], policy: QueuePolicy,
         take_slot: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Add the queue attributes to a record that needs a person (in place; returned for chaining).
    ``take_slot(day)`` reserves one of the day's ``max_per_day`` places and says whether it got one."""
    why = reason_to_review(item, policy)
    if why is None:
        return item
    day = str(item.get("countedAt", ""))[:10]
    if take_slot is not None and not take_slot(day):
        item["reviewSkipped"] = f"reviewMaxPerDay ({policy.max_per_day}) reached on {day}"
        return item
    item[QUEUE_KEY] = PENDING
    item[RANK_KEY] = rank(item)
    item["reviewReason"] = why
    item["reviewAudit"] = why == "audit"
    item["reviewPriority"] = Decimal(f"{priority(item):.6f}")
    return item


def day_slot_taker(table: Any, policy: QueuePolicy) -> Callable[[str], bool]:
    """A ``take_slot`` on the counts table: one conditional counter increment per queued photo."""
    from botocore.exceptions import ClientError

    def take(day: str) -> bool:
        try:
            table.update_item(
                Key={"pk": f"review#day#{day}", "sk": DAY_COUNTER_SK},
                UpdateExpression="ADD queued :one",
                ConditionExpression="attribute_not_exists(queued) OR queued < :max",
                ExpressionAttributeValues={":one": 1, ":max": policy.max_per_day},
            )
            return True
        except ClientError as error:
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise

    return take
