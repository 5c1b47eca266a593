"""The cost report: what invmon cost last period, by service, and what spot capacity saved on training.

Runs weekly from EventBridge Scheduler and on demand (``invmon costs --refresh`` or a console test event).
Cost Explorer is filtered by the cost-allocation tag ``project`` that the stack puts on every resource, so the
figures are invmon's alone (once the tag is activated for cost allocation in the billing console). The query
runs as the cost-analysis role (``COST_ANALYSIS_ROLE_ARN``, infra/costs.py), the one role that may read the
account's billing; the function's own role may only assume it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, Field, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger()
tracer = Tracer()
metrics = Metrics()

REPORT_PREFIX = "reports/costs/"
LATEST_KEY = f"{REPORT_PREFIX}latest.json"


class CostRequest(BaseModel):
    """The event: every field optional, so the schedule's ``{}`` means the last full week."""

    days: int = Field(default=7, ge=1, le=365)
    end: date | None = None  # exclusive, as Cost Explorer counts; defaults to today (UTC)


@dataclass
class SpotJob:
    job_name: str
    training_seconds: int
    billable_seconds: int

    @property
    def saved_percent(self) -> float:
        if self.training_seconds == 0:
            return 0.0
        return round(100.0 * (1 - self.billable_seconds / self.training_seconds), 1)


@dataclass
class CostReport:
    project: str
    start: str
    end: str
    currency: str
    total: float
    by_service: dict[str, float]
    daily: list[dict[str, Any]]
    training_jobs: list[dict[str, Any]] = field(default_factory=list)
    spot_saved_percent: float = 0.0
    generated_at: str = ""


def cost_query(project: str, start: date, end: date) -> dict[str, Any]:
    """The GetCostAndUsage request: daily unblended cost per service, for this project's tag only."""
    return {
        "TimePeriod": {"Start": start.isoformat(), "End": end.isoformat()},
        "Granularity": "DAILY",
        "Metrics": ["UnblendedCost"],
        "GroupBy": [{"Type": "DIMENSION", "Key": "SERVICE"}],
        "Filter": {"Tags": {"Key": "project", "Values": [project], "MatchOptions": ["EQUALS"]}},
    }


def summarize_costs(pages: list[dict[str, Any]]) -> tuple[float, dict[str, float], list[dict[str, Any]], str]:
    """Totals per service and per day from GetCostAndUsage pages (grouped by SERVICE)."""
    by_service: dict[str, float] = {}
    daily: list[dict[str, Any]] = []
    currency = "USD"
    for page in pages:
        for period in page.get("ResultsByTime", []):
            day_total = 0.0
            for group in period.get("Groups", []):
                amount = group["Metrics"]["UnblendedCost"]
                currency = amount.get("Unit", currency)
                service = group["Keys"][0]
                by_service[service] = by_service.get(service, 0.0) + float(amount["Amount"])
                day_total += float(amount["Amount"])
            if not period.get("Groups") and "UnblendedCost" in period.get("Total", {}):
                day_total = float(period["Total"]["UnblendedCost"]["Amount"])
            daily.append({"date": period["TimePeriod"]["Start"], "cost": round(day_total, 4)})
    by_service = {name: round(cost, 4) for name, cost in sorted(by_service.items(), key=lambda kv: -kv[1])}
    return round(sum(by_service.values()) or sum(d["cost"] for d in daily), 4), by_service, daily, currency


def spot_savings(jobs: list[SpotJob]) -> float:
    """Share of training time not billed, over all jobs (SageMaker bills spot jobs for billable seconds only)."""
    trained = sum(job.training_seconds for job in jobs)
    billed = sum(job.billable_seconds for job in jobs)
    return round(100.0 * (1 - billed / trained), 1) if trained else 0.0


def report_csv(report: CostReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["section", "name", "value", "unit"])
    writer.writerow(["total", report.project, f"{report.total:.4f}", report.currency])
    for service, cost in report.by_service.items():
        writer.writerow(["service", service, f"{cost:.4f}", report.currency])
    for day in report.daily:
        writer.writerow(["day", day["date"], f"{day['cost']:.4f}", report.currency])
    for job in report.training_jobs:
        writer.writerow(["training-job", job["job_name"], job["saved_percent"], "percent-saved-by-spot"])
    writer.writerow(["spot", "saved", report.spot_saved_percent, "percent"])
    return out.getvalue()


