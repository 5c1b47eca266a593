"""Count Lambda: S3 uploads under the incoming prefix arrive through SQS; each photo is counted once.

SQS batch with partial failures: a record fails (and comes back, then goes to the DLQ) only for faults that
a retry can cure or an operator must see (throttling, endpoint 5xx, a broken response contract, AWS errors).
A bad photo is never such a fault: it becomes a ``rejected`` record with its reason. Idempotency on
bucket + key + version (sequencer when the bucket is unversioned) makes a duplicate delivery a no-op.

Time: the endpoint client has explicit timeouts and retries (``ENDPOINT_*`` below, sized in infra/count.py),
and a record is only started while the remaining time covers one more worst-case endpoint call; the records
left are reported as batch item failures, untried, so one stalled request never times out the invocation
and sends every photo of the batch back to the queue. Every failed record is logged at WARNING with its
bucket, key and cause, and counted in the ``CountFailures`` metric by ``cause``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer, single_metric
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectTimeoutError, ReadTimeoutError
from botocore.exceptions import ConnectionError as EndpointUnreachable  # not the builtin: botocore's base

from lambdas.count import records as rec
from lambdas.review import queue as review_queue

logger = Logger()
tracer = Tracer()
metrics = Metrics()
# A batch where every record failed is answered like any other (every message listed as a failure, which SQS
# treats as the whole batch failing) rather than raised: the invocation then returns within its budget and
# each failure has been logged with its cause. See "Handling errors for an SQS event source in Lambda"
# (docs.aws.amazon.com/lambda/latest/dg/services-sqs-errorhandling.html): reported failures become visible
# again after the visibility timeout.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str
    version_id: str | None
    sequencer: str | None
    size: int | None

    @property
    def identity(self) -> str:
        # What makes two deliveries the same upload: an overwrite of an unversioned key has a new sequencer.
        return self.version_id or self.sequencer or "null"


# Defaults of the endpoint client's limits; infra/count.py sets them (and sizes the Lambda timeout around them).
CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 20.0
MAX_ATTEMPTS = 2
# Time one record needs besides the endpoint call: the S3 read, the consignment lookups, the table writes
# and the event.
RECORD_OVERHEAD_SECONDS = 5.0


class OutOfTime(RuntimeError):
    """Not started: the invocation's remaining time could not cover one more endpoint call."""


class Services:
    """Clients and settings from the environment, made once per container (and again per test)."""

    def __init__(self) -> None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.s3 = boto3.client("s3", region_name=region)
        self.connect_timeout = float(os.environ.get("ENDPOINT_CONNECT_TIMEOUT", CONNECT_TIMEOUT_SECONDS))
        self.read_timeout = float(os.environ.get("ENDPOINT_READ_TIMEOUT", READ_TIMEOUT_SECONDS))
        self.max_attempts = int(os.environ.get("ENDPOINT_MAX_ATTEMPTS", MAX_ATTEMPTS))
        self.record_overhead = float(os.environ.get("RECORD_OVERHEAD_SECONDS", RECORD_OVERHEAD_SECONDS))
        # boto3's defaults (60 s read and connect timeouts, legacy retries) let one stalled request outlast
        # the function. "standard" retries back off at most a second or so between the attempts here.
        self.runtime = boto3.client("sagemaker-runtime", region_name=region, config=Config(
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            retries={"mode": "standard", "total_max_attempts": self.max_attempts}))
        self.events = boto3.client("events", region_name=region)
        self.table = boto3.resource("dynamodb", region_name=region).Table(os.environ["COUNTS_TABLE"])
        self.endpoint_name = os.environ["ENDPOINT_NAME"]
        self.threshold = rec.parse_threshold(os.environ.get("CONFIDENCE_THRESHOLD", "model"))
        self.error_rate = rec.parse_error_rate(os.environ.get("CONSIGNMENT_ERROR_RATE"))
        # A serverless endpoint takes at most 4 MB per request (the default mode; infra checks the setting).
        self.max_bytes = int(os.environ.get("MAX_IMAGE_BYTES", str(4_000_000)))
        self.incoming_prefix = os.environ.get("INCOMING_PREFIX", "incoming/")
        self.event_bus = os.environ.get("EVENT_BUS_NAME", "default")
        self.event_source = os.environ.get("EVENT_SOURCE", "invmon.count")
        self.review_policy = review_queue.QueuePolicy.from_environ()
        self.persistence = DynamoDBPersistenceLayer(
            table_name=os.environ["IDEMPOTENCY_TABLE"],
            boto3_client=boto3.client("dynamodb", region_name=region),
        )

    @property
    def call_budget_seconds(self) -> float:
        """The longest one record can take: every attempt timing out, the backoff between them, the rest."""
        backoff = float(self.max_attempts - 1)  # standard mode: under a second of jittered backoff per retry
        return self.max_attempts * (self.connect_timeout + self.read_timeout) + backoff + self.record_overhead


