"""The review queue's operations on the counts table and the data bucket: claim, photo, answer, skip, stats.

Pure functions of a boto3 Table resource and an S3 client, so the Lambda (lambdas/review/handler.py) and the
tests run the same code. Every state change is one conditional write on the photo's count record:

- claim: ``reviewQueue = pending AND (no lease OR lease expired OR held by the caller)``; two reviewers racing
  for one photo both send that write and DynamoDB applies exactly one ("condition expressions", DynamoDB
  developer guide: a conditional write succeeds only if the condition holds at the time of the write); the
  loser moves on to the next candidate. An expired lease needs no sweeper: the next claim's condition takes it.
- answer: ``leaseHolder = caller AND leaseId = the claim's AND leaseUntil >= now``; it removes the queue keys,
  so the record leaves the sparse index. Repeating the same answer with the same lease returns the stored
  result and writes nothing more.

Labels: an answered count becomes ``raw/reviewed/bin-images/<id>.jpg`` (a server-side copy of the upload)
and ``raw/reviewed/metadata/<id>.json`` (``EXPECTED_QUANTITY`` plus provenance), ABID's own layout under a
prefix ABID's copies never use; ``<id>`` is ``reviewed-`` and a hash of the photo's key and version, never a
bare ABID number. A later answer replaces the label; ``unusable`` removes it. Every answer is also kept as a
history item (``pk = review#<key>``, ``sk = <time>#<reviewer>``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from lambdas.pack.layout import REVIEWED_ID_PREFIX, REVIEWED_PREFIX
from lambdas.review import queue as q

REVIEWED = "reviewed"
MAX_COUNT = 1000
# Short-lived photo links: the page loads the photo at once. A URL signed with a Lambda role's temporary
# credentials stops working when those credentials expire, even before its own expiry ("Sharing objects with
# presigned URLs", S3 user guide), which only ever shortens this.
PHOTO_URL_SECONDS = 120
_CLAIM_PAGE = 25


class ReviewError(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ReviewError):
    status = 404


class Conflict(ReviewError):
    status = 409


@dataclass(frozen=True)
class Answer:
    """A count 0..1000, or unusable with a reason (exactly one of the two)."""

    count: int | None = None
    unusable_reason: str | None = None


def now_epoch() -> int:
    return int(datetime.now(UTC).timestamp())


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def item_id(key: str, version_id: str | None) -> str:
    raw = json.dumps([key, version_id or "null"]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_item_id(value: str) -> tuple[str, str]:
    try:
        key, version = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, TypeError):
        raise ReviewError(f"not an item id: {value[:80]!r}") from None
    if not isinstance(key, str) or not isinstance(version, str):
        raise ReviewError(f"not an item id: {value[:80]!r}")
    return key, version


def _keys(key: str, version: str) -> dict[str, str]:
    return {"pk": f"photo#{key}", "sk": f"version#{version}"}


def label_id(key: str, version_id: str | None) -> str:
    return REVIEWED_ID_PREFIX + hashlib.sha256(f"{key}\x00{version_id or 'null'}".encode()).hexdigest()[:20]


def label_keys(image_id: str) -> tuple[str, str]:
    return f"{REVIEWED_PREFIX}bin-images/{image_id}.jpg", f"{REVIEWED_PREFIX}metadata/{image_id}.json"


def _number(value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def view(item: dict[str, Any]) -> dict[str, Any]:
    """What a reviewer sees of a claimed record: the consignment's count and the model's, except on audit
    items, which are reviewed blind."""
    audit = bool(item.get("reviewAudit"))
    out = {
        "id": item_id(item["key"], item.get("versionId")),
        "photo": item["key"],
        "leaseId": item["leaseId"],
        "leaseUntil": iso(float(item["leaseUntil"])),
        "audit": audit,
        "priority": _number(item.get("reviewPriority")),
    }
    if not audit:
        out["expectedCount"] = _number(item.get("expectedCount"))
        out["modelCount"] = _number(item.get("count"))
        out["status"] = item.get("status")
    return out


def _conditional_failed(error: ClientError) -> bool:
    return error.response["Error"]["Code"] == "ConditionalCheckFailedException"


def claim(table: Any, sub: str, *, lease_seconds: int, now: int | None = None) -> dict[str, Any] | None:
    """Lease the most urgent photo nobody else holds; None when the queue has nothing for this reviewer."""
    now = now_epoch() if now is None else now
    start: dict[str, Any] | None = None
    while True:
        args: dict[str, Any] = {"IndexName": q.QUEUE_INDEX, "Limit": _CLAIM_PAGE,
                                "KeyConditionExpression": "reviewQueue = :p",
                                "ExpressionAttributeValues": {":p": q.PENDING}}
        if start:
            args["ExclusiveStartKey"] = start
        page = table.query(**args)
        for candidate in page.get("Items", []):
            held_by_other = (candidate.get("leaseHolder") not in (None, sub)
                             and int(candidate.get("leaseUntil", 0)) >= now)
            if held_by_other or sub in candidate.get("skippedBy", set()):
                continue
            try:
                new = table.update_item(
                    Key={"pk": candidate["pk"], "sk": candidate["sk"]},
                    UpdateExpression="SET leaseHolder = :sub, leaseUntil = :until, leaseId = :lease, "
                                     "claimedAt = :at",
                    ConditionExpression="reviewQueue = :p AND (attribute_not_exists(leaseUntil) OR "
                                        "leaseUntil < :now OR leaseHolder = :sub)",
                    ExpressionAttributeValues={":sub": sub, ":until": now + lease_seconds, ":now": now,
                                               ":lease": uuid.uuid4().hex, ":at": iso(now), ":p": q.PENDING},
                    ReturnValues="ALL_NEW",
                )["Attributes"]
            except ClientError as error:
                if _conditional_failed(error):
                    continue  # another reviewer won this one, or it was answered meanwhile
                raise
            return view(new)
        start = page.get("LastEvaluatedKey")
        if not start:
            return None


def _held(table: Any, key: str, version: str, sub: str, now: int) -> dict[str, Any]:
    item = table.get_item(Key=_keys(key, version), ConsistentRead=True).get("Item")
    if item is None:
        raise NotFound(f"no count record for {key} (version {version})")
    if item.get("leaseHolder") != sub or int(item.get("leaseUntil", 0)) < now or q.QUEUE_KEY not in item:
        raise Conflict("you do not hold this photo: claim it first (its lease may have expired)")
    return item


def photo_url(table: Any, s3: Any, value: str, sub: str, *, now: int | None = None) -> dict[str, Any]:
    """A short-lived GET URL for the photo, only for the reviewer holding it."""
    now = now_epoch() if now is None else now
    key, version = parse_item_id(value)
    item = _held(table, key, version, sub, now)
    params = {"Bucket": item["bucket"], "Key": key}
    if version != "null":
        params["VersionId"] = version
    url = s3.generate_presigned_url("get_object", Params=params, ExpiresIn=PHOTO_URL_SECONDS)
    return {"url": url, "expiresIn": PHOTO_URL_SECONDS}


def _same_answer(item: dict[str, Any], answer: Answer) -> bool:
    if answer.count is not None:
        return _number(item.get("reviewedCount")) == answer.count and not item.get("reviewUnusable")
    return bool(item.get("reviewUnusable")) and item.get("reviewUnusableReason") == answer.unusable_reason


def _result(item: dict[str, Any]) -> dict[str, Any]:
    return {"id": item_id(item["key"], item.get("versionId")), "photo": item["key"], "status": item["status"],
            "reviewedCount": _number(item.get("reviewedCount")), "unusable": bool(item.get("reviewUnusable")),
            "modelCount": _number(item.get("count")), "modelStatus": item.get("modelStatus"),
            "agrees": item.get("reviewAgrees"), "label": item.get("labelKey"), "reviewedBy": item.get("reviewedBy"),
            "reviewedAt": item.get("reviewedAt")}


def answer(table: Any, s3: Any, value: str, sub: str, lease_id: str, given: Answer, *, data_bucket: str,
           now: int | None = None) -> dict[str, Any]:
    now = now_epoch() if now is None else now
    key, version = parse_item_id(value)
    item = table.get_item(Key=_keys(key, version), ConsistentRead=True).get("Item")
    if item is None:
        raise NotFound(f"no count record for {key} (version {version})")
    if item.get("reviewLeaseId") == lease_id and item.get("reviewedBy") == sub and q.QUEUE_KEY not in item:
        if not _same_answer(item, given):
            raise Conflict("this lease was already answered differently; claim the photo again to change it")
        write_label(s3, data_bucket, item)  # heals a label write that failed after the answer was stored
        return _result(item)
    model_count = _number(item.get("count"))
    agrees = None if given.count is None or model_count is None else given.count == model_count
    image_id = label_id(key, version)
    names = {"#status": "status"}
    values: dict[str, Any] = {":sub": sub, ":lease": lease_id, ":now": now, ":p": q.PENDING, ":reviewed": REVIEWED,
                              ":at": iso(now)}
    sets = ["#status = :reviewed", "modelStatus = if_not_exists(modelStatus, #status)", "reviewedBy = :sub",
            "reviewedAt = :at", "reviewLeaseId = :lease"]
    removes = [q.QUEUE_KEY, q.RANK_KEY, "leaseHolder", "leaseUntil", "leaseId"]
    if given.count is not None:
        sets += ["reviewedCount = :count", "labelKey = :label", "reviewUnusable = :false"]
        values |= {":count": given.count, ":label": label_keys(image_id)[1], ":false": False}
        removes.append("reviewUnusableReason")
    else:
        sets += ["reviewUnusable = :true", "reviewUnusableReason = :why"]
        values |= {":true": True, ":why": given.unusable_reason}
        removes += ["reviewedCount", "labelKey"]
    if agrees is None:
        removes.append("reviewAgrees")
    else:
        sets.append("reviewAgrees = :agrees")
        values[":agrees"] = agrees
    try:
        new = table.update_item(
            Key=_keys(key, version),
            UpdateExpression=f"SET {', '.join(sets)} REMOVE {', '.join(removes)}",
            ConditionExpression="reviewQueue = :p AND leaseHolder = :sub AND leaseId = :lease AND leaseUntil >= :now",
            ExpressionAttributeNames=names, ExpressionAttributeValues=values, ReturnValues="ALL_NEW",
        )["Attributes"]
    except ClientError as error:
        if _conditional_failed(error):
            raise Conflict("you do not hold this photo: claim it first (its lease may have expired)") from None
        raise
    history = {"pk": f"review#{key}", "sk": f"{iso(now)}#{sub}", "versionId": version, "reviewer": sub,
               "modelCount": item.get("count"), "modelStatus": item.get("status"),
               "audit": bool(item.get("reviewAudit")),
               "expectedCount": item.get("expectedCount"), "reviewedCount": given.count,
               "unusableReason": given.unusable_reason, "agrees": agrees}
    table.put_item(Item={k: v for k, v in history.items() if v is not None})
    day = iso(now)[:10]
    table.update_item(Key={"pk": f"review#day#{day}", "sk": q.DAY_COUNTER_SK},
                      UpdateExpression="ADD answered :one" + (", agreed :one" if agrees else ""),
                      ExpressionAttributeValues={":one": 1})
    write_label(s3, data_bucket, new)
    return _result(new)


def write_label(s3: Any, data_bucket: str, item: dict[str, Any]) -> None:
    """The record's answer as an ABID-layout label under raw/reviewed/ (removed for an unusable photo)."""
    image_id = label_id(item["key"], item.get("versionId"))
    image_key, metadata_key = label_keys(image_id)
    assert image_key.startswith(REVIEWED_PREFIX) and metadata_key.startswith(REVIEWED_PREFIX)
    if item.get("reviewUnusable"):
        s3.delete_objects(Bucket=data_bucket, Delete={"Objects": [{"Key": image_key}, {"Key": metadata_key}]})
        return
    source = {"Bucket": item["bucket"], "Key": item["key"]}
    if item.get("versionId") not in (None, "null"):
        source["VersionId"] = item["versionId"]
    s3.copy_object(Bucket=data_bucket, Key=image_key, CopySource=source)
    metadata = {
        "EXPECTED_QUANTITY": int(item["reviewedCount"]),
        "image_fname": f"{image_id}.jpg",
        "provenance": {
            "source": "review", "photo": f"s3://{item['bucket']}/{item['key']}", "versionId": item.get("versionId"),
            "reviewer": item["reviewedBy"], "reviewedAt": item["reviewedAt"], "modelCount": _number(item.get("count")),
            "modelStatus": item.get("modelStatus"), "model": item.get("model"),
            "expectedCount": _number(item.get("expectedCount")), "audit": bool(item.get("reviewAudit")),
        },
    }
    s3.put_object(Bucket=data_bucket, Key=metadata_key, Body=json.dumps(metadata, indent=1).encode(),
                  ContentType="application/json")


