"""Copy worker: one Distributed Map batch -> server-side copies into raw/ and one record per good image.

Batch input (ItemBatcher with the ItemSelector of infra/ingest.py)::

    {"Items": [{"image_id": "01046", "sourceBucket": "aft-vbi-pds", "minCount": null, "maxCount": null}, ...],
     "BatchInput": {...}}

Per image: read the source metadata (the label comes from there, never from a list), keep it only if it
parses and, for count-range, falls in the range; then CopyObject the image and the metadata into
``raw/bin-images/`` and ``raw/metadata/`` unless the destination already holds that very source object.
The copy is done by S3 (no bytes pass through the function) and takes the bucket's default KMS encryption.

A problem with one image (missing source object, corrupt metadata, access refused) becomes a failure entry
with its reason in the result; it never fails the batch. Only problems that a retry can cure (throttling
that outlasted the SDK's own retries, 5xx, a source changed mid-copy) raise :class:`TransientCopyError`, which
the state machine retries; the batch is idempotent, so a retry redoes nothing that already succeeded.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from lambdas.ingest import aws
from ml import abid

logger = Logger()
tracer = Tracer()
metrics = Metrics()

RAW_PREFIX = "raw/"
# What each Map item carries besides its image id, read from the select step's plan at $.ingest:
# infra/ingest.py builds the ItemSelector from this, and the tests build their batches from it.
ITEM_FROM_PLAN = {"sourceBucket": "sourceBucket", "minCount": "minCount", "maxCount": "maxCount"}
# The destination remembers which source object it is a copy of; S3's own ETag cannot tell, because an
# SSE-KMS object's ETag is not the MD5 that the unencrypted source's ETag is.
SOURCE_ETAG = "source-etag"
SOURCE_BUCKET = "source-bucket"
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
# A bucket that does not exist will not appear on a retry: fail the image at once instead of four retries.
_NO_BUCKET = "NoSuchBucket"


class TransientCopyError(RuntimeError):
    """A failure a retry of the batch may cure; the state machine's Retry on this name handles it."""


@dataclass
class BatchResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    copied: int = 0  # objects copied (an image and its metadata count two)
    unchanged: int = 0  # objects already in raw/ as a copy of the same source object
    filtered: int = 0  # images whose count fell outside the requested range: neither copied nor failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "failures": self.failures,
            "copied": self.copied,
            "unchanged": self.unchanged,
            "filtered": self.filtered,
        }


@dataclass
class _ItemOutcome:
    record: abid.AbidRecord | None = None
    failure: dict[str, str] | None = None
    copied: int = 0
    unchanged: int = 0
    filtered: bool = False


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _failure(image_id: str, key: str, reason: str) -> _ItemOutcome:
    return _ItemOutcome(failure={"imageId": image_id, "key": key, "reason": reason})


def _copy_if_changed(
    s3: Any, *, source_bucket: str, key: str, etag: str, size: int, content_type: str, data_bucket: str
) -> bool:
    """Copy ``key`` into raw/ unless the destination already is a copy of this source object; True if copied."""
    target = RAW_PREFIX + key
    try:
        head = s3.head_object(Bucket=data_bucket, Key=target)
    except ClientError as error:
        if _code(error) not in _MISSING:
            raise TransientCopyError(f"HeadObject s3://{data_bucket}/{target}: {_code(error)}") from error
    else:
        if head.get("Metadata", {}).get(SOURCE_ETAG) == etag and head.get("ContentLength") == size:
            return False
    s3.copy_object(
        Bucket=data_bucket,
        Key=target,
        CopySource={"Bucket": source_bucket, "Key": key},
        # Fails with 412 if the source changed since it was read, so the record always matches the copy.
        CopySourceIfMatch=f'"{etag}"',
        MetadataDirective="REPLACE",
        Metadata={SOURCE_ETAG: etag, SOURCE_BUCKET: source_bucket},
        ContentType=content_type,
    )
    return True


