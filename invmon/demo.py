"""``invmon demo``: the pipeline's own step code, in the state machine's order, against local stand-ins.

No network, no credentials, nothing but the project: moto's server on 127.0.0.1 plays S3, DynamoDB and
EventBridge; the ingest, deploy-gate and count Lambdas run in this process with their real handlers; training
is ``python -m ml.train`` under SageMaker's environment variables; the endpoint is ``ml/inference.py`` served
by ``python -m ml.serve`` over SageMaker's ``/ping`` and ``/invocations``.

The model in service at the start is the shipped one (``models/abid-effnet-lite0``, trained on 9,636 photos):
the demo's own model, trained on a couple of hundred, goes through the deploy gate against it, and the uploads
are counted by whichever model the gate leaves in service. The uploads are sample photos that the shipped model
never saw in training (its split lists them), and a third of them come with a consignment that is off by two,
so the table shows the consignment check catching discrepancies as well as confirming counts.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from tqdm import tqdm

from infra.config import Settings, load_settings
from invmon.local import LocalEndpoint, MotoServer, patched_environ
from invmon.table import render_table
from invmon.training import health_lines, run_trainer
from ml import abid

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "abid-effnet-lite0"

SOURCE_BUCKET = "aft-vbi-pds"  # the public bucket's name, in the stand-in
DATA_BUCKET = "invmon-offline-data"
COUNTS_TABLE = "invmon-offline-counts"
IDEMPOTENCY_TABLE = "invmon-offline-idempotency"
ENDPOINT_NAME = "invmon-offline-counter"
STEPS = 8


@dataclass
class DemoResult:
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    evaluation: dict[str, Any]
    decision: dict[str, Any]
    workdir: Path


class Progress:
    """Numbered steps with their wall time, so a long run says where it is."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.index += 1
        print(f"[{self.index}/{self.total}] {title}", flush=True)
        began = time.monotonic()
        yield
        print(f"      done in {time.monotonic() - began:.1f} s", flush=True)


class FakeContext:
    """What Powertools reads from a Lambda context object."""

    def __init__(self, name: str) -> None:
        self.function_name = f"invmon-offline-{name}"
        self.memory_limit_in_mb = 512
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"
        self.aws_request_id = f"offline-{name}-{time.monotonic_ns()}"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


def hold_out(records: list[abid.AbidRecord], n: int, unseen: set[str] | frozenset[str] = frozenset()
             ) -> tuple[list[abid.AbidRecord], list[abid.AbidRecord]]:
    """Keep ``n`` photos, spread over the counts, out of the dataset: they are the demo's uploads. Photos in
    ``unseen`` (those the model in service never trained on) come first, so its counts are honest ones."""
    held: list[abid.AbidRecord] = []
    for pool in ([r for r in records if r.image_id in unseen], [r for r in records if r.image_id not in unseen]):
        ranked = sorted(pool, key=lambda r: abid.hash_rank(r.image_id, "invmon-demo-uploads"))
        by_count: dict[int, list[abid.AbidRecord]] = {}
        for record in ranked:
            by_count.setdefault(min(record.quantity, 6), []).append(record)
        while len(held) < n and any(by_count.values()):
            for quantity in sorted(by_count):
                if by_count[quantity] and len(held) < n:
                    held.append(by_count[quantity].pop(0))
    held_ids = {r.image_id for r in held}
    return [r for r in records if r.image_id not in held_ids], sorted(held)


def never_trained_on(model_dir: Path) -> set[str]:
    """The photos a shipped model's split kept out of its training (validation and test), where it lists them."""
    split = model_dir / "split.json"
    if not split.exists():
        return set()
    ids = json.loads(split.read_text()).get("ids", {})
    return {image_id for part in ids.values() for image_id in part}


def consignment(record: abid.AbidRecord, index: int) -> int:
    """What the consignment says the bin holds: the truth, except for every third upload, which is off by two
    (a discrepancy the check should catch)."""
    if index % 3 != 2:
        return record.quantity
    return record.quantity + 2 if record.quantity < 2 else record.quantity - 2


