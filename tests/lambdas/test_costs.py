"""The cost report from Cost Explorer (moto, with injected results) and training-job spot savings."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime

import boto3
import pytest
import requests
from botocore.stub import Stubber
from moto import mock_aws

from lambdas.costs import report as costs

BUCKET = "invmon-data"


def _group(service: str, amount: str) -> dict:
    return {"Keys": [service], "Metrics": {"UnblendedCost": {"Amount": amount, "Unit": "USD"}}}


COST_RESULT = {
    "ResultsByTime": [
        {
            "TimePeriod": {"Start": "2026-11-17", "End": "2026-11-18"},
            "Total": {},
            "Groups": [_group("Amazon SageMaker", "12.50"), _group("Amazon Simple Storage Service", "0.25")],
            "Estimated": False,
        },
        {
            "TimePeriod": {"Start": "2026-11-18", "End": "2026-11-19"},
            "Total": {},
            "Groups": [_group("Amazon SageMaker", "3.00"), _group("AWS Lambda", "0.01")],
            "Estimated": True,
        },
    ]
}


def _inject_cost_results(*results: dict) -> None:
    # moto's documented way to make GetCostAndUsage return data; intercepted in-process, no network.
    response = requests.post(
        "http://motoapi.amazonaws.com/moto-api/static/ce/cost-and-usage-results",
        json={"results": list(results)},
        timeout=5,
    )
    assert response.status_code == 201


def _stub_training_jobs(client) -> Stubber:
    stubber = Stubber(client)
    created = datetime(2026, 11, 17, tzinfo=UTC)
    stubber.add_response(
        "list_training_jobs",
        {
            "TrainingJobSummaries": [
                {"TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:1:training-job/{name}",
                 "CreationTime": created, "TrainingJobStatus": "Completed"}
                for name in ("invmon-dev-train-a", "invmon-dev-train-b", "invmon-dev-train-ondemand",
                             "other-invmon-job")
            ]
        },
    )
    for name, spot, trained, billed in (
        ("invmon-dev-train-a", True, 3000, 900),
        ("invmon-dev-train-b", True, 1000, 500),
        ("invmon-dev-train-ondemand", False, 500, 500),
    ):
        stubber.add_response(
            "describe_training_job",
            {
                "TrainingJobName": name,
                "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:1:training-job/{name}",
                "ModelArtifacts": {"S3ModelArtifacts": f"s3://{BUCKET}/models/{name}/model.tar.gz"},
                "TrainingJobStatus": "Completed",
                "SecondaryStatus": "Completed",
                "AlgorithmSpecification": {"TrainingInputMode": "File", "TrainingImage": "image"},
                "ResourceConfig": {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
                "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
                "CreationTime": created,
                "EnableManagedSpotTraining": spot,
                "TrainingTimeInSeconds": trained,
                "BillableTimeInSeconds": billed,
            },
            {"TrainingJobName": name},
        )
    stubber.activate()
    return stubber


ANALYSIS_ROLE = "arn:aws:iam::123456789012:role/invmon-cost-analysis"


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("COST_ANALYSIS_ROLE_ARN", ANALYSIS_ROLE)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield


def test_query_asks_for_daily_cost_per_service_filtered_by_the_project_tag():
    query = costs.cost_query("invmon", date(2026, 11, 18), date(2026, 11, 25))
    assert query["TimePeriod"] == {"Start": "2026-11-18", "End": "2026-11-25"}
    assert query["GroupBy"] == [{"Type": "DIMENSION", "Key": "SERVICE"}]
    assert query["Filter"] == {"Tags": {"Key": "project", "Values": ["invmon"], "MatchOptions": ["EQUALS"]}}


def test_report_sums_costs_by_service_and_day_and_spot_savings(aws):
    _inject_cost_results(COST_RESULT)
    sagemaker = boto3.client("sagemaker", region_name="us-east-1")
    with _stub_training_jobs(sagemaker):
        report = costs.build_report(
            costs.CostRequest(days=7, end=date(2026, 11, 25)),
            project="invmon",
            job_prefix="invmon-dev",
            ce=boto3.client("ce", region_name="us-east-1"),
            sagemaker=sagemaker,
            now=datetime(2026, 11, 25, 6, 0, tzinfo=UTC),
        )
    assert report.total == pytest.approx(15.76)
    assert report.by_service == {
        "Amazon SageMaker": 15.5,
        "Amazon Simple Storage Service": 0.25,
        "AWS Lambda": 0.01,
    }
    assert report.daily == [{"date": "2026-11-17", "cost": 12.75}, {"date": "2026-11-18", "cost": 3.01}]
    # Two spot jobs: 4000 s trained, 1400 s billed; the on-demand job is not a spot saving.
    # "other-invmon-job" only contains the name: it is not described (the role could not) nor counted.
    assert [job["job_name"] for job in report.training_jobs] == ["invmon-dev-train-a", "invmon-dev-train-b"]
    assert report.training_jobs[0]["saved_percent"] == 70.0
    assert report.spot_saved_percent == 65.0


def test_handler_writes_json_csv_and_latest_to_the_bucket(aws, monkeypatch, lambda_context):
    _inject_cost_results(COST_RESULT)
    monkeypatch.setenv("PROJECT", "invmon")
    monkeypatch.setenv("TRAINING_JOB_PREFIX", "invmon-dev")
    monkeypatch.setenv("DATA_BUCKET", BUCKET)
    sagemaker = boto3.client("sagemaker", region_name="us-east-1")
    stubber = Stubber(sagemaker)
    stubber.add_response("list_training_jobs", {"TrainingJobSummaries": []})
    stubber.activate()
    real_client = boto3.client
    monkeypatch.setattr(
        costs.boto3, "client", lambda name, **kw: sagemaker if name == "sagemaker" else real_client(name, **kw)
    )

    result = costs.handler({"days": 7, "end": "2026-11-25"}, lambda_context)

    s3 = boto3.client("s3", region_name="us-east-1")
    assert result["json"] == f"s3://{BUCKET}/reports/costs/2026-11-25/costs.json"
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key="reports/costs/2026-11-25/costs.json")["Body"].read())
    assert stored["total"] == pytest.approx(15.76)
    latest = json.loads(s3.get_object(Bucket=BUCKET, Key="reports/costs/latest.json")["Body"].read())
    assert latest == stored
    rows = list(csv.DictReader(io.StringIO(
        s3.get_object(Bucket=BUCKET, Key="reports/costs/2026-11-25/costs.csv")["Body"].read().decode()
    )))
    assert {"section": "service", "name": "Amazon SageMaker", "value": "15.5000", "unit": "USD"} in rows
    assert rows[0] == {"section": "total", "name": "invmon", "value": "15.7600", "unit": "USD"}


def test_scheduler_payload_with_unknown_fields_means_defaults(aws, monkeypatch, lambda_context):
    monkeypatch.setenv("PROJECT", "invmon")
    monkeypatch.setenv("TRAINING_JOB_PREFIX", "invmon-dev")
    monkeypatch.setenv("DATA_BUCKET", BUCKET)
    result = costs.handler({"source": "aws.scheduler"}, lambda_context)
    assert result["total"] == 0.0
    assert result["json"].startswith(f"s3://{BUCKET}/reports/costs/")


def test_a_bad_request_is_refused_with_the_field_named(lambda_context):
    with pytest.raises(Exception, match="days"):
        costs.handler({"days": 0}, lambda_context)


def test_handler_reads_costs_as_the_cost_analysis_role_not_as_itself(aws, monkeypatch, lambda_context):
    _inject_cost_results(COST_RESULT)
    for name, value in (("PROJECT", "invmon"), ("TRAINING_JOB_PREFIX", "invmon-dev"), ("DATA_BUCKET", BUCKET)):
        monkeypatch.setenv(name, value)
    made: list[tuple[str, dict]] = []
    assumed: list[dict] = []
    real_client = boto3.client

    def client(name, **kwargs):
        made.append((name, kwargs))
        made_client = real_client(name, **kwargs)
        if name == "sts":
            real_assume = made_client.assume_role

            def assume_role(**request):
                response = real_assume(**request)
                assumed.append({"request": request, "credentials": response["Credentials"]})
                return response

            made_client.assume_role = assume_role
        return made_client

    monkeypatch.setattr(costs.boto3, "client", client)
    costs.handler({"days": 7, "end": "2026-11-25"}, lambda_context)

    (assumption,) = assumed
    assert assumption["request"]["RoleArn"] == ANALYSIS_ROLE
    (ce,) = [kwargs for name, kwargs in made if name == "ce"]
    # The Cost Explorer client carries the assumed role's credentials, never the function's own.
    assert ce["aws_access_key_id"] == assumption["credentials"]["AccessKeyId"]
    assert ce["aws_session_token"] == assumption["credentials"]["SessionToken"]
