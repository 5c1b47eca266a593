"""Report step: after the job (or the tuning job's best job) has finished, record what came out of it.

Reads DescribeTrainingJob (and DescribeHyperParameterTuningJob for tuning), the trainer's own metrics and
health files (``health.json``, ml/health.py) from ``output.tar.gz`` where there is one, writes
``reports/training/<job>.json`` and returns the ``$.training`` object the deploy gate reads::

    {"jobName", "modelArtifact", "metrics": {...}, "tuningJobName", "reportKey", "findings": [...],
     "health": {"status", "findings": [...]} | None, "rulesPending": bool, "attempt": int, "problems": [...],
     "usable": bool, "unusable": str, "reviewedUsed": int | None}

``usable`` is false (and ``unusable`` says why, in under 1,000 characters) when the job may not go forward to
the deploy gate: it did not end Completed, the trainer reported a fatal health finding, or its model artifact
holds no serving code. The training stage fails on it before the gate sees the model (issue #25 item 3).

``reviewedUsed`` is how many of the review loop's labelled photos the job trained on: the pack stage's count of
those in the train shards (``$.pack.reviewedUsed``, lambdas/pack/finish.py), so photos a person marked
``unusable`` (they get no label) and labelled photos that could not be packed are not in it. None where the step
was called without it.

``findings`` are Debugger rule outcomes (only where the deployment opted into Debugger); ``health`` is what
the trainer found itself, for every job.

Debugger and profiler rules keep evaluating for a few minutes after the job ends; while any is still in
progress ``rulesPending`` is true and the state machine waits and calls this step again.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from datetime import UTC, datetime
from typing import Any, Literal

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field

logger = Logger()
tracer = Tracer()
metrics = Metrics()

REPORT_PREFIX = "reports/training/"
# The deploy gate compares models on these; a report without them says so in "problems".
GATE_METRICS = ("valid_accuracy", "valid_rmse")
_PENDING = {"InProgress", "Stopping"}
_MAX_OUTPUT_BYTES = 50 * 1024 * 1024
HEALTH_FILE = "health.json"  # ml.health.HEALTH_FILE; Lambda code does not import the ml package
# What the SageMaker PyTorch serving container imports from model.tar.gz (ml/train.py write_serving_code): a
# model without it loads the container's default handler, which cannot read this model.
SERVING_ENTRY = "code/inference.py"
# The cause of an unusable job travels in the execution's history and error: kept short.
MAX_CAUSE_CHARS = 900
# $.training travels through every later state: at most this many health findings go with it (the report
# file in the bucket keeps them all).
MAX_STATE_FINDINGS = 20


class ReportEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["training", "tuning"]
    jobName: str
    attempt: int = 0
    reviewedUsed: int | None = Field(default=None, ge=0)


class _Clients:
    """Created on first use, so importing the module (tests, other Lambdas) needs no AWS configuration."""

    def __init__(self) -> None:
        self._sagemaker = None
        self._s3 = None

    @property
    def sagemaker(self) -> Any:
        if self._sagemaker is None:
            self._sagemaker = boto3.client("sagemaker", region_name=os.environ.get("AWS_REGION"))
        return self._sagemaker

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = boto3.client("s3", region_name=os.environ.get("AWS_REGION"))
        return self._s3


clients = _Clients()


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"not an s3:// object URI: {uri!r}")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


def findings(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Debugger and profiler rule outcomes: status is InProgress, NoIssuesFound, IssuesFound, Error,
    Stopping or Stopped."""
    result = []
    for kind, field in (("debugger", "DebugRuleEvaluationStatuses"), ("profiler", "ProfilerRuleEvaluationStatuses")):
        for status in job.get(field) or []:
            result.append({
                "rule": status.get("RuleConfigurationName"),
                "kind": kind,
                "status": status.get("RuleEvaluationStatus"),
                "details": status.get("StatusDetails"),
                "ruleJob": status.get("RuleEvaluationJobArn"),
            })
    return result


def final_metrics(job: dict[str, Any]) -> dict[str, float]:
    """The last value SageMaker scraped from the log for each metric definition."""
    return {item["MetricName"]: float(item["Value"]) for item in job.get("FinalMetricDataList") or []}


def metrics_from_output(archive: bytes) -> dict[str, float]:
    """Numeric figures from the trainer's metrics JSON inside output.tar.gz (any member whose name contains
    "metrics"; a nested "metrics" object counts as well). Raises ValueError when there is none."""
    found: dict[str, float] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.endswith(".json") and "metric" in m.name.rsplit("/", 1)[-1]]
        if not members:
            raise ValueError("output.tar.gz holds no metrics JSON file")
        for member in sorted(members, key=lambda m: m.name):
            document = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
            if not isinstance(document, dict):
                continue
            for source in (document, document.get("metrics")):
                if isinstance(source, dict):
                    found.update({k: float(v) for k, v in source.items()
                                  if isinstance(v, int | float) and not isinstance(v, bool)})
    return found


