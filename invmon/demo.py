"""``invmon demo``: the synthesized pipeline state machine, executed offline, then uploads counted.

No network, no credentials, nothing but the project. The app is synthesized (``cdk synth`` in this process);
moto's server on 127.0.0.1 plays S3, DynamoDB, SageMaker's control plane and EventBridge, and its Step Functions
interpreter executes the pipeline's own definition (invmon/execution.py, with the workarounds for where moto
differs from AWS). Its Lambda tasks run the real handlers in this process with each function's template
environment; its ``createTrainingJob.sync`` task runs ``python -m ml.train`` from the task's actual request
(invmon/training.py ``LocalTrainingJobs``); each endpoint its deploy stage creates is served by ``python -m
ml.serve`` over SageMaker's ``/ping`` and ``/invocations`` (invmon/local.py ``LocalEndpoints``). The demo
prints each state as the execution's history reports it; it never orders the pipeline's steps itself.

The model in service at the start is the shipped one (``models/abid-effnet-lite0``, trained on 9,636 photos),
put there by the pipeline's own deploy stage: the demo's model, trained on a couple of hundred photos, goes
through the deploy gate against it, and the uploads are counted by whichever model the gate leaves in service.
The uploads are sample photos that the shipped model never saw in training (its split lists them), and a third
of them come with a consignment that is off by two, so the table shows the consignment check catching
discrepancies as well as confirming counts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
from tqdm import tqdm

from infra.config import Settings, load_settings
from invmon import execution, review
from invmon.aws import failure_reason
from invmon.local import OFFLINE_ENV, ChildProcess, LocalEndpoints, MotoServer, patched_environ, stop_all_children
from invmon.table import render_table
from ml import abid

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "models" / "abid-effnet-lite0"

SOURCE_BUCKET = "aft-vbi-pds"  # the public bucket's name (the ingest functions' SOURCE_BUCKET), in moto
PIPELINE = "PipelineStateMachine"  # the pipeline's logical id prefix in the template
STEPS = 7
# The handlers' structured logs would drown the progress output (errors still show), and the CDK's Node banner
# says nothing about the demo.
QUIET = {"POWERTOOLS_LOG_LEVEL": "ERROR", "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20"}
SHOWN_METRICS = ("valid_accuracy", "valid_rmse", "valid_within1", "train_images")
DEMO_BATCH_SIZE = 16
# A generous bound on one execution; the demo as a whole takes about two minutes on two cores.
EXECUTION_TIMEOUT = 1800.0


@dataclass
class DemoResult:
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    evaluation: dict[str, Any]
    decision: dict[str, Any]
    workdir: Path
    in_service: str = ""  # the model the deploy gate left in service: the one that counted the uploads


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


def publish_file_assets(synthesized: execution.Synthesized) -> list[str]:
    """What ``cdk deploy`` publishes before the stack exists: each file asset (the trainer's source tarball,
    the pretrained weights) to the bootstrap bucket under the key the template names. Directory assets (the
    Lambda code) are not needed: the handlers run in-process from the checkout."""
    manifest = next(synthesized.assembly.glob("*.assets.json"))
    resolver = execution.Resolver(synthesized.template)
    s3 = boto3.client("s3")
    published = []
    for asset in json.loads(manifest.read_text())["files"].values():
        if asset["source"].get("packaging") != "file" or asset["source"]["path"].endswith(".template.json"):
            continue
        for destination in asset["destinations"].values():
            bucket = resolver({"Fn::Sub": destination["bucketName"]})
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=bucket)
            s3.upload_file(str(synthesized.assembly / asset["source"]["path"]), bucket, destination["objectKey"])
            published.append(f"s3://{bucket}/{destination['objectKey']}")
    return published


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


def model_in_service(model_dir: Path | None) -> dict[str, Any] | None:
    """The record the deploy gate reads for a model in service: its validation metrics (model-config.json)."""
    if model_dir is None:
        return None
    config = json.loads((model_dir / "model-config.json").read_text())
    return {"metrics": config.get("metrics", {}), "model": config.get("model_id") or str(model_dir)}


def corrupt_jpeg(photo: bytes) -> bytes:
    """A JPEG cut short: right magic bytes, undecodable body (an upload that broke off)."""
    return photo[: len(photo) // 3]


def count_uploads(lambdas: execution.InProcessLambda, synthesized: execution.Synthesized, data: Path,
                  held: list[abid.AbidRecord], settings: Settings) -> list[dict[str, Any]]:
    """Upload the held-back photos (and a corrupt one) under the incoming prefix; count each with the stack's
    count function (its handler, its template environment) through the queue's event shape; read the records
    back from the table."""
    from lambdas.count import handler as count

    bucket = execution.physical_name(synthesized.logical_id("AWS::S3::Bucket", "StorageData"))
    function = execution.physical_name(synthesized.logical_id("AWS::Lambda::Function", "CountFunction"))
    table = execution.physical_name(synthesized.logical_id("AWS::DynamoDB::Table", "CountCounts"))
    s3 = boto3.client("s3")
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
    rows = []
    count.reset()  # its clients must see the endpoint the pipeline deployed
    for key, body, expected in tqdm(uploads, desc="counting uploads", unit="photo", leave=False, disable=None):
        extra = {"Metadata": {"expected-count": str(expected)}} if expected is not None else {}
        put = s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        event = {"Records": [sqs_record(s3_event(bucket, key, len(body), put.get("VersionId")))]}
        response = json.loads(lambdas.invoke(FunctionName=function, Payload=json.dumps(event))["Payload"].read())
        failures = response.get("batchItemFailures", []) if isinstance(response, dict) else []
        record = read_record(table, key, put.get("VersionId"))
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


def read_record(table: str, key: str, version_id: str | None) -> dict[str, Any]:
    from lambdas.count.records import photo_pk, version_sk

    return boto3.resource("dynamodb").Table(table).get_item(
        Key={"pk": photo_pk(key), "sk": version_sk(version_id)}, ConsistentRead=True).get("Item", {})


def default_epochs(n_photos: int) -> int:
    """Enough passes for a small sample to learn something, few enough for minutes on two cores."""
    return 6 if n_photos < 1400 else 3


class HistoryPrinter:
    """Prints an execution's history as it grows: each state as it is entered (time, seconds since the start,
    state type, name), how long each took as it exits (``└ name: 85.2 s``), each failure with its error and cause,
    and how the execution ended."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        # Bound to the real stdout now: a Lambda running in another thread redirects sys.stdout meanwhile.
        self.say = say or functools.partial(print, file=sys.stdout, flush=True)
        self.started: datetime | None = None
        self.entered: dict[str, datetime] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind, when = event["type"], event["timestamp"]
        self.started = self.started or when
        stamp = f"      {when:%H:%M:%S} +{(when - self.started).total_seconds():6.1f} s  "
        if kind.endswith("StateEntered"):
            self.entered[event["stateEnteredEventDetails"]["name"]] = when
            self.say(f"{stamp}{kind.removesuffix('StateEntered'):<8} {event['stateEnteredEventDetails']['name']}")
        elif kind.endswith("StateExited"):
            name = event["stateExitedEventDetails"]["name"]
            if name in self.entered:
                self.say(f"{stamp}└ {name}: {(when - self.entered.pop(name)).total_seconds():.1f} s")
        elif kind.endswith(("Failed", "TimedOut", "Aborted")):
            details = next((v for k, v in event.items() if k.endswith("EventDetails")), {})
            cause = failure_reason(str(details.get("cause", "")))
            self.say(f"{stamp}{kind}: {details.get('error', '')}" + (f": {cause[:400]}" if cause else ""))
        elif kind == "ExecutionSucceeded":
            self.say(f"{stamp}{kind}")


