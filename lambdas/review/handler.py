"""Review API Lambda: Powertools' HTTP API resolver over lambdas/review/store.py.

Behind API Gateway's JWT authorizer (infra/review.py), which has checked the token's signature, issuer, expiry
and audience before the event arrives; the handler reads the caller from the verified claims (``sub``) and
requires membership of the ``reviewers`` group. HTTP API hands claims to the integration as strings, arrays
as ``[a b]`` ("Working with JWT authorizers", API Gateway developer guide), so both forms are read.

Routes (every bad request a 4xx with ``{"message": reason}``):

    POST /claim                    lease the next photo            200 {"item": {...}} or {"item": null}
    GET  /items/{id}/photo         presigned GET, holder only      200 {"url", "expiresIn"} | 409
    POST /items/{id}/answer        {"leaseId", "count"} or {"leaseId", "unusable": true, "reason"}
    POST /items/{id}/skip          {"leaseId"}
    GET  /stats                    pending, answered today, agreement
"""

from __future__ import annotations

import json
import math
import os
from functools import cache
from typing import Annotated, Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from lambdas.review import store

logger = Logger()
tracer = Tracer()
metrics = Metrics()
app = APIGatewayHttpResolver()

REVIEWERS_GROUP = "reviewers"
DEFAULT_LEASE_SECONDS = 300


class AnswerBody(BaseModel):
    """A count 0..1000 (a JSON integer: not "3", not 3.0, not true), or unusable with a reason."""

    model_config = ConfigDict(extra="forbid")

    lease_id: StrictStr = Field(alias="leaseId", min_length=1, max_length=64)
    count: Annotated[StrictInt, Field(ge=0, le=store.MAX_COUNT)] | None = None
    unusable: StrictBool = False
    reason: Annotated[StrictStr, Field(min_length=1, max_length=300)] | None = None

    @model_validator(mode="after")
    def _one_answer(self) -> AnswerBody:
        if self.unusable == (self.count is not None):
            raise ValueError("give either a count (0 to 1000) or unusable: true with a reason")
        if self.unusable and not (self.reason or "").strip():
            raise ValueError("unusable needs a reason")
        return self


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_id: StrictStr = Field(alias="leaseId", min_length=1, max_length=64)


class Services:
    def __init__(self) -> None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.table = boto3.resource("dynamodb", region_name=region).Table(os.environ["COUNTS_TABLE"])
        self.s3 = boto3.client("s3", region_name=region)
        self.data_bucket = os.environ["DATA_BUCKET"]
        self.lease_seconds = int(os.environ.get("REVIEW_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


@cache
def services() -> Services:
    return Services()


def reset() -> None:
    services.cache_clear()


def _error(status: int, message: str) -> Response:
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON,
                    body=json.dumps({"message": message}))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _body(model: type[BaseModel]) -> Any:
    raw = app.current_event.decoded_body or ""
    try:
        # NaN and Infinity are not JSON (RFC 8259), though Python's parser takes them by default.
        data = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as error:
        raise store.ReviewError(f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise store.ReviewError("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in error.errors())
        raise store.ReviewError(problems) from None


def _caller() -> str:
    claims = app.current_event.request_context.authorizer.jwt_claim or {}
    sub = claims.get("sub")
    groups = claims.get("cognito:groups", [])
    if isinstance(groups, str):
        groups = groups.strip("[]").replace(",", " ").split()
    if not sub:
        raise store.ReviewError("the token has no sub claim")
    if REVIEWERS_GROUP not in groups:
        raise PermissionError(f"only members of the {REVIEWERS_GROUP} group may review")
    return str(sub)


@app.exception_handler(store.ReviewError)
def _review_error(error: store.ReviewError) -> Response:
    return _error(error.status, error.message)


@app.exception_handler(PermissionError)
def _forbidden(error: PermissionError) -> Response:
    return _error(403, str(error))


@app.not_found
def _not_found(_: Exception) -> Response:
    return _error(404, f"no such route: {app.current_event.http_method} {app.current_event.path}")


@app.post("/claim")
def claim() -> dict[str, Any]:
    svc = services()
    item = store.claim(svc.table, _caller(), lease_seconds=svc.lease_seconds)
    if item is not None:
        metrics.add_metric(name="ReviewsClaimed", unit=MetricUnit.Count, value=1)
    return {"item": item}


@app.get("/items/<item>/photo")
def photo(item: str) -> dict[str, Any]:
    svc = services()
    return store.photo_url(svc.table, svc.s3, item, _caller())


@app.post("/items/<item>/answer")
def answer(item: str) -> dict[str, Any]:
    sub = _caller()
    body = _body(AnswerBody)
    given = store.Answer(count=body.count, unusable_reason=body.reason.strip() if body.unusable else None)
    svc = services()
    result = store.answer(svc.table, svc.s3, item, sub, body.lease_id, given, data_bucket=svc.data_bucket)
    metrics.add_metric(name="ReviewsAnswered", unit=MetricUnit.Count, value=1)
    if result["agrees"] is not None:
        metrics.add_metric(name="ReviewAgreement", unit=MetricUnit.Percent, value=100 if result["agrees"] else 0)
    return result


@app.post("/items/<item>/skip")
def skip(item: str) -> dict[str, Any]:
    sub = _caller()
    body = _body(LeaseBody)
    return store.skip(services().table, item, sub, body.lease_id)


@app.get("/stats")
def stats() -> dict[str, Any]:
    _caller()
    return store.stats(services().table)


def gauge(table: Any) -> dict[str, Any]:
    """The queue's size and the age of its oldest photo as metrics (the dashboard and its alarm)."""
    figures = store.stats(table)
    metrics.add_metric(name="ReviewsPending", unit=MetricUnit.Count, value=figures["pending"])
    age = figures["oldestPendingSeconds"]
    metrics.add_metric(name="OldestPendingReviewSeconds", unit=MetricUnit.Seconds,
                       value=0 if age is None or math.isnan(age) else age)
    return figures


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if event.get("source") == "aws.events":  # the schedule that keeps the queue's gauges fresh
        return gauge(services().table)
    return app.resolve(event, context)