@cache
def services() -> Services:
    return Services()


# --- events -------------------------------------------------------------------------------------------


def object_refs(body: str) -> list[ObjectRef]:
    """The uploads named by one SQS message: an S3 notification (keys URL-encoded), or [] for S3's test
    event and for event types that are not uploads."""
    try:
        message = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"SQS message is not JSON, so not an S3 notification: {error}") from None
    if message.get("Event") == "s3:TestEvent":
        return []
    refs = []
    for record in message.get("Records", []):
        if not str(record.get("eventName", "")).startswith("ObjectCreated"):
            continue
        s3 = record["s3"]
        refs.append(
            ObjectRef(
                bucket=s3["bucket"]["name"],
                key=unquote_plus(s3["object"]["key"]),
                version_id=s3["object"].get("versionId") or None,
                sequencer=s3["object"].get("sequencer"),
                size=s3["object"].get("size"),
            )
        )
    if not refs and "Records" not in message:
        raise ValueError("SQS message is neither an S3 notification nor an S3 test event")
    return refs


# --- one photo ----------------------------------------------------------------------------------------


def _read_object(svc: Services, ref: ObjectRef) -> tuple[int, bytes, dict[str, str], rec.Rejection | None]:
    args = {"Bucket": ref.bucket, "Key": ref.key}
    if ref.version_id:
        args["VersionId"] = ref.version_id
    try:
        response = svc.s3.get_object(**args)
    except ClientError as error:
        if error.response["Error"]["Code"] in {"NoSuchKey", "NoSuchVersion", "404"}:
            return 0, b"", {}, rec.Rejection(rec.MISSING, "object was deleted before it could be counted")
        raise
    size = int(response["ContentLength"])
    metadata = response.get("Metadata", {})
    if size > svc.max_bytes:
        # Judged by its length alone: a too-large object is never read into memory.
        response["Body"].close()
        return size, b"", metadata, rec.check_upload(size, b"", svc.max_bytes)
    body = response["Body"].read()
    return size, body, metadata, rec.check_upload(len(body), body[: rec.SNIFF_BYTES], svc.max_bytes)


def _expected(svc: Services, key: str, metadata: dict[str, str]) -> tuple[int | None, str | None, list[str]]:
    return rec.expected_count(key, metadata, lambda item_key: svc.table.get_item(Key=item_key).get("Item"))


# The statuses with which the container judges a body (ml/inference.py BadRequest): the photo is bad, and
# retrying cannot change that. Any other status (401, 403, 404, 408, 429, 5xx) says the container, its route
# or its credentials are wrong: the record fails, comes back, and ends in the DLQ where the alarm fires.
BODY_STATUSES = frozenset({400, 413, 415, 422})


