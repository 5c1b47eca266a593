"""Finish step: the pack Map's results -> ``reports/pack/<run>.json`` and ``$.pack``, the channels training reads.

Input: ``$.pack`` as the plan step left it, with the Map's output at ``packed`` (or its error at ``packError``
when the Map failed as a whole). Every planned photo is accounted for: packed, or failed with a reason (the
packer's own, the error of a shard whose packer kept failing, or "no result" for a shard the Map never
reported). Above ``INGEST_TOLERATED_FAILURE_PERCENT`` of the planned photos failed, the report is written and
the stage fails; otherwise it returns::

    {"runId", "channels": {"train": "s3://<bucket>/shards/<plan id>/train/", ...}, "shards": {...}, "photos": {...},
     "reviewedUsed", "reportKey"}

``reviewedUsed`` is how many of the review loop's labelled photos are in the train shards: the ones ingest put in
the train split (lambdas/ingest/split.py) less those that could not be packed. The training report carries it.

A split with no packed photo gets no channel (an empty S3Prefix channel would fail the training job); train and
validation must have one.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ConfigDict, Field

from lambdas import map_results
from lambdas.ingest import aws
from lambdas.pack import layout
from ml import abid

logger = Logger()
tracer = Tracer()
metrics = Metrics()

REQUIRED_SPLITS = ("train", "validation")


class TooManyFailures(RuntimeError):
    """More photos failed to pack than ingestToleratedFailurePercent allows; the report is written first."""


class EmptyChannel(RuntimeError):
    """Train or validation has no packed photo, so there is nothing to train or validate on."""


class PackMapFailed(RuntimeError):
    """The pack Map failed as a whole; the report lists every planned photo with the Map's error."""


