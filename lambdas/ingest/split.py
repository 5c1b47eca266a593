"""Split step: the copy map's results -> records, train/validation/test channels and the ingest report.

Reads what the Distributed Map's ResultWriter exported (``manifest.json`` naming SUCCEEDED/FAILED/PENDING
files of child executions). A succeeded child's output is a worker result (records, failures, counters); a
failed child (a batch that kept failing after the state machine's retries) has its input kept, so every
image of that batch is reported with the error that stopped it. Nothing selected goes unaccounted.

Writes, for run ``<run>``::

    manifests/<run>/records.jsonl                 every ingested image (ml.abid record lines)
    manifests/<run>/{train,validation,test}.manifest   SageMaker ManifestFile over s3://<bucket>/raw/
    manifests/<run>/{train,validation,test}.jsonl      the records of each split
    reports/ingest/<run>.json                     counts, per-class figures, every failure with its reason

and returns the ``$.ingest`` object of the state contract.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas import map_results
from lambdas.ingest import aws
from lambdas.ingest.request import Plan
from lambdas.pack import layout
from ml import abid

logger = Logger()
tracer = Tracer()
metrics = Metrics()

REPORT_PREFIX = "reports/ingest/"


class TooManyFailures(RuntimeError):
    """More images failed than ingestToleratedFailurePercent allows; the report is written first."""


class EmptyDataset(RuntimeError):
    """No image survived ingestion, so there is nothing to train on."""


def read_map_results(s3: Any, bucket: str, manifest_key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(worker results of succeeded batches, failed batches as {"items": [...], "reason": str})."""
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for child in map_results.read_children(s3, bucket, manifest_key):
        if child.listed == "SUCCEEDED" and isinstance(child.output, dict) and "records" in child.output:
            results.append(child.output)
            continue
        batch = child.input or {}
        failed.append({"items": batch.get("Items", []) if isinstance(batch, dict) else [],
                       "reason": child.failure_reason("copy batch")})
    return results, failed


def _read_selection(s3: Any, bucket: str, key: str) -> list[str]:
    text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [line.strip() for line in text.splitlines()[1:] if line.strip()]


def gather(
    results: list[dict[str, Any]], failed_batches: list[dict[str, Any]]
) -> tuple[list[abid.AbidRecord], list[dict[str, str]], Counter]:
    records: dict[str, abid.AbidRecord] = {}
    failures: dict[str, dict[str, str]] = {}
    tally: Counter = Counter()
    for result in results:
        for raw in result.get("records", []):
            record = abid.AbidRecord(str(raw["image_id"]), int(raw["quantity"]),
                                    abid.optional_int(raw.get("n_asins")))
            records[record.image_id] = record
        for failure in result.get("failures", []):
            failures.setdefault(failure["imageId"], failure)
        for name in ("copied", "unchanged", "filtered"):
            tally[name] += int(result.get(name, 0))
    for batch in failed_batches:
        for item in batch["items"]:
            image_id = str(item.get("image_id", "")) if isinstance(item, dict) else str(item)
            if image_id not in records:
                failures.setdefault(image_id, {"imageId": image_id, "key": "", "reason": batch["reason"]})
    return sorted(records.values()), sorted(failures.values(), key=lambda f: f["imageId"]), tally


class CopyMapFailed(RuntimeError):
    """The copy map failed as a whole; the report lists every selected image with the map's error."""


def report_failed_map(event: dict[str, Any], *, s3: Any, data_bucket: str) -> None:
    """The copy map failed: nothing of this run may be trained on, so every selected image is reported
    with the map's error (results of the batches that did finish stay under the map-results prefix)."""
    plan = Plan.from_dict(event)
    error = event.get("copyError") or {}
    reason = f"copy map failed: {error.get('Error') or 'unknown error'}: {error.get('Cause') or 'no cause given'}"
    ids = sorted(_read_selection(s3, data_bucket, event["selectionKey"]))
    report_key = f"{REPORT_PREFIX}{plan.run_id}.json"
    aws.put_json(s3, data_bucket, report_key, {
        "runId": plan.run_id,
        "plan": plan.to_dict(),
        "selected": len(ids),
        "ingested": 0,
        "failed": len(ids),
        "copyError": error,
        "mapResults": f"s3://{data_bucket}/{REPORT_PREFIX}map-results/",
        "failures": [{"imageId": image_id, "key": "", "reason": reason} for image_id in ids],
    })
    raise CopyMapFailed(f"{reason[:600]}; report: s3://{data_bucket}/{report_key}")


