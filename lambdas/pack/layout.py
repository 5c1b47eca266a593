"""Where the pack stage reads and writes in the data bucket, in one place for its three functions and
infra/pack.py (whose grants are written against these prefixes)."""

from __future__ import annotations

from ml import abid, shards

RAW_PREFIX = "raw/"
# The review loop's labels (lambdas/review/store.py writes them; kept equal by tests/lambdas/test_review.py).
REVIEWED_PREFIX = "raw/reviewed/"
REVIEWED_ID_PREFIX = "reviewed-"
MANIFEST_PREFIX = "manifests/"
SHARD_PREFIX = "shards/"
REPORT_PREFIX = "reports/pack/"
# The plan (the Map's item list) lives under the stage's report prefix: the state machine's ItemReader then
# reads reports/pack/plans/ and never the shards themselves.
PLAN_PREFIX = f"{REPORT_PREFIX}plans/"
MAP_RESULTS_PREFIX = f"{REPORT_PREFIX}map-results"


def plan_key(run: str) -> str:
    return f"{PLAN_PREFIX}{run}.json"


def report_key(run: str) -> str:
    return f"{REPORT_PREFIX}{run}.json"


def split_records_key(records_key: str, split: str) -> str:
    """``manifests/<run>/<split>.jsonl``, beside the run's ``records.jsonl`` (lambdas/ingest/split.py)."""
    return f"{records_key.rsplit('/', 1)[0]}/{split}.jsonl"


def channel_prefix(plan_id: str, split: str) -> str:
    """A split's shards: the S3Prefix channel training reads (ends in '/', so no other split shares it). Keyed by
    the plan's digest (lambdas/pack/plan.plan_id), not the run: the prefix holds exactly one plan's shards."""
    return f"{SHARD_PREFIX}{plan_id}/{split}/"


def shard_key(plan_id: str, split: str, index: int) -> str:
    return channel_prefix(plan_id, split) + shards.shard_name(split, index)


def raw_keys(image_id: str) -> tuple[str, str]:
    """(photo, metadata) of one image under raw/, as the ingest copy workers wrote them; a reviewed photo's
    (an id the review loop gave it, lambdas/review/store.py) under raw/reviewed/ in the same layout."""
    record = abid.AbidRecord(image_id, 0, 0)
    prefix = REVIEWED_PREFIX if image_id.startswith(REVIEWED_ID_PREFIX) else RAW_PREFIX
    return prefix + record.image_key, prefix + record.metadata_key