def seed_source(s3: Any, data: Path, records: list[abid.AbidRecord]) -> None:
    """The public bucket's layout, with the records' real photos and metadata."""
    s3.create_bucket(Bucket=SOURCE_BUCKET)
    uploads = [key for record in records for key in (record.image_key, record.metadata_key)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(
            tqdm(
                pool.map(
                    lambda key: s3.put_object(Bucket=SOURCE_BUCKET, Key=key, Body=(data / key).read_bytes()), uploads
                ),
                total=len(uploads),
                desc="seeding source bucket",
                unit="obj",
                leave=False,
                disable=None,
            )
        )


def create_resources(session: boto3.session.Session) -> None:
    s3 = session.client("s3")
    s3.create_bucket(Bucket=DATA_BUCKET)
    s3.put_bucket_versioning(Bucket=DATA_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    dynamodb = session.client("dynamodb")
    dynamodb.create_table(
        TableName=COUNTS_TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.create_table(
        TableName=IDEMPOTENCY_TABLE,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def run_ingest(session: boto3.session.Session, settings: Settings, execution: str) -> dict[str, Any]:
    """Select, copy (the Distributed Map's batches, run by a thread pool) and split, as the state machine does."""
    from lambdas.ingest import select, split, worker

    environ = {"DATA_BUCKET": DATA_BUCKET, "SOURCE_BUCKET": SOURCE_BUCKET}
    with patched_environ(environ):
        dataset = {"selector": "count-range", "minCount": 0, "maxCount": 1000}
        plan = select.handler({"input": {"dataset": dataset}, "execution": execution}, FakeContext("select"))
        s3 = session.client("s3")
        body = s3.get_object(Bucket=DATA_BUCKET, Key=plan["selectionKey"])["Body"].read().decode()
        ids = [line.strip() for line in body.splitlines()[1:] if line.strip()]
        batches = [ids[i : i + settings.ingest_batch_size] for i in range(0, len(ids), settings.ingest_batch_size)]
        batch_input = {key: plan[key] for key in ("sourceBucket", "minCount", "maxCount") if key in plan}

        def copy(batch: list[str]) -> dict[str, Any]:
            event = {"Items": [{"image_id": image_id} for image_id in batch], "BatchInput": batch_input}
            return {
                "Input": json.dumps(event),
                "Output": json.dumps(worker.handler(event, FakeContext("copy"))),
                "Status": "SUCCEEDED",
            }

        with ThreadPoolExecutor(max_workers=min(4, settings.ingest_max_concurrency)) as pool:
            executions = list(
                tqdm(pool.map(copy, batches), total=len(batches), desc="copy batches", leave=False, disable=None)
            )
        # Step Functions' ResultWriter layout: a manifest naming one results file per status.
        results_prefix = f"reports/ingest/{plan['runId']}/map/"
        s3.put_object(Bucket=DATA_BUCKET, Key=f"{results_prefix}SUCCEEDED_0.json", Body=json.dumps(executions))
        manifest = {
            "DestinationBucket": DATA_BUCKET,
            "MapRunArn": "offline",
            "ResultFiles": {"SUCCEEDED": [{"Key": f"{results_prefix}SUCCEEDED_0.json"}], "FAILED": [], "PENDING": []},
        }
        s3.put_object(Bucket=DATA_BUCKET, Key=f"{results_prefix}manifest.json", Body=json.dumps(manifest))
        copy_result = {
            "MapRunArn": "offline",
            "ResultWriterDetails": {"Bucket": DATA_BUCKET, "Key": f"{results_prefix}manifest.json"},
        }
        return split.handler({**plan, "copy": copy_result}, FakeContext("split"))


def download_channels(s3: Any, channels: dict[str, str], workdir: Path) -> dict[str, Path]:
    """What SageMaker does with a ManifestFile channel: the listed keys land in the channel folder."""
    local: dict[str, Path] = {}
    for name, uri in channels.items():
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        prefix = manifest[0]["prefix"].removeprefix("s3://")
        source_bucket, source_prefix = prefix.split("/", 1)
        folder = workdir / "channels" / name
        keys = manifest[1:]
        for relative in tqdm(keys, desc=f"channel {name}", unit="obj", leave=False, disable=None):
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(source_bucket, source_prefix + relative, str(target))
        local[name] = folder
    return local


def evaluate(model_dir: Path, data: Path, out_dir: Path) -> dict[str, Any]:
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml.evaluate",
            "--model-dir",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ml.evaluate failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def deploy_gate(metrics: dict[str, Any], in_service: dict[str, Any] | None, settings: Settings) -> dict[str, Any]:
    """The deploy gate's own decision. As in AWS, it compares the new job's validation metrics with those
    recorded for the model in service (``{"metrics": ...}``, the finish step's record), or deploys when there
    is none."""
    from lambdas.deploy import plan

    decision = plan.decide(metrics, in_service, margin=settings.deploy_min_improvement)
    return {"decision": decision.decision, "reasons": decision.reasons}


def model_in_service(model_dir: Path | None) -> dict[str, Any] | None:
    """The record the deploy gate reads for a model in service: its validation metrics (model-config.json)."""
    if model_dir is None:
        return None
    config = json.loads((model_dir / "model-config.json").read_text())
    return {"metrics": config.get("metrics", {}), "model": config.get("model_id") or str(model_dir)}


def corrupt_jpeg(photo: bytes) -> bytes:
    """A JPEG cut short: right magic bytes, undecodable body (an upload that broke off)."""
    return photo[: len(photo) // 3]


def count_uploads(
    session: boto3.session.Session, data: Path, held: list[abid.AbidRecord], settings: Settings
) -> list[dict[str, Any]]:
    """Upload the held-back photos (and a corrupt one) under the incoming prefix; count each through the queue
    event shape with the count Lambda's handler; read the records back from the table."""
    from lambdas.count import handler as count

    s3 = session.client("s3")
    uploads: list[tuple[str, bytes, int | None]] = [
        (
            f"{settings.incoming_prefix}bin {record.image_id}.jpg",
            (data / record.image_key).read_bytes(),
            consignment(record, index),
        )
        for index, record in enumerate(held)
    ]
    truth = {f"{settings.incoming_prefix}bin {record.image_id}.jpg": record.quantity for record in held}
    first = (data / held[0].image_key).read_bytes()
    uploads.append((f"{settings.incoming_prefix}broken-upload.jpg", corrupt_jpeg(first), 3))
    environ = {
        "COUNTS_TABLE": COUNTS_TABLE,
        "IDEMPOTENCY_TABLE": IDEMPOTENCY_TABLE,
        "ENDPOINT_NAME": ENDPOINT_NAME,
        "CONFIDENCE_THRESHOLD": str(settings.count_confidence_threshold),
        "MAX_IMAGE_BYTES": str(settings.count_max_image_bytes),
        "INCOMING_PREFIX": settings.incoming_prefix,
        "EVENT_BUS_NAME": "default",
        "POWERTOOLS_IDEMPOTENCY_DISABLED": "false",
    }
    rows = []
    with patched_environ(environ):
        count.reset()
        for key, body, expected in tqdm(uploads, desc="counting uploads", unit="photo", leave=False, disable=None):
            extra = {"Metadata": {"expected-count": str(expected)}} if expected is not None else {}
            put = s3.put_object(Bucket=DATA_BUCKET, Key=key, Body=body, **extra)
            event = {"Records": [sqs_record(s3_event(DATA_BUCKET, key, len(body), put.get("VersionId")))]}
            response = count.handler(event, FakeContext("count"))
            failures = response.get("batchItemFailures", [])
            record = read_record(session, key, put.get("VersionId"))
            rows.append(
                {
                    "photo": key.removeprefix(settings.incoming_prefix),
                    "truth": truth.get(key),
                    "expected": expected,
                    "record": record,
                    "retried": bool(failures),
                }
            )
    return rows


def s3_event(bucket: str, key: str, size: int, version_id: str | None) -> dict[str, Any]:
    """An S3 ObjectCreated notification as S3 sends it: the key URL-encoded."""
    from urllib.parse import quote_plus

    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"), "size": size, "sequencer": f"{time.monotonic_ns():X}"}
    if version_id:
        obj["versionId"] = version_id
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventName": "ObjectCreated:Put",
                "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": obj,
                },
            }
        ]
    }


def sqs_record(body: dict[str, Any]) -> dict[str, Any]:
    message_id = f"offline-{time.monotonic_ns()}"
    return {
        "messageId": message_id,
        "receiptHandle": message_id,
        "body": json.dumps(body),
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": str(int(time.time() * 1000)),
            "SenderId": "s3",
            "ApproximateFirstReceiveTimestamp": str(int(time.time() * 1000)),
        },
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:invmon-offline-count",
        "awsRegion": "us-east-1",
    }


