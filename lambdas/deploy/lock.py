"""Deploy lock Lambda: one deploy of an endpoint at a time.

The lock is one item per endpoint in the deploy-lock table (infra/deploy.py), written with a conditional
PutItem: it is taken when no item exists, when the holder's lease has run out, or when the same execution asks
again (a retried invocation). Another holder's live lease raises ``DeployLockHeld``, which the state machine
retries for a bounded time and then fails with "another deploy is in progress". Release is a DeleteItem
conditional on the owner, so an execution never frees a lock that a later one took after its lease ran out.

The lease (``expiresAt``, epoch seconds) is the deploy stage's whole budget: if an execution dies without
releasing (its timeout, a StopExecution), the next deploy takes the lock once the lease has run out. The same
attribute is the table's TTL attribute, so DynamoDB deletes stale items (within days, which is why the condition
compares the lease itself rather than relying on the deletion: DynamoDB developer guide, "Time to Live").

Input: ``{"action": "acquire" | "release", "owner": execution ARN, "execution": name}``.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict

logger = Logger()

KEY = "lock"  # the table's partition key: the endpoint's name


class DeployLockHeld(Exception):
    """Another execution holds the endpoint's deploy lock (the state machine retries this error by name)."""


class LockEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["acquire", "release"]
    owner: str
    execution: str = ""


@cache
def table() -> Any:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.resource("dynamodb", region_name=region).Table(os.environ["LOCK_TABLE"])


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def acquire(lock_table: Any, endpoint: str, owner: str, execution: str, *, lease_seconds: int,
            now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    item = {KEY: endpoint, "owner": owner, "execution": execution, "acquiredAt": _iso(now),
            "expiresAt": int(now) + lease_seconds}
    try:
        lock_table.put_item(
            Item=item,
            ConditionExpression="attribute_not_exists(#key) OR expiresAt < :now OR #owner = :owner",
            ExpressionAttributeNames={"#key": KEY, "#owner": "owner"},
            ExpressionAttributeValues={":now": int(now), ":owner": owner},
        )
    except ClientError as error:
        if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise
        held = lock_table.get_item(Key={KEY: endpoint}, ConsistentRead=True).get("Item") or {}
        holder = held.get("execution") or held.get("owner") or "another execution"
        until = held.get("expiresAt")
        raise DeployLockHeld(
            f"another deploy is in progress: {holder} holds the deploy lock of {endpoint}"
            + (f" until {_iso(float(until))} at the latest" if until else "")) from None
    return {"endpoint": endpoint, "owner": owner, "expiresAt": item["expiresAt"]}


def release(lock_table: Any, endpoint: str, owner: str) -> dict[str, Any]:
    try:
        lock_table.delete_item(Key={KEY: endpoint}, ConditionExpression="#owner = :owner",
                               ExpressionAttributeNames={"#owner": "owner"},
                               ExpressionAttributeValues={":owner": owner})
    except ClientError as error:
        if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise
        # The lease ran out and another execution holds the lock now, or the item is gone: nothing of ours.
        return {"endpoint": endpoint, "released": False}
    return {"endpoint": endpoint, "released": True}


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = LockEvent.model_validate(event)
    endpoint = os.environ["ENDPOINT_NAME"]
    if request.action == "acquire":
        result = acquire(table(), endpoint, request.owner, request.execution,
                         lease_seconds=int(os.environ["LEASE_SECONDS"]))
    else:
        result = release(table(), endpoint, request.owner)
    logger.info(f"deploy lock {request.action}", extra=result)
    return result
