"""The count Lambda under endpoint faults: records per second, and the share of photos lost (must be 0), when
10 % of endpoint calls stall.

Real parts, local stand-ins: the count handler runs in-process with its real botocore ``sagemaker-runtime``
client (the limits infra sets, scaled down), against a local HTTP stand-in for SageMaker Runtime that holds a
random tenth of the requests until the client gives up; S3, DynamoDB and EventBridge are moto in-process. The
queue is modelled the way SQS and Lambda's event source treat it: batches of 10, every message listed as a
batch item failure (or the whole batch, when an invocation runs past the function timeout, as Lambda's
timeout does) is delivered again, and a message received ``MAX_RECEIVE_COUNT`` times goes to the dead-letter
queue: lost, for the bin check. The visibility timeout's wait is not modelled (a retry is taken at once), so
records/s is processing speed, not end-to-end latency.

``python -m bench.countfaults [--quick]`` runs it alone.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench import common
from invmon.local import patched_environ

# The count function's bucket and tables, as infra/storage.py and infra/count.py define their keys.
DATA_BUCKET = "invmon-bench-data"
COUNTS_TABLE = "invmon-bench-counts"
IDEMPOTENCY_TABLE = "invmon-bench-idempotency"

# The production limits (infra/count.py: 3 s connect, 20 s read, 2 attempts, 5 s per record besides the call,
# a 120 s function) scaled down so that a run takes seconds; the ratios that matter are kept: a record's
# worst case fits twice in the function timeout.
SCALED = {"ENDPOINT_CONNECT_TIMEOUT": "0.5", "ENDPOINT_READ_TIMEOUT": "0.4", "ENDPOINT_MAX_ATTEMPTS": "2",
          "RECORD_OVERHEAD_SECONDS": "0.3"}
FUNCTION_TIMEOUT_SECONDS = 6.0
BATCH_SIZE = 10
MAX_RECEIVE_COUNT = 5  # infra/count.py
STALL_SECONDS = 5.0  # how long a stalled request is held (the client gives up long before)
MODEL = "bench-stand-in"


class _Stalls:
    """Which endpoint calls stall: a seeded tenth of them."""

    def __init__(self, share: float, seed: int) -> None:
        self.share = share
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = 0
        self.stalled = 0
        self.release = threading.Event()

    def next_stalls(self) -> bool:
        with self.lock:
            self.calls += 1
            stall = self.random.random() < self.share
            self.stalled += stall
            return stall


def _stand_in(stalls: _Stalls) -> ThreadingHTTPServer:
    answer = json.dumps({"count": 2, "confidence": 0.9, "classes": list(range(7)),
                         "probabilities": [0.01, 0.02, 0.9, 0.03, 0.02, 0.01, 0.01], "model": MODEL,
                         "overflow_class": 6}).encode()

    class Runtime(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if stalls.next_stalls():
                stalls.release.wait(STALL_SECONDS)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            except OSError:
                pass  # the client gave up on a stalled request

    server = ThreadingHTTPServer(("127.0.0.1", 0), Runtime)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Context:
    """The Lambda context's clock: the remaining time of an invocation with the scaled function timeout."""

    function_name = "invmon-bench-count"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:invmon-bench-count"
    aws_request_id = "bench"

    def __init__(self) -> None:
        self.deadline = time.monotonic() + FUNCTION_TIMEOUT_SECONDS

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


@dataclass
class _Message:
    message_id: str
    body: str
    receives: int = 0


def _sqs_event(batch: list[_Message]) -> dict[str, Any]:
    return {"Records": [{"messageId": m.message_id, "receiptHandle": m.message_id, "body": m.body,
                         "attributes": {"ApproximateReceiveCount": str(m.receives), "SentTimestamp": "0",
                                        "SenderId": "S3", "ApproximateFirstReceiveTimestamp": "0"},
                         "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
                         "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:uploads", "awsRegion": "us-east-1"}
                        for m in batch]}


