"""The S3 client the ingest and pack functions share: one per process, created on first use."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import boto3
from botocore.config import Config

# Copy workers run many requests at once; the pool must be at least as large as the worker's thread count,
# and S3's SlowDown answers are retried with backoff instead of failing an item.
_CONFIG = Config(
    max_pool_connections=64,
    retries={"mode": "adaptive", "max_attempts": 10},
    connect_timeout=5,
    read_timeout=30,
)


@functools.cache
def s3():
    # A local stand-in (the benchmark's moto server) is reached through botocore's own AWS_ENDPOINT_URL_S3.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", region_name=region, config=_CONFIG)


def data_bucket() -> str:
    try:
        return os.environ["DATA_BUCKET"]
    except KeyError:
        raise RuntimeError("DATA_BUCKET is not set: the ingest and pack functions need the data bucket's "
                           "name") from None


def put_json(s3: Any, bucket: str, key: str, document: Any) -> None:
    """A report or manifest, indented so a person can read it in the console."""
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(document, indent=1).encode(),
                  ContentType="application/json")
