"""Packer: one plan item -> one shard, ``shards/<plan id>/<split>/<split>-NNNNNN.tar`` (ml/shards.py's format).

Input: one item of the plan (lambdas/pack/plan.py), as the Distributed Map passes it::

    {"runId": "run-1", "planId": "0123456789abcdef", "split": "train", "index": 12, "ids": ["00012", ...]}

Each photo and its metadata are read from ``raw/`` (``PACK_THREADS`` requests at a time), the photos that
could be read are packed in the item's id order, and the shard is written unless the object there already
holds these very bytes (its SHA-256 is kept in the object's metadata), so a rerun writes nothing new.

A photo that cannot be packed (missing under raw/, access refused, not a JPEG, metadata that does not parse)
becomes a failure with its reason in the result; the rest of the shard is still packed. Only what a retry can
cure (throttling that outlasted the SDK's own retries, 5xx, a dropped connection) raises
:class:`TransientPackError`, which the state machine retries.

Lambda's limits, and how this stays inside them (Lambda developer guide, "Lambda quotas"):
- memory: photos and the tar are held in memory, about twice the shard's size (1,000 photos of the shipped
  sample's 6.8 KB are 7 MB; at the memory the construct gives, 1 GB, shards up to a few hundred MB fit);
  /tmp (512 MB by default) is not used;
- 1,024 threads and 1,024 file descriptors per execution environment: ``PACK_THREADS`` (32) threads share a
  pool of 64 connections (lambdas/ingest/aws.py);
- 15 minutes per invocation: the construct's timeout is 5 minutes, far above a 1,000-photo shard;
- 6 MB response (and Step Functions' 262,144 bytes per state output): the result carries counts and failures,
  never photo bytes; plan.MAX_PHOTOS_PER_SHARD bounds the failures.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ConfigDict, Field

from lambdas.ingest import aws
from lambdas.pack import layout
from lambdas.pack.plan import MAX_PHOTOS_PER_SHARD
from ml import abid, shards

logger = Logger()
tracer = Tracer()
metrics = Metrics()

# The shard's SHA-256, kept in the object's user metadata (x-amz-meta-content-sha256): S3's ETag cannot say it,
# since an SSE-KMS object's ETag is not an MD5 of its bytes.
CONTENT_DIGEST = "content-sha256"
# S3 answers a missing key with 404 only to a caller that holds s3:ListBucket, otherwise with 403 (S3 API
# reference, GetObject, "Permissions"); the packer's role holds it, so 404 means missing and 403 means denied.
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden"}
# Every JPEG starts with the start-of-image marker FF D8 (ITU-T T.81, B.1.1.3) followed by another marker (FF).
_JPEG_START = b"\xff\xd8\xff"
_REASON_LENGTH = 120


class TransientPackError(RuntimeError):
    """A failure a retry of the shard may cure; the state machine's Retry on this name handles it."""