class FinishEvent(BaseModel):
    """``$.pack`` after the Map: the plan step's output plus the Map's output or error."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    run_id: str = Field(alias="runId", min_length=1)
    plan_id: str = Field(alias="planId", pattern=r"^[0-9a-f]{16}$")
    plan_key: str = Field(alias="planKey", min_length=1)
    packed: dict[str, Any] | None = None
    pack_error: dict[str, Any] | None = Field(default=None, alias="packError")


def _shard_name(item: dict[str, Any]) -> str:
    return f"{item.get('split')}-{int(item.get('index', -1)):06d}"


def gather(plan: list[dict[str, Any]], children: list[map_results.Child]) -> dict[str, Any]:
    """Every planned photo as packed or failed, with per-split totals. Pure: the report is built from this."""
    results: dict[tuple[str, int], dict[str, Any]] = {}
    failed_children: dict[tuple[str, int], str] = {}
    for child in children:
        output, task = child.output, child.input if isinstance(child.input, dict) else {}
        if child.listed == "SUCCEEDED" and isinstance(output, dict) and "failures" in output:
            results[(output["split"], int(output["index"]))] = output
        elif task.get("split") is not None:
            failed_children[(task["split"], int(task.get("index", -1)))] = child.failure_reason(
                f"packing shard {_shard_name(task)}")
    photos: dict[str, int] = defaultdict(int)
    reviewed: dict[str, int] = defaultdict(int)
    shards: dict[str, int] = defaultdict(int)
    size: dict[str, int] = defaultdict(int)
    written = unchanged = 0
    failures: list[dict[str, str]] = []
    for item in plan:
        split, index = item["split"], int(item["index"])
        result = results.get((split, index))
        if result is None:
            reason = failed_children.get((split, index),
                                         f"packing shard {_shard_name(item)} returned no result")
            failures += [{"imageId": image_id, "split": split, "reason": reason} for image_id in item["ids"]]
            continue
        failures += [{**failure, "split": split} for failure in result["failures"]]
        if result.get("key"):
            photos[split] += int(result["photos"])
            failed_here = {failure["imageId"] for failure in result["failures"]}
            reviewed[split] += sum(image_id.startswith(layout.REVIEWED_ID_PREFIX) and image_id not in failed_here
                                   for image_id in item["ids"])
            shards[split] += 1
            size[split] += int(result["bytes"])
            written += bool(result.get("written"))
            unchanged += not result.get("written")
    return {"photos": dict(photos), "reviewed": dict(reviewed), "shards": dict(shards), "bytes": dict(size),
            "written": written, "unchanged": unchanged,
            "failures": sorted(failures, key=lambda f: (f["split"], f["imageId"]))}



def finish(event: FinishEvent, *, s3: Any, data_bucket: str, tolerated_percent: float) -> dict[str, Any]:
    run = event.run_id
    plan = json.loads(s3.get_object(Bucket=data_bucket, Key=event.plan_key)["Body"].read())
    planned: dict[str, int] = defaultdict(int)
    for item in plan:
        planned[item["split"]] += len(item["ids"])
    total = sum(planned.values())
    report_key = layout.report_key(run)
    details = (event.packed or {}).get("ResultWriterDetails") or {}
    if event.pack_error and not details.get("Key"):
        error = event.pack_error
        reason = f"pack map failed: {error.get('Error') or 'unknown error'}: {error.get('Cause') or 'no cause given'}"
        aws.put_json(s3, data_bucket, report_key, {
            "runId": run, "planKey": event.plan_key, "planned": dict(planned), "packed": 0, "failed": total,
            "packError": error, "failures": [{"imageId": image_id, "split": item["split"], "reason": reason}
                                             for item in plan for image_id in item["ids"]],
        })
        raise PackMapFailed(f"{reason[:600]}; report: s3://{data_bucket}/{report_key}")
    if not details.get("Key"):
        raise ValueError("the pack map's ResultWriterDetails are missing from the finish step's input")
    children = list(map_results.read_children(s3, details.get("Bucket") or data_bucket, details["Key"]))
    gathered = gather(plan, children)
    failed = len(gathered["failures"])
    failed_percent = 100.0 * failed / total if total else 0.0
    report = {
        "runId": run,
        "planKey": event.plan_key,
        "planId": event.plan_id,
        "planned": dict(planned),
        "photos": gathered["photos"],
        "reviewed": gathered["reviewed"],
        "shards": gathered["shards"],
        "bytes": gathered["bytes"],
        "shardsWritten": gathered["written"],
        "shardsUnchanged": gathered["unchanged"],
        "failed": failed,
        "failedPercent": round(failed_percent, 3),
        "toleratedFailurePercent": tolerated_percent,
        "mapRunArn": (event.packed or {}).get("MapRunArn"),
        "mapResults": f"s3://{details.get('Bucket') or data_bucket}/{details['Key']}",
        "failures": gathered["failures"],
    }
    aws.put_json(s3, data_bucket, report_key, report)
    where = f"every failure and its reason: s3://{data_bucket}/{report_key}"
    if failed_percent > tolerated_percent:
        raise TooManyFailures(f"{failed} of {total} photos could not be packed ({failed_percent:.1f} %), above "
                              f"the tolerated {tolerated_percent:g} %; {where}")
    empty = [split for split in REQUIRED_SPLITS if not gathered["photos"].get(split)]
    if empty:
        raise EmptyChannel(f"no photo of {' or '.join(empty)} was packed, so training has nothing to "
                           f"{'train' if 'train' in empty else 'validate'} on; {where}")
    return {
        "runId": run,
        "channels": {split: f"s3://{data_bucket}/{layout.channel_prefix(event.plan_id, split)}"
                     for split in abid.SPLITS if gathered["photos"].get(split)},
        "shards": gathered["shards"],
        "photos": gathered["photos"],
        "reviewedUsed": gathered["reviewed"].get("train", 0),
        "reportKey": report_key,
    }


@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
@event_parser(model=FinishEvent)
def handler(event: FinishEvent, context: LambdaContext) -> dict[str, Any]:
    result = finish(event, s3=aws.s3(), data_bucket=aws.data_bucket(),
                    tolerated_percent=float(os.environ.get("INGEST_TOLERATED_FAILURE_PERCENT", "5")))
    logger.info("pack finished", extra={k: result[k] for k in ("runId", "shards", "photos", "reportKey")})
    metrics.add_metric(name="ShardsPacked", unit=MetricUnit.Count, value=sum(result["shards"].values()))
    return result