def read_record(session: boto3.session.Session, key: str, version_id: str | None) -> dict[str, Any]:
    from lambdas.count.records import photo_pk, version_sk

    table = session.resource("dynamodb").Table(COUNTS_TABLE)
    return table.get_item(Key={"pk": photo_pk(key), "sk": version_sk(version_id)}, ConsistentRead=True).get("Item", {})


def default_epochs(n_train: int) -> int:
    """Enough passes for a small sample to learn something, few enough for minutes on two cores."""
    return 6 if n_train < 1000 else 3


def run(data: Path, workdir: Path, *, epochs: int | None, hold: int,
        in_service_dir: Path | None = SHIPPED_MODEL) -> DemoResult:
    settings = load_settings()
    progress = Progress(STEPS)
    records, rejected = abid.scan_folder(data)
    if not records:
        raise SystemExit(f"invmon demo: no ABID records in {data} (expected bin-images/ and metadata/)")
    for item in rejected:
        print(f"skipped {item.image_id} in {data}: {item.reason}")
    in_service = model_in_service(in_service_dir)
    dataset, held = hold_out(records, hold, never_trained_on(in_service_dir) if in_service_dir else set())
    execution = f"offline-{time.strftime('%Y%m%dT%H%M%S')}"
    with MotoServer() as moto:
        session = boto3.session.Session()
        with progress.step(
            f"Start local AWS stand-ins (moto on {moto.url}); seed '{SOURCE_BUCKET}' "
            f"with {len(dataset)} real ABID photos"
        ):
            create_resources(session)
            seed_source(session.client("s3"), data, dataset)
        with progress.step("Ingest: select, copy server-side into raw/, split into train/validation/test"):
            ingest = run_ingest(session, settings, execution)
            print(f"      {ingest['counts']}; report s3://{DATA_BUCKET}/{ingest['reportKey']}")
        with progress.step("Download the channels as a SageMaker training job does (ManifestFile)"):
            channels = download_channels(session.client("s3"), ingest["channels"], workdir)
        n_train = ingest["counts"]["train"]
        epochs = epochs or default_epochs(n_train)
        with progress.step(
            f"Train: python -m ml.train with SageMaker's variables, {epochs} epochs on {n_train} photos"
        ):
            training = run_trainer(
                channels={"train": channels["train"], "validation": channels["validation"]},
                workdir=workdir / "training",
                hyperparameters={"model-id": execution},
                epochs=epochs,
            )
            print("\n".join(f"      {line}" for line in health_lines(training.output_dir)))
        with progress.step("Evaluate on the held-out test split: report and plots"):
            evaluation = evaluate(training.model_dir, channels["test"], workdir / "evaluation")
            print(f"      plots and report in {workdir / 'evaluation'}")
        service_name = in_service["model"] if in_service else "none"
        with progress.step(f"Deploy gate: compare with the model in service ({service_name})"):
            decision = deploy_gate(training.metrics, in_service, settings)
            print(f"      {decision['decision']}: {'; '.join(decision['reasons'])}")
        serving_dir = training.model_dir if decision["decision"] == "deploy" or in_service_dir is None \
            else in_service_dir
        with contextlib.ExitStack() as serving:
            with progress.step(f"Start the local endpoint with the model in service ({serving_dir}): ml/inference.py "
                               "behind SageMaker's /ping and /invocations"):
                endpoint_log = serving.enter_context(open(workdir / "endpoint.log", "w"))
                serving.enter_context(LocalEndpoint(serving_dir, log=endpoint_log))
            with progress.step(
                f"Upload {len(held)} held-back photos (a third with a consignment off by two) and a corrupt one "
                f"under {settings.incoming_prefix}; count each with the count Lambda, read the table"
            ):
                rows = count_uploads(session, data, held, settings)
    return DemoResult(rows=rows, metrics=training.metrics, evaluation=evaluation, decision=decision, workdir=workdir)