def split(event: dict[str, Any], *, s3: Any, data_bucket: str) -> dict[str, Any]:
    if event.get("copyError") and not event.get("copy"):
        report_failed_map(event, s3=s3, data_bucket=data_bucket)
    plan = Plan.from_dict(event)
    run = plan.run_id
    details = (event.get("copy") or {}).get("ResultWriterDetails") or {}
    if not details.get("Key"):
        raise ValueError("the copy map's ResultWriterDetails are missing from the split step's input")
    results, failed_batches = read_map_results(s3, details.get("Bucket") or data_bucket, details["Key"])
    records, failures, tally = gather(results, failed_batches)

    selected = int(event.get("selected", 0))
    unaccounted = selected - len(records) - len(failures) - tally["filtered"]
    if unaccounted > 0:
        # Only possible if the map lost items; name them when the set difference can be computed.
        missing_reason = "the copy map returned no result for this image"
        if tally["filtered"] == 0:
            seen = {r.image_id for r in records} | {f["imageId"] for f in failures}
            for image_id in _read_selection(s3, data_bucket, event["selectionKey"]):
                if image_id not in seen:
                    failures.append({"imageId": image_id, "key": "", "reason": missing_reason})
        else:
            failures.append({"imageId": "", "key": "", "reason": f"{unaccounted} images: {missing_reason}"})

    parts = abid.stratified_split(
        records, validation_fraction=plan.validation_fraction, test_fraction=plan.test_fraction, seed=plan.seed
    )
    # People's labels train only: validation and test stay the fixed ABID benchmark the deploy gate compares on.
    reviewed = reviewed_records(s3, data_bucket) if plan.include_reviewed is not False else []
    parts["train"] = sorted([*parts["train"], *reviewed])
    raw_prefix = f"s3://{data_bucket}/raw/"
    manifests = f"manifests/{run}/"
    records_key = f"{manifests}records.jsonl"
    report_key = f"{REPORT_PREFIX}{run}.json"
    failed_percent = 100.0 * len(failures) / selected if selected else 0.0
    report = {
        "runId": run,
        "plan": plan.to_dict(),
        "selected": selected,
        "ingested": len(records),
        "failed": len(failures),
        "failedPercent": round(failed_percent, 3),
        "filteredOutOfRange": tally["filtered"],
        "objectsCopied": tally["copied"],
        "objectsUnchanged": tally["unchanged"],
        "failedBatches": len(failed_batches),
        "counts": {name: len(part) for name, part in parts.items()},
        "reviewedUsed": len(reviewed),
        "classes": {
            name: {str(q): n for q, n in sorted(Counter(r.quantity for r in part).items())}
            for name, part in parts.items()
        },
        "mapRunArn": (event.get("copy") or {}).get("MapRunArn"),
        "mapResults": f"s3://{details.get('Bucket') or data_bucket}/{details['Key']}",
        "failures": failures,
    }
    if failed_percent > plan.tolerated_failure_percent:
        aws.put_json(s3, data_bucket, report_key, report)
        raise TooManyFailures(
            f"{len(failures)} of {selected} images failed ({failed_percent:.1f} %), above the tolerated "
            f"{plan.tolerated_failure_percent:g} %; every failure and its reason: s3://{data_bucket}/{report_key}"
        )
    if not records:
        aws.put_json(s3, data_bucket, report_key, report)
        raise EmptyDataset(f"no image was ingested; see s3://{data_bucket}/{report_key}")

    s3.put_object(Bucket=data_bucket, Key=records_key, Body=abid.records_jsonl(records).encode(),
                  ContentType="application/x-ndjson")
    channels = {}
    for name, part in parts.items():
        manifest_key = f"{manifests}{name}.manifest"
        in_raw = [r for r in part if not r.image_id.startswith(layout.REVIEWED_ID_PREFIX)]
        aws.put_json(s3, data_bucket, manifest_key, abid.sagemaker_manifest(in_raw, raw_prefix))
        s3.put_object(Bucket=data_bucket, Key=f"{manifests}{name}.jsonl", Body=abid.records_jsonl(part).encode(),
                      ContentType="application/x-ndjson")
        channels[name] = f"s3://{data_bucket}/{manifest_key}"
    # The ManifestFile channels hold one prefix (raw/): reviewed photos reach training through the shards, which
    # the packers read from raw/reviewed/ (lambdas/pack/layout.py raw_keys).
    aws.put_json(s3, data_bucket, report_key, report)
    return {
        "runId": run,
        "recordsKey": records_key,
        "channels": channels,
        "counts": report["counts"],
        "reportKey": report_key,
        "reviewedUsed": len(reviewed),
    }


def reviewed_records(s3: Any, data_bucket: str) -> list[abid.AbidRecord]:
    """The review loop's labels under raw/reviewed/ (ABID layout): every labelled photo whose image is there.
    An ``unusable`` answer leaves no label, so it never gets here."""
    found: list[abid.AbidRecord] = []
    photos: set[str] = set()
    metadata: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=data_bucket, Prefix=layout.REVIEWED_PREFIX):
        for item in page.get("Contents", []):
            key = item["Key"].removeprefix(layout.REVIEWED_PREFIX)
            if key.startswith(f"{abid.IMAGE_DIR}/") and key.endswith(".jpg"):
                photos.add(key[len(abid.IMAGE_DIR) + 1 : -4])
            elif key.startswith(f"{abid.METADATA_DIR}/") and key.endswith(".json"):
                metadata.append(key)
    for key in sorted(metadata):
        image_id = key[len(abid.METADATA_DIR) + 1 : -5]
        if not image_id.startswith(layout.REVIEWED_ID_PREFIX) or image_id not in photos:
            continue
        body = s3.get_object(Bucket=data_bucket, Key=layout.REVIEWED_PREFIX + key)["Body"].read()
        try:
            found.append(abid.parse_metadata(image_id, body))
        except abid.InvalidRecord as error:
            logger.warning("reviewed label skipped", extra={"key": key, "reason": str(error)})
    return found



@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    result = split(event, s3=aws.s3(), data_bucket=aws.data_bucket())
    logger.info("dataset split", extra={"runId": result["runId"], "counts": result["counts"]})
    for name, count in result["counts"].items():
        metrics.add_metric(name=f"Images{name.capitalize()}", unit=MetricUnit.Count, value=count)
    return result
