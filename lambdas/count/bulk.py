"""Bulk counting with SageMaker Batch Transform: plan (screen a prefix, write the manifest) and load (turn
``.out`` files into count records, one page per call).

Batch Transform fails the whole job when a record fails, so what the count Lambda would reject before the
endpoint (empty, too large, not JPEG/PNG) is rejected here before the job, with the same records. Files
under ``reports/bulk/<job>/``: ``manifest.json`` (the job's ManifestFile), ``inputs.json`` (each accepted
photo's key, version, size and expected count), ``out/<key>.out`` (the job's answers), ``load-<n>.json``
(what each load page stored, and which photos had no answer).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from lambdas.count import records as rec
from lambdas.review import queue as review_queue
from lambdas.training.request import has_local_storage

logger = Logger()
tracer = Tracer()
PAGE = 500  # .out files per load call: well inside the Lambda timeout at a few ms per object


@cache
def clients() -> tuple[Any, Any, Any]:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    table = boto3.resource("dynamodb", region_name=region).Table(os.environ["COUNTS_TABLE"])
    return boto3.client("s3", region_name=region), boto3.client("sagemaker", region_name=region), table


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def model_in_service(sagemaker: Any, endpoint_name: str) -> str:
    try:
        endpoint = sagemaker.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as error:
        if error.response["Error"]["Code"] == "ValidationException":
            raise RuntimeError(f"endpoint {endpoint_name} does not exist: deploy a model before counting in bulk"
                               ) from None
        raise
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    return config["ProductionVariants"][0]["ModelName"]


def transform_model_request(described: dict[str, Any], model_name: str, role_arn: str) -> dict[str, Any]:
    """CreateModel for one transform job: the container and artifact of the model in service, under the transform
    role (a transform job runs with its model's role) and with no network, which Batch Transform supports."""
    container = {key: described["PrimaryContainer"][key]
                 for key in ("Image", "ModelDataUrl", "Environment") if key in described["PrimaryContainer"]}
    return {"ModelName": model_name, "ExecutionRoleArn": role_arn, "PrimaryContainer": container,
            "EnableNetworkIsolation": True, "Tags": [{"Key": "source", "Value": described["ModelName"]}]}


def _screen(s3: Any, bucket: str, obj: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], rec.Rejection | None]:
    """One listed object: its first bytes and metadata (a ranged GET), and a rejection where it has one."""
    size = int(obj["Size"])
    entry: dict[str, Any] = {"key": obj["Key"], "size": size, "metadata": {}}
    if size == 0 or size > max_bytes:
        head = s3.head_object(Bucket=bucket, Key=obj["Key"])
        entry.update(metadata=head.get("Metadata", {}), versionId=head.get("VersionId"))
        return entry, rec.check_upload(size, b"", max_bytes)
    response = s3.get_object(Bucket=bucket, Key=obj["Key"], Range=f"bytes=0-{rec.SNIFF_BYTES - 1}")
    entry.update(metadata=response.get("Metadata", {}), versionId=response.get("VersionId"))
    return entry, rec.check_upload(size, response["Body"].read(), max_bytes)


def plan(s3: Any, sagemaker: Any, table: Any, *, bucket: str, prefix: str, job_name: str, endpoint_name: str,
         instance_type: str, kms_key_id: str | None, bulk_prefix: str, threshold: float | None, max_bytes: int,
         role_arn: str) -> dict[str, Any]:
    serving = sagemaker.describe_model(ModelName=model_in_service(sagemaker, endpoint_name))
    listed = [obj for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
              for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    # Ranged GETs are latency-bound: a few dozen in flight keep a 10,000-photo prefix within minutes.
    with ThreadPoolExecutor(max_workers=32) as pool:
        screened = list(pool.map(lambda obj: _screen(s3, bucket, obj, max_bytes), listed))
    accepted, rejected = [], 0
    with table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
        for entry, rejection in screened:
            expected, expected_from, notes = rec.expected_count(
                entry["key"], entry["metadata"], lambda k: table.get_item(Key=k).get("Item"))
            entry.update(expected=expected, expectedFrom=expected_from, notes=notes)
            if rejection is None:
                accepted.append({k: entry[k] for k in ("key", "size", "versionId", "expected", "expectedFrom",
                                                       "notes")})
                continue
            rejected += 1
            batch.put_item(Item=rec.build_record(
                bucket=bucket, key=entry["key"], version_id=entry.get("versionId"), size=entry["size"],
                prediction=None, rejection=rejection, expected=expected, expected_from=expected_from,
                threshold=threshold, counted_at=_now(), source=f"bulk:{job_name}", notes=notes))
    base = f"{bulk_prefix}{job_name}/"
    manifest = [{"prefix": f"s3://{bucket}/"}, *[entry["key"] for entry in accepted]]
    s3.put_object(Bucket=bucket, Key=f"{base}manifest.json", Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=bucket, Key=f"{base}inputs.json", Body=json.dumps(accepted).encode())
    output: dict[str, Any] = {"S3OutputPath": f"s3://{bucket}/{base}out/", "Accept": "application/json",
                              "AssembleWith": "None"}
    resources: dict[str, Any] = {"InstanceType": instance_type, "InstanceCount": 1}
    if kms_key_id:
        output["KmsKeyId"] = kms_key_id
        # Instance types with local NVMe storage refuse a volume key (TransformResources API reference).
        if not has_local_storage(instance_type):
            resources["VolumeKmsKeyId"] = kms_key_id
    # Made last, once the manifest is written: a failed screening leaves no model behind.
    model_name = job_name
    sagemaker.create_model(**transform_model_request(serving, model_name, role_arn))
    return {
        "TransformJobName": job_name,
        "ModelName": model_name,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "ManifestFile",
                                            "S3Uri": f"s3://{bucket}/{base}manifest.json"}},
            # JPEG and PNG share one job: the model sniffs the bytes for this generic image type.
            "ContentType": "application/x-image",
            "SplitType": "None",
        },
        "TransformOutput": output,
        "TransformResources": resources,
        "Bucket": bucket,
        "Base": base,
        "Accepted": len(accepted),
        "Rejected": rejected,
    }