class PipelineFailed(RuntimeError):
    pass


class DemoArgumentError(ValueError):
    """An argument the demo cannot run with, found before any work (the CLI exits 2 with the message)."""


# Fewer photos than this left after the hold-out cannot be split into training, validation and test shards.
MIN_TRAINING_PHOTOS = 20


def check_hold_out(records: list[abid.AbidRecord], hold: int, data: Path) -> None:
    if hold < 1:
        raise DemoArgumentError(f"--hold-out: expected at least 1 photo to count, got {hold}")
    if len(records) - hold < MIN_TRAINING_PHOTOS:
        raise DemoArgumentError(
            f"--hold-out: {data} holds {len(records)} photos and training needs {MIN_TRAINING_PHOTOS}, so at most "
            f"{max(len(records) - MIN_TRAINING_PHOTOS, 0)} can be held out, got {hold}")


def follow(sfn: Any, definition: dict[str, Any], execution_input: dict[str, Any], name: str) -> execution.Execution:
    """Runs one execution to its end, printing its history as it goes; raises unless it succeeded as AWS would
    have it (moto's catch-all also catches States.Runtime, which AWS never does)."""
    arn = execution.start(sfn, definition, execution_input, name=name)
    result = execution.wait(sfn, arn, timeout=EXECUTION_TIMEOUT, poll=0.2, on_event=HistoryPrinter())
    if result.runtime_errors():
        raise PipelineFailed(f"execution {name} hit a States.Runtime error, which no Catch catches on AWS: "
                             f"{json.dumps(result.runtime_errors()[0], default=str)[:1000]}")
    if result.status != "SUCCEEDED":
        # The reason a person needs, not the whole cause (a Lambda's stack trace, a job description's JSON).
        raise PipelineFailed(f"execution {name} {result.status}: {result.error}: "
                             f"{failure_reason(str(result.cause or ''))[:1000]}")
    return result