def report(result: DemoResult) -> str:
    table_rows = []
    for row in result.rows:
        record = row["record"]
        confidence = record.get("confidence")
        status = record.get("status", "missing")
        if status == "rejected":
            reason = str(record.get("reason", ""))
            status += f": {reason[:57] + '...' if len(reason) > 60 else reason}"
        table_rows.append(
            [
                row["photo"],
                "" if row.get("truth") is None else row["truth"],
                "" if row["expected"] is None else row["expected"],
                record.get("count", ""),
                "" if confidence is None else f"{float(confidence):.2f}",
                status,
                record.get("decidedBy", ""),
            ]
        )
    headers = ["photo", "in the bin", "consignment", "counted", "confidence", "status", "decided by"]
    lines = [render_table(headers, table_rows), ""]
    for title, figures in (
        ("1-5 objects", result.evaluation.get("headline")),
        ("every class", result.evaluation.get("full_range")),
    ):
        if figures:
            lines.append(
                f"The demo's own model on its held-out test split, {title} ({int(figures['n'])} photos): "
                f"accuracy {figures['accuracy']:.3f}, RMSE {figures['rmse']:.3f}, within one {figures['within1']:.3f}"
            )
    return "\n".join(lines)


def run_demo(*, data: Path, epochs: int | None, workdir: Path | None, keep: bool, hold_out: int) -> int:
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="invmon-demo-")) if temporary else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = run(data, workdir, epochs=epochs, hold=hold_out)
        print()
        print(report(result))
        print(
            f"\ninvmon demo finished in {time.monotonic() - started:.0f} s"
            + (f"; everything is in {workdir}" if keep or not temporary else "")
        )
        return 0
    finally:
        if temporary and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
