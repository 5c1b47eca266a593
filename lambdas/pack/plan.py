"""Plan step: ``$.ingest`` -> the list of shards to make, written where the pack Map's ItemReader reads it.

Each split's records (``manifests/<run>/<split>.jsonl``, written by ingest's split step) are taken in image-id
order and cut into shards of ``PACK_PHOTOS_PER_SHARD`` photos (the last one holds the rest), so the same run
always gives the same shards with the same photos: a rerun of the packers can recognise what they already
wrote. The plan is a JSON array, one item per shard (``{"runId", "planId", "split", "index", "ids"}``), read by
the Distributed Map's S3 JSON ItemReader; each item is one packer's whole input. The shards go under
``shards/<planId>/``: see :func:`plan_id`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ConfigDict, Field

from lambdas.ingest import aws
from lambdas.pack import layout
from ml import abid

logger = Logger()
tracer = Tracer()
metrics = Metrics()

DEFAULT_PHOTOS_PER_SHARD = 1000
# A packer's whole result must fit what Step Functions carries as a state's input or output: 262,144 bytes of
# UTF-8 (Step Functions API reference, StateEnteredEventDetails and TaskSucceededEventDetails: "Maximum length of
# 262144"), even when every photo of its shard failed, each with its reason. tests/lambdas/test_pack.py checks
# that a shard of this many missing photos stays under it.
MAX_PHOTOS_PER_SHARD = 2000
# 64 bits of SHA-256: a shard prefix (shards/<plan id>/) shared by two different plans is out of reach.
PLAN_ID_CHARS = 16


class IngestResult(BaseModel):
    """``$.ingest`` as ingest's split step leaves it; only what the plan needs is read."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    run_id: str = Field(alias="runId", min_length=1)
    records_key: str = Field(alias="recordsKey", pattern=r"^manifests/.+/records\.jsonl$")
    channels: dict[str, str]


def photos_per_shard(environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    value = int(env.get("PACK_PHOTOS_PER_SHARD", str(DEFAULT_PHOTOS_PER_SHARD)))
    if not 1 <= value <= MAX_PHOTOS_PER_SHARD:
        raise ValueError(f"PACK_PHOTOS_PER_SHARD must be between 1 and {MAX_PHOTOS_PER_SHARD}, got {value}")
    return value


def cut(run: str, split: str, ids: list[str], size: int) -> list[dict[str, Any]]:
    """The shards of one split: ids sorted, ``size`` per shard, numbered from 0."""
    ordered = sorted(set(ids))
    return [
        {"runId": run, "split": split, "index": index, "ids": ordered[start:start + size]}
        for index, start in enumerate(range(0, len(ordered), size))
    ]


def plan_id(items: list[dict[str, Any]]) -> str:
    """What the plan's shards hold (split, index and the ids of each), as a digest: the shards' prefix.

    Two runs whose plans are identical write the same shards under the same prefix, so a rerun reuses them (the
    packer leaves a shard alone when its bytes are unchanged); two plans that differ never share a prefix, so a
    training job that reads ``shards/<plan id>/<split>/`` reads the shards of its own plan and no others."""
    canonical = json.dumps([[item["split"], item["index"], item["ids"]] for item in items], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:PLAN_ID_CHARS]


def plan(event: IngestResult, *, s3: Any, data_bucket: str, size: int) -> dict[str, Any]:
    """Read each split's records, write the plan; return what the stage's next steps need at ``$.pack``."""
    items: list[dict[str, Any]] = []
    photos: dict[str, int] = {}
    shards: dict[str, int] = {}
    for split in abid.SPLITS:
        if split not in event.channels:
            continue
        key = layout.split_records_key(event.records_key, split)
        records = abid.parse_records_jsonl(s3.get_object(Bucket=data_bucket, Key=key)["Body"].read().decode())
        part = cut(event.run_id, split, [record.image_id for record in records], size)
        items += part
        photos[split] = sum(len(item["ids"]) for item in part)
        shards[split] = len(part)
    identity = plan_id(items)
    items = [{**item, "planId": identity} for item in items]
    key = layout.plan_key(event.run_id)
    s3.put_object(Bucket=data_bucket, Key=key, Body=json.dumps(items, separators=(",", ":")).encode(),
                  ContentType="application/json")
    return {"runId": event.run_id, "planId": identity, "planKey": key, "photosPerShard": size, "shards": shards,
            "photos": photos}


@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
@event_parser(model=IngestResult)
def handler(event: IngestResult, context: LambdaContext) -> dict[str, Any]:
    result = plan(event, s3=aws.s3(), data_bucket=aws.data_bucket(), size=photos_per_shard())
    logger.info("pack planned", extra={k: result[k] for k in ("runId", "planKey", "shards", "photos")})
    metrics.add_metric(name="ShardsPlanned", unit=MetricUnit.Count, value=sum(result["shards"].values()))
    return result
