"""Select step: the execution's dataset request -> ``manifests/<run>/selection.csv`` (the Map's item list).

Only ids are chosen here. Counts are never taken from a list: the copy workers read every image's metadata,
so labels always come from the metadata itself, whichever selector picked the image.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, ValidationError
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import ConfigDict

from lambdas.ingest import aws
from lambdas.ingest.request import InvalidDatasetRequest, Plan, parse_request, resolve, run_id_from
from ml import abid

logger = Logger()
tracer = Tracer()
metrics = Metrics()

LISTS_DIR = Path(__file__).resolve().parent / "lists"
# A user list is read whole into the 1 GB select function, and parsing costs about 14 times its size in memory
# (a 60 MB list took ~840 MB). 16 MiB holds every one of ABID's ~536,000 image keys, one per line, with room.
MAX_LIST_BYTES = 16 * 1024 * 1024
SELECTION_HEADER = "image_id"
MANIFEST_PREFIX = "manifests/"


class SelectEvent(BaseModel):
    """What the state machine passes: the execution input (``$.input``) and name (``$.execution``)."""

    model_config = ConfigDict(extra="ignore")

    input: dict[str, Any] | None = None
    execution: str | None = None


def selection_key(run_id: str) -> str:
    return f"{MANIFEST_PREFIX}{run_id}/selection.csv"


def file_list_ids() -> list[str]:
    """The classic 10,441-image list, shipped in the function's code (lists/file_list.json)."""
    return list(abid.ids_from_file_list(json.loads((LISTS_DIR / "file_list.json").read_text())))


CHALLENGE_LISTS = {"train": "counting_train.json.gz", "validation": "counting_val.json.gz"}


def challenge_ids(split: str) -> list[str]:
    """The ABID counting challenge's train (324,735) or validation (36,032) images, shipped gzipped; ``all`` is
    both (360,767: the whole counting split, every photo of 0-5 objects the challenge lists)."""
    names = list(CHALLENGE_LISTS.values()) if split == "all" else [CHALLENGE_LISTS[split]]
    ids: list[str] = []
    for name in names:
        with gzip.open(LISTS_DIR / name, "rt") as handle:
            ids.extend(abid.ids_from_challenge(json.load(handle)))
    return ids


def manifest_ids(s3: Any, uri: str, data_bucket: str) -> list[str]:
    """A list the user uploaded under manifests/ of the data bucket (the only place the function may read)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if bucket != data_bucket or not key.startswith(MANIFEST_PREFIX):
        raise InvalidDatasetRequest(
            f"invalid dataset request: manifestUri must be under s3://{data_bucket}/{MANIFEST_PREFIX}, got {uri}"
        )
    try:
        response = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise InvalidDatasetRequest(f"invalid dataset request: manifestUri {uri} does not exist") from None
        raise
    if response["ContentLength"] > MAX_LIST_BYTES:
        response["Body"].close()  # never read: the size alone decides
        raise InvalidDatasetRequest(
            f"invalid dataset request: manifestUri {uri} is {response['ContentLength'] / 2**20:.1f} MiB; lists of "
            f"at most {MAX_LIST_BYTES // 2**20} MiB are read (one id per line, every ABID image fits): split it, "
            "or use the count-range or challenge selector"
        )
    body = response["Body"].read()
    try:
        return abid.parse_id_list(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidDatasetRequest(f"invalid dataset request: manifestUri {uri}: {error}") from None


def listed_metadata_ids(s3: Any, bucket: str, *, page_size: int = 1000) -> Iterator[str]:
    """Every image id under metadata/ of the source bucket, one ListObjectsV2 page (1,000 keys) at a time.

    ListObjectsV2 "returns some or all (up to 1,000) of the objects in a bucket" per request
    (https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html), so ABID's ~536,434 metadata keys
    are ~537 sequential requests: at 0.1-0.3 s a page (an assumption: S3 does not publish list latency) that is
    1-3 minutes, inside the select function's 15-minute timeout (infra/ingest.py; Lambda's maximum, 900 s).
    The ids (~6 bytes each) and their sort by hash fit the 1 GB function many times over.
    """
    paginator = s3.get_paginator("list_objects_v2")
    pages = paginator.paginate(
        Bucket=bucket, Prefix=f"{abid.METADATA_DIR}/", PaginationConfig={"PageSize": page_size}
    )
    for page in pages:
        for entry in page.get("Contents", []):
            key = entry["Key"]
            if key.endswith(".json"):
                image_id = abid.image_id_from_key(key)
                if abid.is_image_id(image_id):
                    yield image_id


def candidate_ids(plan: Plan, s3: Any, data_bucket: str) -> list[str]:
    if plan.selector == "file-list":
        return file_list_ids()
    if plan.selector == "challenge":
        return challenge_ids(plan.challenge_split or "train")
    if plan.selector == "manifest":
        return manifest_ids(s3, plan.manifest_uri or "", data_bucket)
    # count-range and all: every image is a candidate; the copy workers read each metadata document and keep only
    # those in range, so the whole-dataset scan is the Distributed Map itself, not this function.
    try:
        return list(listed_metadata_ids(s3, plan.source_bucket))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "AccessDenied"):
            raise InvalidDatasetRequest(
                f"invalid dataset request: cannot list s3://{plan.source_bucket}/metadata/ ({code})"
            ) from None
        raise


def order_and_limit(ids: list[str], *, seed: str, limit: int | None) -> list[str]:
    """Deterministic order by a hash of (seed, id): a ``limit`` then takes an unbiased, repeatable sample
    across every class and id range instead of the lowest ids."""
    unique = list(dict.fromkeys(ids))
    unique.sort(key=lambda image_id: hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest())
    return unique if limit is None else unique[:limit]


def selection_csv(ids: list[str]) -> str:
    # One id a line: the whole bucket (~536,434 ids) is under 4 MB. The Distributed Map reads this file from S3
    # itself (ItemReader), so its size never passes through a state's 256 KiB payload; only each batch of
    # ingestBatchSize items does (100 items of ~100 bytes), and this function's output (the plan, no ids).
    return SELECTION_HEADER + "\n" + "".join(f"{image_id}\n" for image_id in ids)


def select(event: dict[str, Any], *, s3: Any, data_bucket: str, now: str) -> dict[str, Any]:
    """Validate the request, choose the ids, write the selection; return the plan the next steps follow."""
    try:
        envelope = SelectEvent.model_validate(event)
    except ValidationError:
        raise InvalidDatasetRequest("invalid dataset request: the execution input must be a JSON object") from None
    dataset = (envelope.input or {}).get("dataset")
    request = parse_request(dataset)
    plan = resolve(request, run_id=run_id_from(envelope.execution, now))
    ids = order_and_limit(candidate_ids(plan, s3, data_bucket), seed=plan.seed, limit=plan.limit)
    if not ids:
        raise InvalidDatasetRequest(f"invalid dataset request: selector {plan.selector!r} chose no images")
    key = selection_key(plan.run_id)
    s3.put_object(Bucket=data_bucket, Key=key, Body=selection_csv(ids).encode(), ContentType="text/csv")
    return {**plan.to_dict(), "selectionKey": key, "selected": len(ids), "dataBucket": data_bucket}


@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        result = select(event, s3=aws.s3(), data_bucket=aws.data_bucket(),
                        now=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    except InvalidDatasetRequest as error:
        logger.warning("rejected dataset request", extra={"reason": str(error)})
        raise
    logger.info("selection written", extra={k: result[k] for k in ("runId", "selector", "selected", "selectionKey")})
    metrics.add_metric(name="ImagesSelected", unit=MetricUnit.Count, value=result["selected"])
    return result