def load(s3: Any, table: Any, *, job: dict[str, Any], index: int, threshold: float | None, page: int = PAGE,
         error_rate: float = rec.decisions.DEFAULT_ERROR_RATE) -> dict[str, Any]:
    bucket, base = job["Bucket"], job["Base"]
    inputs = json.loads(s3.get_object(Bucket=bucket, Key=f"{base}inputs.json")["Body"].read())
    chunk = inputs[index : index + page]
    loaded, unanswered, broken = 0, [], []
    # Bulk counts join the review queue by the same rules as single uploads (lambdas/review/queue.py).
    policy = review_queue.QueuePolicy.from_environ()
    take_slot = review_queue.day_slot_taker(table, policy)
    displace = review_queue.displacer(table, policy)
    with table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
        for entry in chunk:
            try:
                body = s3.get_object(Bucket=bucket, Key=f"{base}out/{entry['key']}.out")["Body"].read()
            except ClientError as error:
                if error.response["Error"]["Code"] in {"NoSuchKey", "404"}:
                    unanswered.append(entry["key"])  # the job stopped (or failed) before this photo
                    continue
                raise
            try:
                answer = json.loads(body)
                if isinstance(answer, dict) and isinstance(answer.get("predictions"), list):
                    answer = answer["predictions"][0]
                prediction = rec.read_prediction(answer)
            except (ValueError, IndexError) as error:
                broken.append({"key": entry["key"], "error": str(error)})
                continue
            batch.put_item(Item=review_queue.mark(rec.build_record(
                bucket=bucket, key=entry["key"], version_id=entry.get("versionId"), size=entry["size"],
                prediction=prediction, rejection=None, expected=entry.get("expected"),
                expected_from=entry.get("expectedFrom"), threshold=threshold, counted_at=_now(),
                source=f"bulk:{job['TransformJobName']}", notes=entry.get("notes"), error_rate=error_rate),
                policy, take_slot, displace))
            loaded += 1
    report = {"index": index, "loaded": loaded, "unanswered": unanswered, "broken": broken}
    s3.put_object(Bucket=bucket, Key=f"{base}load-{index:07d}.json", Body=json.dumps(report).encode())
    following = index + len(chunk)
    return {"done": following >= len(inputs), "next": {"index": following}, "loaded": loaded}


# SageMaker's limit on a transform job's name (CreateTransformJob, TransformJobName: 1 to 63 characters).
MAX_JOB_NAME = 63


def transform_job_name(endpoint_name: str, execution: str, now: datetime) -> str:
    """``<endpoint>-bulk-<time>-<execution digest>``: two bulk counts started in the same second by different
    executions get different names (a shared name made one fail and then read the other's output). The
    ``<endpoint>-bulk-`` prefix is what the transform role is granted; the time goes first when the name would be
    too long."""
    digest = hashlib.sha256(execution.encode()).hexdigest()[:8]
    name = f"{endpoint_name}-bulk-{now.strftime('%Y%m%d-%H%M%S')}-{digest}"
    if len(name) > MAX_JOB_NAME:
        name = f"{endpoint_name}-bulk-{hashlib.sha256(f'{execution} {now.isoformat()}'.encode()).hexdigest()}"
    return name[:MAX_JOB_NAME]


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def plan_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    s3, sagemaker, table = clients()
    options = event.get("input") or {}
    endpoint_name = os.environ["ENDPOINT_NAME"]
    job_name = transform_job_name(endpoint_name, str(event.get("execution") or ""), datetime.now(UTC))
    incoming = os.environ["INCOMING_PREFIX"]
    prefix = options.get("prefix") or incoming
    if not isinstance(prefix, str) or not prefix.startswith(incoming):
        # The job's role may read uploads only; say so before anything starts.
        raise ValueError(f"bulk counting covers uploads: the prefix must start with {incoming!r}, got {prefix!r}")
    job = plan(s3, sagemaker, table, bucket=os.environ["DATA_BUCKET"],
               prefix=prefix, job_name=job_name,
               endpoint_name=endpoint_name, instance_type=os.environ["TRANSFORM_INSTANCE_TYPE"],
               kms_key_id=os.environ.get("KMS_KEY_ID"), bulk_prefix=os.environ["BULK_PREFIX"],
               threshold=rec.parse_threshold(os.environ["CONFIDENCE_THRESHOLD"]),
               max_bytes=int(os.environ["MAX_IMAGE_BYTES"]), role_arn=os.environ["TRANSFORM_ROLE_ARN"])
    logger.info("bulk count planned", extra={k: job[k] for k in ("TransformJobName", "Accepted", "Rejected")})
    return job


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def load_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    s3, _, table = clients()
    result = load(s3, table, job=event["job"], index=int(event["cursor"]["index"]),
                  threshold=rec.parse_threshold(os.environ["CONFIDENCE_THRESHOLD"]),
                  error_rate=rec.parse_error_rate(os.environ.get("CONSIGNMENT_ERROR_RATE")))
    logger.info("bulk results loaded", extra=result)
    return result