def skip(table: Any, value: str, sub: str, lease_id: str) -> dict[str, Any]:
    """Give the photo back to the queue; this reviewer is not offered it again."""
    key, version = parse_item_id(value)
    try:
        table.update_item(
            Key=_keys(key, version),
            UpdateExpression="SET leaseUntil = :zero ADD skippedBy :me REMOVE leaseHolder, leaseId",
            ConditionExpression="reviewQueue = :p AND leaseHolder = :sub AND leaseId = :lease",
            ExpressionAttributeValues={":zero": 0, ":me": {sub}, ":p": q.PENDING, ":sub": sub, ":lease": lease_id},
        )
    except ClientError as error:
        if _conditional_failed(error):
            raise Conflict("you do not hold this photo, so you cannot skip it") from None
        raise
    return {"id": value, "skipped": True}


def query_all(table: Any, **args: Any) -> list[dict[str, Any]]:
    """Every item of a Query, page by page."""
    items: list[dict[str, Any]] = []
    while True:
        page = table.query(**args)
        items += page.get("Items", [])
        if not page.get("LastEvaluatedKey"):
            return items
        args["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def pending(table: Any) -> list[dict[str, Any]]:
    return query_all(table, IndexName=q.QUEUE_INDEX, KeyConditionExpression="reviewQueue = :p",
                     ExpressionAttributeValues={":p": q.PENDING})


def reviewed(table: Any) -> list[dict[str, Any]]:
    """Every reviewed record, through the byStatus index."""
    return query_all(table, IndexName="byStatus", KeyConditionExpression="#s = :r",
                     ExpressionAttributeNames={"#s": "status"}, ExpressionAttributeValues={":r": REVIEWED})


def stats(table: Any, *, now: int | None = None) -> dict[str, Any]:
    """Progress for the page and the dashboard: pending, oldest pending age, answered and agreed today."""
    now = now_epoch() if now is None else now
    waiting = pending(table)
    oldest = min((str(i.get("countedAt", "")) for i in waiting), default=None)
    age = None
    if oldest:
        age = max(0, now - int(datetime.fromisoformat(oldest).timestamp()))
    day = table.get_item(Key={"pk": f"review#day#{iso(now)[:10]}", "sk": q.DAY_COUNTER_SK}).get("Item") or {}
    answered, agreed = int(day.get("answered", 0)), int(day.get("agreed", 0))
    return {"pending": len(waiting), "oldestPendingSeconds": age, "answeredToday": answered,
            "agreedToday": agreed, "queuedToday": int(day.get("queued", 0)),
            "agreementToday": round(agreed / answered, 4) if answered else None}