def _setup_aws(photo: bytes, records: int) -> list[_Message]:
    """The count function's versioned bucket and its two tables, and one upload per record."""
    import boto3

    from bench.coldstart import _s3_message

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=DATA_BUCKET)
    s3.put_bucket_versioning(Bucket=DATA_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    dynamodb = boto3.client("dynamodb")
    dynamodb.create_table(
        TableName=COUNTS_TABLE, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"} for key in ("pk", "sk")])
    dynamodb.create_table(
        TableName=IDEMPOTENCY_TABLE, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
    messages = []
    for index in range(records):
        key = f"incoming/{index:05d}.jpg"
        version = s3.put_object(Bucket=DATA_BUCKET, Key=key, Body=photo).get("VersionId")
        body = json.loads(_s3_message(DATA_BUCKET, key, len(photo)))
        body["Records"][0]["s3"]["object"]["versionId"] = version
        messages.append(_Message(f"m{index}", json.dumps(body)))
    return messages


def run(ctx: Any = None, *, records: int | None = None, stall_share: float = 0.1, seed: int = 15) -> dict[str, Any]:
    quick = bool(getattr(ctx, "quick", False))
    records = records or (30 if quick else 300)
    photo = sorted((common.SAMPLE_DIR / "bin-images").glob("*.jpg"))[0].read_bytes()
    stalls = _Stalls(stall_share, seed)
    server = _stand_in(stalls)
    environment = SCALED | {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_SESSION_TOKEN": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": f"http://127.0.0.1:{server.server_address[1]}",
        "COUNTS_TABLE": COUNTS_TABLE, "IDEMPOTENCY_TABLE": IDEMPOTENCY_TABLE, "ENDPOINT_NAME": "bench-counter",
        "CONFIDENCE_THRESHOLD": "model", "MAX_IMAGE_BYTES": "4000000", "INCOMING_PREFIX": "incoming/",
        "POWERTOOLS_SERVICE_NAME": "count", "POWERTOOLS_METRICS_NAMESPACE": "invmon-bench",
        "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "CRITICAL", "POWERTOOLS_METRICS_DISABLED": "true",
    }
    try:
        with patched_environ(environment):
            from moto import mock_aws

            with mock_aws():
                messages = _setup_aws(photo, records)
                from lambdas.count import handler

                handler.reset()
                result = _drain(handler, deque(messages))
                import boto3

                stored = len(common.count_records(boto3.resource("dynamodb").Table(COUNTS_TABLE)))
                handler.reset()
    finally:
        stalls.release.set()
        server.shutdown()
        server.server_close()
    lost = result.pop("lost")
    drain = result.pop("drain_s")
    return result | {
        "records": records,
        "drain_s": round(drain, 2),
        "records_per_s": round(stored / drain, 1),
        "stall_share": stall_share,
        "endpoint_calls": stalls.calls,
        "stalled_calls": stalls.stalled,
        "stored_records": stored,
        "lost": lost,
        "lost_share": round(lost / records, 4),
        "settings": {**{k.lower(): float(v) for k, v in SCALED.items()},
                     "function_timeout_s": FUNCTION_TIMEOUT_SECONDS, "batch_size": BATCH_SIZE,
                     "max_receive_count": MAX_RECEIVE_COUNT},
        "stand_in": "count handler in-process, real botocore client -> local HTTP stand-in for SageMaker Runtime "
                    f"({stall_share:.0%} of calls held {STALL_SECONDS:.0f} s), moto S3/DynamoDB; limits scaled "
                    "down from infra/count.py",
    }


def _drain(handler: Any, queue: deque[_Message]) -> dict[str, Any]:
    """Deliver the queue to the handler the way Lambda's SQS event source does, until it is empty."""
    invocations = timeouts = deliveries = 0
    lost = 0
    longest = 0.0
    started = time.perf_counter()
    while queue:
        batch = [queue.popleft() for _ in range(min(BATCH_SIZE, len(queue)))]
        for message in batch:
            message.receives += 1
        deliveries += len(batch)
        context = _Context()
        began = time.monotonic()
        response = handler.handler(_sqs_event(batch), context)
        took = time.monotonic() - began
        longest = max(longest, took)
        invocations += 1
        if took > FUNCTION_TIMEOUT_SECONDS:
            timeouts += 1  # Lambda would have stopped it: every message of the batch comes back
            failed = {m.message_id for m in batch}
        else:
            failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        for message in batch:
            if message.message_id not in failed:
                continue
            if message.receives >= MAX_RECEIVE_COUNT:
                lost += 1  # the redrive policy moves it to the dead-letter queue
            else:
                queue.append(message)
    return {"drain_s": time.perf_counter() - started, "invocations": invocations,
            "invocations_past_timeout": timeouts, "deliveries": deliveries, "longest_invocation_s": round(longest, 2),
            "lost": lost}


def main(argv: list[str]) -> int:
    result = run(common.Context(quick="--quick" in argv))
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