def _cost_pages(client, query: dict[str, Any]) -> list[dict[str, Any]]:
    pages, token = [], None
    while True:
        page = client.get_cost_and_usage(**query, **({"NextPageToken": token} if token else {}))
        pages.append(page)
        token = page.get("NextPageToken")
        if not token:
            return pages


def _training_jobs(client, job_prefix: str, since: datetime) -> list[SpotJob]:
    """This deployment's completed spot jobs. ListTrainingJobs can only filter by substring, and the role may
    describe only names that start with the prefix, so others are dropped before they are described."""
    jobs: list[SpotJob] = []
    paginator = client.get_paginator("list_training_jobs")
    for page in paginator.paginate(CreationTimeAfter=since, NameContains=job_prefix, StatusEquals="Completed"):
        for summary in page["TrainingJobSummaries"]:
            if not summary["TrainingJobName"].startswith(f"{job_prefix}-"):
                continue
            job = client.describe_training_job(TrainingJobName=summary["TrainingJobName"])
            if not job.get("EnableManagedSpotTraining"):
                continue
            jobs.append(
                SpotJob(
                    job_name=job["TrainingJobName"],
                    training_seconds=int(job.get("TrainingTimeInSeconds") or 0),
                    billable_seconds=int(job.get("BillableTimeInSeconds") or 0),
                )
            )
    return jobs


def build_report(
    request: CostRequest, *, project: str, job_prefix: str, ce, sagemaker, now: datetime
) -> CostReport:
    end = request.end or now.date()
    start = end - timedelta(days=request.days)
    total, by_service, daily, currency = summarize_costs(_cost_pages(ce, cost_query(project, start, end)))
    jobs = _training_jobs(sagemaker, job_prefix, datetime.combine(start, datetime.min.time(), tzinfo=UTC))
    return CostReport(
        project=project,
        start=start.isoformat(),
        end=end.isoformat(),
        currency=currency,
        total=total,
        by_service=by_service,
        daily=daily,
        training_jobs=[asdict(job) | {"saved_percent": job.saved_percent} for job in jobs],
        spot_saved_percent=spot_savings(jobs),
        generated_at=now.isoformat(timespec="seconds"),
    )


def write_report(report: CostReport, *, bucket: str, s3) -> dict[str, str]:
    """JSON and CSV under reports/costs/<end>/ plus latest.json, all encrypted by the bucket's default key."""
    base = f"{REPORT_PREFIX}{report.end}/costs"
    body = json.dumps(asdict(report), indent=2)
    s3.put_object(Bucket=bucket, Key=f"{base}.json", Body=body, ContentType="application/json")
    s3.put_object(Bucket=bucket, Key=f"{base}.csv", Body=report_csv(report), ContentType="text/csv")
    s3.put_object(Bucket=bucket, Key=LATEST_KEY, Body=body, ContentType="application/json")
    return {"json": f"s3://{bucket}/{base}.json", "csv": f"s3://{bucket}/{base}.csv"}


def cost_explorer(role_arn: str, region: str) -> Any:
    """A Cost Explorer client with the cost-analysis role's temporary credentials."""
    credentials = boto3.client("sts", region_name=region).assume_role(
        RoleArn=role_arn, RoleSessionName="invmon-cost-report", DurationSeconds=900
    )["Credentials"]
    # Cost Explorer has one endpoint, in us-east-1, whatever the stack's region.
    return boto3.client(
        "ce",
        region_name="us-east-1",
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
    )


@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # EventBridge Scheduler and console tests may send an empty or scheduler-shaped payload.
    request = parse(event={k: v for k, v in (event or {}).items() if k in CostRequest.model_fields}, model=CostRequest)
    region = os.environ.get("AWS_REGION", "us-east-1")
    report = build_report(
        request,
        project=os.environ["PROJECT"],
        job_prefix=os.environ["TRAINING_JOB_PREFIX"],
        ce=cost_explorer(os.environ["COST_ANALYSIS_ROLE_ARN"], region),
        sagemaker=boto3.client("sagemaker", region_name=region),
        now=datetime.now(UTC),
    )
    locations = write_report(report, bucket=os.environ["DATA_BUCKET"], s3=boto3.client("s3", region_name=region))
    metrics.add_metric(name="ProjectCostUSD", unit=MetricUnit.NoUnit, value=report.total)
    metrics.add_metric(name="SpotSavedPercent", unit=MetricUnit.Percent, value=report.spot_saved_percent)
    logger.info("cost report written", extra={"total": report.total, "currency": report.currency, **locations})
    return {"total": report.total, "currency": report.currency, "spotSavedPercent": report.spot_saved_percent,
            **locations}
