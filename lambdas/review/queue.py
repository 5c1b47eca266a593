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

``reviewMaxPerDay`` bounds the photos queued per UTC day (a counter item per day). A full day does not close
the queue to the photos that matter most: a photo more likely wrong than the least likely one waiting takes its
place (``displacer``), so the queue keeps the day's most likely discrepancies whatever order they arrive in.
Audit items are never displaced (they measure the confident decisions, whatever their priority), nor a photo a
reviewer holds.
"""

from __future__ import annotations

import hashlib
import os
import time
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
# How far a full day's displacement looks from the least likely end of the queue for a photo it may take out
# (past audit items and held photos); each page is one Query.
DISPLACE_PAGES = 4
DISPLACE_PAGE = 25


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


def mark(item: dict[str, Any], policy: QueuePolicy, take_slot: Callable[[str], bool] | None = None,
         displace: Callable[[Mapping[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Add the queue attributes to a record that needs a person (in place; returned for chaining).
    ``take_slot(day)`` reserves one of the day's ``max_per_day`` places and says whether it got one; when it did
    not, ``displace(item)`` may free one by taking a less likely photo out of the queue."""
    why = reason_to_review(item, policy)
    if why is None:
        return item
    day = str(item.get("countedAt", ""))[:10]
    if take_slot is not None and not take_slot(day):
        full = f"reviewMaxPerDay ({policy.max_per_day}) reached on {day}"
        if why == "audit":
            # A sample of confident decisions takes a free place only: displacing for one would trade a likely
            # discrepancy for a measurement.
            item["reviewSkipped"] = f"{full}; audit samples take free places only"
            return item
        if displace is None or not displace(item):
            item["reviewSkipped"] = f"{full}, and no photo waiting was less likely wrong"
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


def displacer(table: Any, policy: QueuePolicy, clock: Callable[[], float] = time.time
              ) -> Callable[[Mapping[str, Any]], bool]:
    """A ``displace`` on the counts table: takes the waiting photo least likely to be wrong out of the queue when
    ``item`` is more likely wrong, and says whether it did. One conditional write; a photo another counter took
    out, or a reviewer claimed, meanwhile fails its condition and the next one is tried."""
    from botocore.exceptions import ClientError

    def displace(item: Mapping[str, Any]) -> bool:
        wanted = priority(item)
        now = int(clock())
        start: dict[str, Any] | None = None
        for _ in range(DISPLACE_PAGES):
            args: dict[str, Any] = {"IndexName": QUEUE_INDEX, "Limit": DISPLACE_PAGE, "ScanIndexForward": False,
                                    "KeyConditionExpression": "reviewQueue = :p",
                                    "ExpressionAttributeValues": {":p": PENDING}}
            if start:
                args["ExclusiveStartKey"] = start
            page = table.query(**args)
            for waiting in page.get("Items", []):
                if priority(waiting) >= wanted:
                    return False  # descending rank: everything further on is at least as likely wrong
                if waiting.get("reviewAudit") or int(waiting.get("leaseUntil", 0)) >= now:
                    continue
                try:
                    table.update_item(
                        Key={"pk": waiting["pk"], "sk": waiting["sk"]},
                        UpdateExpression="REMOVE reviewQueue, reviewRank SET reviewSkipped = :why",
                        ConditionExpression="reviewQueue = :p AND reviewRank = :rank AND "
                                            "(attribute_not_exists(leaseUntil) OR leaseUntil < :now)",
                        ExpressionAttributeValues={
                            ":p": PENDING, ":rank": waiting[RANK_KEY], ":now": now,
                            ":why": f"displaced from the review queue once reviewMaxPerDay ({policy.max_per_day}) "
                                    f"was reached, by a photo more likely wrong ({wanted:.3f} against "
                                    f"{priority(waiting):.3f})"})
                except ClientError as error:
                    if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                        continue
                    raise
                return True
            start = page.get("LastEvaluatedKey")
            if not start:
                return False
        return False

    return displace