def health_from_output(archive: bytes) -> dict[str, Any] | None:
    """The trainer's health.json inside output.tar.gz, or None when the job wrote none (an older trainer)."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] == HEALTH_FILE:
                document = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                return document if isinstance(document, dict) else None
    return None


def health_state(health: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of the health report that travels in ``$.training``: status and the findings' essentials."""
    if health is None:
        return None
    findings = [{key: finding.get(key) for key in ("check", "severity", "epoch", "message")}
                for finding in health.get("findings") or [] if isinstance(finding, dict)]
    return {"status": health.get("status", "unknown"), "findings": findings[:MAX_STATE_FINDINGS],
            "findingsLeftOut": max(0, len(findings) - MAX_STATE_FINDINGS)}


def serving_code_in(model_archive: Any) -> bool:
    """Whether a model.tar.gz (a readable stream) holds the serving entry point. Read as a stream, member by
    member, so a large artifact is never held in memory."""
    with tarfile.open(fileobj=model_archive, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.removeprefix("./") == SERVING_ENTRY:
                return True
    return False


def unusable_reasons(job: dict[str, Any], health: dict[str, Any] | None, serving_code: bool | None) -> list[str]:
    """Why a finished job must not reach the deploy gate; empty when it may.

    A Stopped job is refused whatever the .sync task made of it: Step Functions' developer guide says only that
    a .sync task waits for the job to complete ("Run a Job (.sync)"), and does not list which SageMaker end
    states fail the task, while botocore's own TrainingJobCompletedOrStopped waiter (sagemaker waiters-2.json)
    accepts Stopped as success. A spot job whose MaxWaitTimeInSeconds ran out ends Stopped, partly trained.
    """
    name = job.get("TrainingJobName")
    status = job.get("TrainingJobStatus")
    reasons = []
    if status != "Completed":
        reasons.append(f"training job {name} ended {status}: "
                       f"{job.get('FailureReason') or job.get('SecondaryStatus') or 'no reason given'}")
    if health is not None and health.get("status") == "fatal":
        fatal = [f for f in health.get("findings") or [] if isinstance(f, dict) and f.get("severity") == "fatal"]
        detail = "; ".join(f"{f.get('check')}: {f.get('message')}" for f in fatal) or "no finding recorded"
        reasons.append(f"the trainer reported a fatal health finding ({detail})")
    artifact = (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not artifact:
        reasons.append(f"training job {name} left no model artifact")
    elif serving_code is False:
        reasons.append(f"{artifact} holds no {SERVING_ENTRY}: the serving container could not load it")
    return reasons


def unusable_cause(reasons: list[str]) -> str:
    cause = "; ".join(reasons)
    return cause if len(cause) <= MAX_CAUSE_CHARS else cause[:MAX_CAUSE_CHARS - 3] + "..."


def summarize(
    job: dict[str, Any],
    *,
    tuning: dict[str, Any] | None,
    output_metrics: dict[str, float] | None,
    output_problem: str | None,
    attempt: int,
    health: dict[str, Any] | None = None,
    serving_code: bool | None = None,
    reviewed_used: int | None = None,
) -> dict[str, Any]:
    """The full report (for the bucket) of one finished job; the returned ``state`` part is ``$.training``."""
    name = job["TrainingJobName"]
    scraped = final_metrics(job)
    merged = {**scraped, **(output_metrics or {})}  # the trainer's own file is exact; log scraping is last-epoch
    rule_findings = findings(job)
    problems = [] if output_problem is None else [output_problem]
    status = job.get("TrainingJobStatus")
    if status != "Completed":
        problems.append(f"training job {name} ended {status}: {job.get('FailureReason', 'no reason given')}")
    problems += [f"metric {metric} missing: the deploy gate cannot compare this model"
                 for metric in GATE_METRICS if metric not in merged]
    billable, seconds = job.get("BillableTimeInSeconds"), job.get("TrainingTimeInSeconds")
    unusable = unusable_reasons(job, health, serving_code)
    state = {
        "jobName": name,
        "modelArtifact": (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts"),
        "metrics": merged,
        "tuningJobName": tuning["HyperParameterTuningJobName"] if tuning else None,
        "reportKey": f"{REPORT_PREFIX}{name}.json",
        "findings": [{k: f[k] for k in ("rule", "kind", "status")} for f in rule_findings],
        "health": health_state(health),
        "rulesPending": any(f["status"] in _PENDING for f in rule_findings),
        "attempt": attempt + 1,
        "problems": problems,
        "usable": not unusable,
        "unusable": unusable_cause(unusable),
        "reviewedUsed": reviewed_used,
    }
    report = {
        **state,
        "findings": rule_findings,
        "health": health,
        "status": status,
        "secondaryStatus": job.get("SecondaryStatus"),
        "scrapedMetrics": scraped,
        "outputMetrics": output_metrics,
        "hyperparameters": {k: v for k, v in (job.get("HyperParameters") or {}).items()
                            if not k.startswith("sagemaker_")},
        "instanceType": (job.get("ResourceConfig") or {}).get("InstanceType"),
        "instanceCount": (job.get("ResourceConfig") or {}).get("InstanceCount"),
        "spot": bool(job.get("EnableManagedSpotTraining")),
        "trainingSeconds": seconds,
        "billableSeconds": billable,
        "spotSavingsPercent": round(100 * (1 - billable / seconds), 1) if billable and seconds else None,
        "recordedAt": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if tuning:
        report["tuning"] = {
            "name": tuning["HyperParameterTuningJobName"],
            "status": tuning.get("HyperParameterTuningJobStatus"),
            "trainingJobs": tuning.get("TrainingJobStatusCounters"),
            "objective": (tuning.get("BestTrainingJob") or {}).get("FinalHyperParameterTuningJobObjectiveMetric"),
            "bestHyperparameters": (tuning.get("BestTrainingJob") or {}).get("TunedHyperParameters"),
        }
    return {"state": state, "report": report}


def _read_output(job: dict[str, Any]) -> tuple[dict[str, float] | None, dict[str, Any] | None, str | None]:
    """(metrics, health, problem) from the job's output.tar.gz."""
    artifact = (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not artifact:
        return None, None, "no model artifact, so no output.tar.gz to read metrics from"
    bucket, key = split_s3_uri(artifact)
    output_key = key.rsplit("/", 1)[0] + "/output.tar.gz"
    try:
        head = clients.s3.head_object(Bucket=bucket, Key=output_key)
        if head["ContentLength"] > _MAX_OUTPUT_BYTES:
            return None, None, f"s3://{bucket}/{output_key} is larger than {_MAX_OUTPUT_BYTES} bytes; not read"
        body = clients.s3.get_object(Bucket=bucket, Key=output_key)["Body"].read()
        health = health_from_output(body)
    except ClientError as error:
        return None, None, f"could not read s3://{bucket}/{output_key}: {error}"
    except (ValueError, tarfile.TarError, UnicodeDecodeError) as error:
        return None, None, f"s3://{bucket}/{output_key}: {error}"
    try:
        # A trainer that stopped before writing its metrics may still have written its health.
        return metrics_from_output(body), health, None
    except (ValueError, tarfile.TarError, UnicodeDecodeError) as error:
        return None, health, f"s3://{bucket}/{output_key}: {error}"


def _read_serving_code(job: dict[str, Any]) -> bool | None:
    """Whether the job's model.tar.gz holds the serving entry point; None when there is no artifact to read."""
    artifact = (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not artifact:
        return None
    bucket, key = split_s3_uri(artifact)
    try:
        body = clients.s3.get_object(Bucket=bucket, Key=key)["Body"]
        return serving_code_in(body)
    except ClientError as error:
        if error.response["Error"]["Code"] in {"NoSuchKey", "404"}:
            return False
        raise
    except tarfile.TarError:
        return False


def record(event: ReportEvent, bucket: str) -> dict[str, Any]:
    tuning = None
    name = event.jobName
    if event.mode == "tuning":
        tuning = clients.sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
        best = tuning.get("BestTrainingJob")
        if not best:
            raise RuntimeError(f"tuning job {name} finished without a best training job "
                               f"({tuning.get('TrainingJobStatusCounters')})")
        name = best["TrainingJobName"]
    job = clients.sagemaker.describe_training_job(TrainingJobName=name)
    output_metrics, health, output_problem = _read_output(job)
    result = summarize(job, tuning=tuning, output_metrics=output_metrics, output_problem=output_problem,
                       attempt=event.attempt, health=health, serving_code=_read_serving_code(job),
                       reviewed_used=event.reviewedUsed)
    clients.s3.put_object(
        Bucket=bucket,
        Key=result["state"]["reportKey"],
        Body=json.dumps(result["report"], indent=1, sort_keys=True, default=str).encode(),
        ContentType="application/json",
    )
    return result


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_parser(model=ReportEvent)
def handler(event: ReportEvent, context: LambdaContext) -> dict[str, Any]:
    result = record(event, os.environ["DATA_BUCKET"])
    state, report = result["state"], result["report"]
    logger.info("training recorded", extra={"job_name": state["jobName"], "metrics": state["metrics"],
                                            "findings": state["findings"], "health": state["health"],
                                            "problems": state["problems"],
                                            "reviewed_used": state["reviewedUsed"]})
    if not state["rulesPending"]:
        metrics.add_dimension(name="mode", value=event.mode)
        for metric in GATE_METRICS:
            if metric in state["metrics"]:
                metrics.add_metric(name=metric, unit=MetricUnit.Count, value=state["metrics"][metric])
        if report["billableSeconds"] is not None:
            metrics.add_metric(name="TrainingBillableSeconds", unit=MetricUnit.Seconds,
                               value=report["billableSeconds"])
        if state["reviewedUsed"] is not None:
            metrics.add_metric(name="TrainingReviewedPhotos", unit=MetricUnit.Count, value=state["reviewedUsed"])
        issues = sum(f["status"] == "IssuesFound" for f in state["findings"])
        metrics.add_metric(name="TrainingRuleIssues", unit=MetricUnit.Count, value=issues)
        if state["health"] is not None:
            metrics.add_metric(name="TrainingHealthFindings", unit=MetricUnit.Count,
                               value=len(state["health"]["findings"]) + state["health"]["findingsLeftOut"])
    return state