def synthesize(outdir: Path) -> execution.Synthesized:
    """``execution.synthesize`` in a child process, so that the CDK's Node process (jsii) ends with it instead
    of staying beside the demo for the whole run."""
    code = ("import sys; from pathlib import Path; from invmon.execution import synthesize; "
            "synthesize(Path(sys.argv[1]))")
    outdir.mkdir(parents=True, exist_ok=True)
    log = outdir.parent / "synth.log"
    with open(log, "w") as output, ChildProcess([sys.executable, "-c", code, str(outdir)], cwd=ROOT,
                                                env=os.environ, stdout=output) as child:
        status = child.process.wait()
    if status != 0:
        raise RuntimeError(f"cdk synth failed (status {status}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    return execution.load_synthesized(outdir)


def publish_model(model_dir: Path, bucket: str, job_name: str, workdir: Path) -> str:
    """A model folder as a training job leaves it: <bucket>/models/<job>/output/model.tar.gz."""
    from invmon.training import tarball

    key = f"models/{job_name}/output/model.tar.gz"
    boto3.client("s3").upload_file(str(tarball(model_dir, workdir / f"{job_name}.tar.gz")), bucket, key)
    return f"s3://{bucket}/{key}"


def run(data: Path, workdir: Path, *, epochs: int | None, hold: int,
        in_service_dir: Path | None = SHIPPED_MODEL) -> DemoResult:
    from invmon.training import LocalTrainingJobs

    settings = load_settings()
    records, rejected = abid.scan_folder(data)
    if not records:
        raise DemoArgumentError(f"--data: no ABID records in {data} (expected bin-images/ and metadata/)")
    check_hold_out(records, hold, data)
    for item in rejected:
        print(f"skipped {item.image_id} in {data}: {item.reason}")
    in_service = model_in_service(in_service_dir)
    dataset, held = hold_out(records, hold, never_trained_on(in_service_dir) if in_service_dir else set())
    epochs = epochs or default_epochs(len(dataset))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    progress = Progress(STEPS if in_service_dir else STEPS - 1)
    with contextlib.ExitStack() as stack:
        stack.callback(stop_all_children)  # last: whatever the other cleanups did not know about
        # Before anything imports a handler: Powertools reads its settings (log level, metrics namespace) once,
        # when a module makes its Logger and Metrics.
        stack.enter_context(patched_environ(OFFLINE_ENV | QUIET))
        with progress.step(f"Synthesize the app (cdk synth into {workdir / 'cdk.out'}; assets staged)"):
            synthesized = synthesize(workdir / "cdk.out")
            resolver = execution.Resolver(synthesized.template)
            definition = execution.for_moto(resolver.definition(
                synthesized.logical_id("AWS::StepFunctions::StateMachine", PIPELINE)))
        moto = stack.enter_context(MotoServer(log=workdir / "moto.log"))
        execution.enable_interpreter(moto.url)
        bucket = execution.physical_name(synthesized.logical_id("AWS::S3::Bucket", "StorageData"))
        with progress.step(
            f"Start moto on {moto.url} with its Step Functions interpreter; create the stack's buckets and tables, "
            f"publish its file assets; seed '{SOURCE_BUCKET}' with {len(dataset)} real ABID photos"
        ):
            execution.create_resources(synthesized)
            for uri in publish_file_assets(synthesized):
                print(f"      asset {uri}")
            seed_source(boto3.client("s3"), data, dataset)
        endpoints = LocalEndpoints(workdir)
        stack.callback(endpoints.close)
        bridge = LocalTrainingJobs(workdir, say=functools.partial(print, file=sys.stdout, flush=True))
        stack.callback(bridge.close)

        def serve_endpoints(invocation: execution.Invocation) -> None:
            for line in endpoints.sync():
                print(f"      {line}", flush=True)

        # The handlers' own output (Powertools' metric documents, say) goes where Lambda sends it: to a log.
        lambda_log = stack.enter_context(open(workdir / "lambdas.log", "w"))
        lambdas = execution.InProcessLambda(execution.lambda_functions(synthesized, resolver), after=serve_endpoints,
                                            log=lambda_log)
        stack.enter_context(execution.interpreter(lambdas, bridge))
        sfn = boto3.client("stepfunctions")
        if in_service_dir is not None and in_service is not None:
            with progress.step(f"Put the shipped model ({in_service_dir.name}) in service through the pipeline's "
                               "own deploy stage (an execution started at 'Deploy stage')"):
                job = f"shipped-{in_service_dir.name}"
                artifact = publish_model(in_service_dir, bucket, job, workdir)
                follow(sfn, execution.for_moto(definition, start_at="Deploy stage"), {
                    "input": {}, "execution": f"shipped-{stamp}",
                    "training": {"jobName": job, "modelArtifact": artifact, "metrics": in_service["metrics"]},
                }, name=f"shipped-{stamp}")
        # Batch 16 instead of ml.train's 32: the trainer is the demo's largest process, and on the sample (one
        # epoch, 2 cores) it peaked at 2.5 GB instead of 3.8 GB (bench/treemem.py on `invmon train --local
        # --epochs 1 -p batch-size=16`); the demo's model loses the deploy gate either way.
        execution_input = {"dataset": {"selector": "count-range", "minCount": 0, "maxCount": 1000},
                           "training": {"epochs": epochs, "hyperparameters": {"batch-size": DEMO_BATCH_SIZE}}}
        with progress.step(f"Run the pipeline's state machine with {json.dumps(execution_input)}: "
                           "each state as the execution history reports it"):
            result = follow(sfn, definition, execution_input, name=f"demo-{stamp}")
        # What the stages' contracts leave in the output ($.ingest, $.training, $.deploy), for people.
        output = result.output or {}
        training, deploy = output.get("training") or {}, output.get("deploy") or {}
        if (output.get("ingest") or {}).get("counts"):
            print(f"      ingest: {output['ingest']['counts']}")
        shown = {k: round(v, 4) for k, v in (training.get("metrics") or {}).items() if k in SHOWN_METRICS}
        print(f"      training job {training.get('jobName')}: {shown}")
        service_name = in_service["model"] if in_service else "none"
        print(f"      Deploy gate: compare with the model in service ({service_name}): "
              f"{deploy.get('decision')}: {'; '.join(deploy.get('reasons', []))}")
        evaluation: dict[str, Any] = {}
        job = bridge.runs.get(training.get("jobName", ""))
        # The test channel the training job itself received, as it downloaded it (whatever its data type).
        test = job.model_dir.parent / "input" / "data" / "test" if job else None
        if job is None or test is None or not test.is_dir():
            print("      no test channel in the training job: evaluation skipped")
        else:
            with progress.step(f"Evaluate the new model on the held-out test split (the job's test channel, {test})"):
                evaluation = evaluate(job.model_dir, test, workdir / "evaluation")
                print(f"      plots and report in {workdir / 'evaluation'}")
        with progress.step(
            f"Upload {len(held)} held-back photos (a third with a consignment off by two) and a corrupt one "
            f"under {settings.incoming_prefix}; count each with the count Lambda through the endpoint, read the table"
        ):
            rows = count_uploads(lambdas, synthesized, data, held, settings)
        review.demo_step(progress, synthesized, moto.url, rows)  # people answer what the model could not settle
    deployed = deploy.get("decision") == "deploy"
    return DemoResult(rows=rows, metrics=training.get("metrics", {}), evaluation=evaluation, decision=deploy,
                      workdir=workdir, in_service=str(training.get("jobName")) if deployed else service_name)


# What each status in the table means (lambdas/count/records.py decides them); a test keeps one line per status.
STATUS_LEGEND = {
    "match": "the count agrees with the consignment, with the confidence the model's operating point asks for",
    "mismatch": "the count disagrees with the consignment: a discrepancy to look at",
    "uncounted-low-confidence": "the model cannot tell confidently enough: a person should count",
    "rejected": "the upload was not counted (empty, too large, not a JPEG/PNG, corrupt): see its reason",
    "counted": "counted confidently, with no consignment to compare with",
    "reviewed": "a person counted the photo in the review loop; the model's answer is kept beside it",
}


def counting_models(result: DemoResult) -> list[str]:
    """The models that answered the count records, in the order they first appear."""
    return list(dict.fromkeys(str(row["record"]["model"]) for row in result.rows if row["record"].get("model")))


def status_summary(result: DemoResult) -> str:
    """``13 uploads: 6 match, 3 mismatch, 3 uncounted-low-confidence, 1 rejected``."""
    counts: dict[str, int] = {}
    for row in result.rows:
        status = row["record"].get("status", "missing")
        counts[status] = counts.get(status, 0) + 1
    return f"{len(result.rows)} uploads: " + ", ".join(f"{n} {status}" for status, n in counts.items())


def counted_cell(record: dict, expected: Any) -> str:
    """The count as the decision saw it. A consignment at or above the overflow class ("N or more") is decided by
    that class's probability (lambdas/count/records.py), so the cell gives it beside the most likely exact count:
    a bin of 20 announced as 20 reads "4; 6+ at 0.71", not a bare 4 next to "match"."""
    count, overflow = record.get("count", ""), record.get("overflowClass")
    classes = [int(c) for c in record.get("classes", [])]
    if expected is None or overflow is None or int(expected) < int(overflow) or int(overflow) not in classes:
        return str(count)
    probability = float(record.get("probabilities", [])[classes.index(int(overflow))])
    return f"{count}; {int(overflow)}+ at {probability:.2f}"


def report(result: DemoResult) -> str:
    table_rows = []
    for row in result.rows:
        record = row["record"]
        confidence = record.get("confidence")
        status = record.get("status", "missing")
        status = review.shown_status(record) if status == "reviewed" else status
        if status == "rejected":
            reason = str(record.get("reason", ""))
            status += f": {reason[:57] + '...' if len(reason) > 60 else reason}"
        table_rows.append(
            [
                row["photo"],
                "" if row.get("truth") is None else row["truth"],
                "" if row["expected"] is None else row["expected"],
                counted_cell(record, row["expected"]),
                "" if confidence is None else f"{float(confidence):.2f}",
                status,
                record.get("decidedBy", ""),
            ]
        )
    headers = ["photo", "in the bin", "consignment", "counted", "confidence", "status", "decided by"]
    models = counting_models(result)
    gate = result.decision.get("decision")
    counted_by = f"{result.in_service} ({', '.join(models)})" if result.in_service and models else (
        result.in_service or ", ".join(models) or "no model")
    heading = (f"Counted by the model in service, {counted_by}"
               + (f"; the deploy gate's decision on the demo's model: {gate}" if gate else ""))
    lines = [heading, render_table(headers, table_rows), status_summary(result)]
    shown = dict.fromkeys(str(row["record"].get("status", "missing")) for row in result.rows)
    lines += [f"  {status}: {STATUS_LEGEND[status]}" for status in shown if status in STATUS_LEGEND]
    lines.append("")
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
        try:
            result = run(data, workdir, epochs=epochs, hold=hold_out)
        except PipelineFailed as error:
            print(f"invmon demo: {error}", file=sys.stderr)
            return 1
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