class ShardTask(BaseModel):
    """One plan item."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    run_id: str = Field(alias="runId", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    plan_id: str = Field(alias="planId", pattern=r"^[0-9a-f]{16}$")
    split: str = Field(pattern=r"^(train|validation|test)$")
    index: int = Field(ge=0, le=999_999)
    ids: list[str] = Field(min_length=1, max_length=MAX_PHOTOS_PER_SHARD)


@dataclass(frozen=True)
class _Fetched:
    image_id: str
    sample: shards.Sample | None = None
    reason: str | None = None


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _get(s3: Any, bucket: str, key: str, limit: int) -> bytes | str:
    """The object's bytes, or why it cannot be read (a str); raises what a retry may cure.

    A ranged read of at most ``limit`` + 1 bytes: an object above ``limit`` is refused with its size (from the
    Content-Range) without its bytes ever being held."""
    try:
        response = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
        body = response["Body"].read(limit + 1)
        response["Body"].close()
        if len(body) > limit:
            total = str(response.get("ContentRange", "")).rpartition("/")[2] or "more than limit"
            return f"{key} is {total} bytes, above the {limit} bytes a packed object may have"
        return body
    except ClientError as error:
        code = _code(error)
        if code == "InvalidRange":
            return b""  # S3 answers a range on an empty object with 416 InvalidRange
        if code in _MISSING:
            return f"{key} does not exist ({code})"
        if code in _DENIED:
            return f"{key} cannot be read: access denied ({code})"
        raise TransientPackError(f"GetObject s3://{bucket}/{key}: {code}") from error
    except BotoCoreError as error:
        raise TransientPackError(f"GetObject s3://{bucket}/{key}: {error}") from error


def fetch(s3: Any, bucket: str, image_id: str) -> _Fetched:
    """One photo and its metadata from raw/, checked enough that the trainer can read what is packed."""
    if not abid.is_image_id(image_id):
        return _Fetched(image_id, reason=f"not an ABID image id: {image_id[:40]!r}")
    image_key, metadata_key = layout.raw_keys(image_id)
    metadata = _get(s3, bucket, metadata_key, abid.MAX_METADATA_BYTES)
    if isinstance(metadata, str):
        return _Fetched(image_id, reason=metadata)
    try:
        abid.parse_metadata(image_id, metadata)
    except abid.InvalidRecord as error:
        return _Fetched(image_id, reason=f"{metadata_key} is unreadable: {error}"[:_REASON_LENGTH])
    image = _get(s3, bucket, image_key, abid.MAX_PHOTO_BYTES)
    if isinstance(image, str):
        return _Fetched(image_id, reason=image)
    if not image.startswith(_JPEG_START):
        return _Fetched(image_id, reason=f"{image_key} is unreadable: not a JPEG ({len(image)} bytes)")
    return _Fetched(image_id, sample=shards.Sample(image_id, image, metadata))


def _refresh(s3: Any, bucket: str, key: str, head: dict[str, Any], digest: str, retention_days: int) -> None:
    """A reused shard past half its retention is copied onto itself: S3 expires objects by creation date (the
    lifecycle rule on shards/, shardRetentionDays), and a training job that reuses the shard must not see it go."""
    modified = head.get("LastModified")
    if not retention_days or modified is None or datetime.now(UTC) - modified < timedelta(days=retention_days / 2):
        return
    try:
        s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
                       MetadataDirective="REPLACE", Metadata={CONTENT_DIGEST: digest}, ContentType="application/x-tar")
    except (ClientError, BotoCoreError) as error:
        raise TransientPackError(f"CopyObject s3://{bucket}/{key}: {error}") from error


def _write_if_changed(s3: Any, bucket: str, key: str, data: bytes, digest: str, retention_days: int = 0) -> bool:
    """Put the shard unless the object already holds these bytes; True when written."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _code(error) not in _MISSING:
            raise TransientPackError(f"HeadObject s3://{bucket}/{key}: {_code(error)}") from error
    except BotoCoreError as error:
        raise TransientPackError(f"HeadObject s3://{bucket}/{key}: {error}") from error
    else:
        if head.get("Metadata", {}).get(CONTENT_DIGEST) == digest and head.get("ContentLength") == len(data):
            _refresh(s3, bucket, key, head, digest, retention_days)
            return False
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/x-tar",
                      Metadata={CONTENT_DIGEST: digest})
    except (ClientError, BotoCoreError) as error:
        raise TransientPackError(f"PutObject s3://{bucket}/{key}: {error}") from error
    return True


def _delete(s3: Any, bucket: str, key: str) -> None:
    try:
        s3.delete_object(Bucket=bucket, Key=key)  # S3 answers 204 whether or not the key existed
    except (ClientError, BotoCoreError) as error:
        raise TransientPackError(f"DeleteObject s3://{bucket}/{key}: {error}") from error


def pack_shard(task: ShardTask, *, s3: Any, data_bucket: str, threads: int = 1,
               retention_days: int = 0) -> dict[str, Any]:
    """Make one shard; the result names it, counts what went in, and lists every photo left out and why."""

    def one(image_id: str) -> _Fetched:
        return fetch(s3, data_bucket, image_id)

    if threads > 1 and len(task.ids) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(task.ids))) as pool:
            fetched = list(pool.map(one, task.ids))
    else:
        fetched = [one(image_id) for image_id in task.ids]
    samples = [f.sample for f in fetched if f.sample is not None]
    failures = [{"imageId": f.image_id, "reason": f.reason} for f in fetched if f.reason is not None]
    result: dict[str, Any] = {
        "runId": task.run_id, "split": task.split, "index": task.index, "key": None,
        "photos": len(samples), "bytes": 0, "digest": None, "written": False, "failures": failures,
    }
    key = layout.shard_key(task.plan_id, task.split, task.index)
    if not samples:
        # Nothing to train on in this shard; every photo is a failure above. An earlier run of the same plan may
        # have packed it: removed, so the plan's prefix holds only the shards this run reports.
        _delete(s3, data_bucket, key)
        return result
    data = shards.pack(samples)
    digest = shards.digest(data)
    written = _write_if_changed(s3, data_bucket, key, data, digest, retention_days)
    return {**result, "key": key, "bytes": len(data), "digest": digest, "written": written}


@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
@event_parser(model=ShardTask)
def handler(event: ShardTask, context: LambdaContext) -> dict[str, Any]:
    result = pack_shard(event, s3=aws.s3(), data_bucket=aws.data_bucket(),
                        threads=int(os.environ.get("PACK_THREADS", "32")),
                        retention_days=int(os.environ.get("SHARD_RETENTION_DAYS", "0")))
    logger.info("shard packed", extra={k: result[k] for k in ("key", "photos", "bytes", "written")}
                | {"failed": len(result["failures"])})
    for failure in result["failures"]:
        logger.warning("photo not packed", extra=failure)
    metrics.add_metric(name="PhotosPacked", unit=MetricUnit.Count, value=result["photos"])
    metrics.add_metric(name="PhotosNotPacked", unit=MetricUnit.Count, value=len(result["failures"]))
    metrics.add_metric(name="ShardsWritten", unit=MetricUnit.Count, value=int(result["written"]))
    return result
