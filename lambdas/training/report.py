"""Report step: after the job (or the tuning job's best job) has finished, record what came out of it.

Reads DescribeTrainingJob (and DescribeHyperParameterTuningJob for tuning), the trainer's own metrics and
health files (``health.json``, ml/health.py) from ``output.tar.gz`` where there is one, writes
``reports/training/<job>.json`` and returns the ``$.training`` object the deploy gate reads::

    {"jobName", "modelArtifact", "metrics": {...}, "tuningJobName", "reportKey", "findings": [...],
     "health": {"status", "findings": [...]} | None, "rulesPending": bool, "attempt": int, "problems": [...]}

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
from pydantic import BaseModel, ConfigDict

logger = Logger()
tracer = Tracer()
metrics = Metrics()

REPORT_PREFIX = "reports/training/"
# The deploy gate compares models on these; a report without them says so in "problems".
GATE_METRICS = ("valid_accuracy", "valid_rmse")
_PENDING = {"InProgress", "Stopping"}
_MAX_OUTPUT_BYTES = 50 * 1024 * 1024
HEALTH_FILE = "health.json"  # ml.health.HEALTH_FILE; Lambda code does not import the ml package
# $.training travels through every later state: at most this many health findings go with it (the report
# file in the bucket keeps them all).
MAX_STATE_FINDINGS = 20


class ReportEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["training", "tuning"]
    jobName: str
    attempt: int = 0


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


def summarize(
    job: dict[str, Any],
    *,
    tuning: dict[str, Any] | None,
    output_metrics: dict[str, float] | None,
    output_problem: str | None,
    attempt: int,
    health: dict[str, Any] | None = None,
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
                       attempt=event.attempt, health=health)
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
                                            "problems": state["problems"]})
    if not state["rulesPending"]:
        metrics.add_dimension(name="mode", value=event.mode)
        for metric in GATE_METRICS:
            if metric in state["metrics"]:
                metrics.add_metric(name=metric, unit=MetricUnit.Count, value=state["metrics"][metric])
        if report["billableSeconds"] is not None:
            metrics.add_metric(name="TrainingBillableSeconds", unit=MetricUnit.Seconds,
                               value=report["billableSeconds"])
        issues = sum(f["status"] == "IssuesFound" for f in state["findings"])
        metrics.add_metric(name="TrainingRuleIssues", unit=MetricUnit.Count, value=issues)
        if state["health"] is not None:
            metrics.add_metric(name="TrainingHealthFindings", unit=MetricUnit.Count,
                               value=len(state["health"]["findings"]) + state["health"]["findingsLeftOut"])
    return state