def process_item(s3: Any, item: dict[str, Any], *, data_bucket: str, default_source: str) -> _ItemOutcome:
    image_id = str(item.get("image_id", "")).strip()
    if not abid.is_image_id(image_id):
        return _failure(image_id, "", f"not an ABID image id: {image_id!r}")
    source = item.get("sourceBucket") or default_source
    probe = abid.AbidRecord(image_id, 0, 0)
    meta_key, image_key = probe.metadata_key, probe.image_key
    try:
        # A ranged read: a metadata object above the cap is refused without being held (parse_metadata says so).
        metadata = s3.get_object(Bucket=source, Key=meta_key, Range=f"bytes=0-{abid.MAX_METADATA_BYTES}")
        body = metadata["Body"].read(abid.MAX_METADATA_BYTES + 1)
        metadata["Body"].close()
        metadata["ContentLength"] = int(str(metadata.get("ContentRange", "")).rpartition("/")[2] or len(body))
    except ClientError as error:
        code = _code(error)
        if code == "InvalidRange":  # S3's answer to a range on an empty object
            return _failure(image_id, meta_key, f"corrupt metadata s3://{source}/{meta_key}: the object is empty")
        if code in _MISSING:
            return _failure(image_id, meta_key, f"source object s3://{source}/{meta_key} does not exist")
        if code in _DENIED:
            return _failure(image_id, meta_key, f"access to s3://{source}/{meta_key} was denied ({code})")
        if code == _NO_BUCKET:
            return _failure(image_id, meta_key, f"source bucket s3://{source} does not exist")
        raise TransientCopyError(f"GetObject s3://{source}/{meta_key}: {code}") from error
    try:
        record = abid.parse_metadata(image_id, body)
    except abid.InvalidRecord as error:
        return _failure(image_id, meta_key, f"corrupt metadata s3://{source}/{meta_key}: {error}")
    low, high = item.get("minCount"), item.get("maxCount")
    if (low is not None and record.quantity < int(low)) or (high is not None and record.quantity > int(high)):
        return _ItemOutcome(filtered=True)
    try:
        image = s3.head_object(Bucket=source, Key=image_key)
    except ClientError as error:
        code = _code(error)
        if code in _MISSING:
            return _failure(image_id, image_key, f"source object s3://{source}/{image_key} does not exist")
        if code in _DENIED:
            return _failure(image_id, image_key, f"access to s3://{source}/{image_key} was denied ({code})")
        raise TransientCopyError(f"HeadObject s3://{source}/{image_key}: {code}") from error
    if image["ContentLength"] > abid.MAX_PHOTO_BYTES:
        return _failure(image_id, image_key, f"s3://{source}/{image_key} is {image['ContentLength']} bytes, above "
                        f"the {abid.MAX_PHOTO_BYTES} bytes a photo may have")
    outcome = _ItemOutcome(record=record)
    objects = (
        (image_key, image["ETag"], image["ContentLength"], image.get("ContentType") or "image/jpeg"),
        (meta_key, metadata["ETag"], metadata["ContentLength"], "application/json"),
    )
    for key, etag, size, content_type in objects:
        try:
            copied = _copy_if_changed(
                s3, source_bucket=source, key=key, etag=etag.strip('"'), size=size,
                content_type=content_type, data_bucket=data_bucket,
            )
        except ClientError as error:
            code = _code(error)
            if code in _MISSING:
                return _failure(image_id, key, f"source object s3://{source}/{key} disappeared during the copy")
            if code == _NO_BUCKET:
                return _failure(image_id, key, f"bucket of s3://{source}/{key} or of the copy does not exist")
            raise TransientCopyError(f"CopyObject s3://{source}/{key}: {code}") from error
        if copied:
            outcome.copied += 1
        else:
            outcome.unchanged += 1
    return outcome


def process_batch(
    items: list[dict[str, Any]], *, s3: Any, data_bucket: str, default_source: str, threads: int = 1
) -> BatchResult:
    """Every item of one batch, ``threads`` at a time (S3 calls are I/O bound); results in item order."""

    def one(item: dict[str, Any]) -> _ItemOutcome:
        return process_item(s3, item, data_bucket=data_bucket, default_source=default_source)

    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
            outcomes = list(pool.map(one, items))
    else:
        outcomes = [one(item) for item in items]
    result = BatchResult()
    for outcome in outcomes:
        if outcome.record is not None:
            result.records.append(
                {"image_id": outcome.record.image_id, "quantity": outcome.record.quantity,
                 "n_asins": outcome.record.n_asins}
            )
        if outcome.failure is not None:
            result.failures.append(outcome.failure)
        result.copied += outcome.copied
        result.unchanged += outcome.unchanged
        result.filtered += int(outcome.filtered)
    return result


def items_of(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch's items; BatchInput values fill what an item leaves out."""
    shared = event.get("BatchInput") or {}
    items = event.get("Items")
    if not isinstance(items, list):
        raise ValueError("the event is not a Distributed Map batch: it has no 'Items' list")
    return [{**shared, **item} if isinstance(item, dict) else {**shared, "image_id": item} for item in items]


@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    items = items_of(event)
    result = process_batch(
        items,
        s3=aws.s3(),
        data_bucket=aws.data_bucket(),
        default_source=os.environ.get("SOURCE_BUCKET", "aft-vbi-pds"),
        threads=int(os.environ.get("INGEST_WORKER_THREADS", "16")),
    )
    logger.info(
        "batch done",
        extra={"items": len(items), "records": len(result.records), "failures": len(result.failures),
               "copied": result.copied, "unchanged": result.unchanged, "filtered": result.filtered},
    )
    for failure in result.failures:
        logger.warning("image not ingested", extra=failure)
    metrics.add_metric(name="ObjectsCopied", unit=MetricUnit.Count, value=result.copied)
    metrics.add_metric(name="ObjectsUnchanged", unit=MetricUnit.Count, value=result.unchanged)
    metrics.add_metric(name="ImagesFailed", unit=MetricUnit.Count, value=len(result.failures))
    return result.to_dict()