def model_verdict(error: ClientError) -> tuple[int, str] | None:
    """(status, message) when the container itself refused the body; None for anything a retry may cure or an
    operator must see (throttling, 5xx, other 4xx, SageMaker's own errors such as a missing endpoint)."""
    code = str(error.response["Error"].get("Code", ""))
    if code == "ModelError":
        # SageMaker wraps the container's answer: HTTP 424 outside, the container's status inside
        # (InvokeEndpoint API reference: ModelError, OriginalStatusCode, OriginalMessage).
        status = int(error.response.get("OriginalStatusCode") or 0)
        message = error.response.get("OriginalMessage") or error.response["Error"].get("Message")
    elif code.isdigit():
        # A container answering directly (the offline endpoint, ``python -m ml.serve``) has no AWS error type:
        # botocore reports its bare HTTP status as the code.
        status, message = int(code), error.response["Error"].get("Message")
    else:
        return None
    if status not in BODY_STATUSES:
        return None
    return status, str(message or f"HTTP {status} from the model container")


def invoke(svc: Services, body: bytes, content_type: str) -> tuple[dict[str, Any] | None, rec.Rejection | None]:
    """(prediction, None), or (None, rejection) when the model says the body is bad (a 4xx from the
    container). Throttling and 5xx raise, so SQS delivers the photo again."""
    try:
        response = svc.runtime.invoke_endpoint(
            EndpointName=svc.endpoint_name, ContentType=content_type, Accept="application/json", Body=body
        )
    except ClientError as error:
        verdict = model_verdict(error)
        if verdict is None:
            raise
        status, message = verdict
        # 413: the model refused the pixel count (a small file can still decode to a huge image).
        code = rec.TOO_LARGE if status == 413 else rec.CORRUPT
        return None, rec.Rejection(code, f"the model could not read the image: {message}")
    return rec.read_answer(response["Body"].read()), None


def publish(svc: Services, item: dict[str, Any]) -> None:
    detail = rec.summary(item)
    response = svc.events.put_events(
        Entries=[
            {
                "Source": svc.event_source,
                "DetailType": f"Photo count {item['status']}",
                "Detail": json.dumps(detail),
                "EventBusName": svc.event_bus,
                "Resources": [f"arn:aws:s3:::{item['bucket']}/{item['key']}"],
            }
        ]
    )
    if response.get("FailedEntryCount"):
        raise RuntimeError(f"EventBridge refused the {item['status']} event: {response['Entries']}")


@tracer.capture_method
def count_photo(ref: ObjectRef, svc: Services) -> dict[str, Any]:
    """Count one upload and store its record; returns the record's summary."""
    size, body, metadata, rejection = _read_object(svc, ref)
    expected, expected_from, notes = _expected(svc, ref.key, metadata)
    prediction = None
    if rejection is None:
        prediction, rejection = invoke(svc, body, rec.content_type(body[: rec.SNIFF_BYTES]) or "image/jpeg")
    item = rec.build_record(
        bucket=ref.bucket,
        key=ref.key,
        version_id=ref.version_id,
        size=size,
        prediction=prediction,
        rejection=rejection,
        expected=expected,
        expected_from=expected_from,
        threshold=svc.threshold,
        counted_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        source="event",
        notes=notes,
        error_rate=svc.error_rate,
    )
    review_queue.mark(item, svc.review_policy, review_queue.day_slot_taker(svc.table, svc.review_policy),
                      review_queue.displacer(svc.table, svc.review_policy))
    try:
        svc.table.put_item(**rec.conditional_put(item, ref.sequencer))
    except svc.table.meta.client.exceptions.ConditionalCheckFailedException:
        # A person's decision or a newer event's record stands; this event changes nothing.
        logger.warning("record kept: a person decided it or a newer upload event wrote it",
                       extra={"key": ref.key, "versionId": ref.version_id, "sequencer": ref.sequencer})
        return rec.summary(item) | {"kept": True}
    if item["status"] in rec.NOTIFY_STATUSES:
        publish(svc, item)
    metrics.add_metric(name=f"Photos-{item['status']}", unit=MetricUnit.Count, value=1)
    logger.info("photo counted", extra=rec.summary(item))
    return rec.summary(item)


@cache
def _idempotent_counter():
    svc = services()
    config = IdempotencyConfig(
        event_key_jmespath="[bucket, key, identity]",
        # S3 redelivers within minutes; a day covers SQS retries up to maxReceiveCount with room to spare.
        expires_after_seconds=24 * 3600,
        raise_on_no_idempotency_key=True,
    )

    @idempotent_function(data_keyword_argument="upload", persistence_store=svc.persistence, config=config)
    def count_once(upload: dict[str, Any]) -> dict[str, Any]:
        ref = ObjectRef(**{k: upload[k] for k in ("bucket", "key", "version_id", "sequencer", "size")})
        return count_photo(ref, svc)

    return config, count_once


def reset() -> None:
    """Forget clients and settings (tests change the environment between cases)."""
    services.cache_clear()
    _idempotent_counter.cache_clear()


# Why a record failed, as the CountFailures metric's "cause" dimension (infra/observability.py graphs each).
FAILURE_CAUSES = ("out-of-time", "endpoint-timeout", "endpoint-throttled", "endpoint-error", "bad-prediction",
                  "bad-message", "aws-error", "unexpected")


def failure_cause(error: BaseException) -> str:
    if isinstance(error, OutOfTime):
        return "out-of-time"
    if isinstance(error, ReadTimeoutError | ConnectTimeoutError | EndpointUnreachable):  # stalled or unreachable
        return "endpoint-timeout"
    if isinstance(error, rec.BadPrediction):
        return "bad-prediction"
    if isinstance(error, ClientError):
        if error.operation_name != "InvokeEndpoint":
            return "aws-error"
        code = str(error.response["Error"].get("Code", ""))
        throttled = "Throttl" in code or code == "429" or error.response.get("OriginalStatusCode") == 429
        return "endpoint-throttled" if throttled else "endpoint-error"
    if isinstance(error, ValueError):
        return "bad-message"
    return "unexpected"


def _report_failure(record: SQSRecord, refs: list[ObjectRef], error: BaseException) -> None:
    # Powertools logs a record's exception at DEBUG only: without this an operator sees a DLQ alarm and no cause.
    cause = failure_cause(error)
    ref = refs[0] if refs else None
    logger.warning("record failed; SQS will deliver it again (then the DLQ)", extra={
        "cause": cause, "error": f"{type(error).__name__}: {error}"[:1000], "messageId": record.message_id,
        "bucket": ref.bucket if ref else None, "key": ref.key if ref else None,
        "receiveCount": record.attributes.approximate_receive_count})
    with single_metric(name="CountFailures", unit=MetricUnit.Count, value=1,
                       default_dimensions={"service": os.environ.get("POWERTOOLS_SERVICE_NAME", "count")}) as metric:
        metric.add_dimension(name="cause", value=cause)


def record_handler(record: SQSRecord, lambda_context: LambdaContext | None = None) -> list[dict[str, Any]]:
    refs: list[ObjectRef] = []
    try:
        refs = object_refs(record.body)
        return _count_refs(refs, lambda_context)
    except Exception as error:
        _report_failure(record, refs, error)
        raise


def _count_refs(refs: list[ObjectRef], context: LambdaContext | None) -> list[dict[str, Any]]:
    _, count_once = _idempotent_counter()
    svc = services()
    results = []
    for ref in refs:
        if not ref.key.startswith(svc.incoming_prefix):
            logger.warning("upload outside the incoming prefix ignored", extra={"key": ref.key})
            continue
        remaining = context.get_remaining_time_in_millis() / 1000 if context is not None else float("inf")
        if remaining < svc.call_budget_seconds:
            # Fail it untried (no idempotency record is written): SQS delivers it again in a fresh invocation.
            raise OutOfTime(f"{remaining:.1f} s left, one record may need {svc.call_budget_seconds:.1f} s")
        results.append(count_once(upload=asdict(ref) | {"identity": ref.identity}))
    if not results:
        logger.info("message acknowledged without a photo to count (S3 test event or non-upload event)")
    return results


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    config, _ = _idempotent_counter()
    config.register_lambda_context(context)
    return process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                    context=context)
