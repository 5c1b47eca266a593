"""The CLI against a deployed stack: moto stands in for CloudFormation, S3, DynamoDB, Step Functions, Lambda."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from invmon import aws
from invmon.cli import main
from lambdas.count.records import photo_pk, version_sk

BUCKET = "invmon-data"
TABLE = "invmon-counts"


def _template(state_machine_arn: str) -> str:
    outputs = {
        "DataBucketName": BUCKET,
        "IncomingPrefix": "incoming/",
        "StateMachineArn": state_machine_arn,
        "CountsTableName": TABLE,
        "EndpointName": "invmon-dev-counter",
        "DashboardUrl": "https://example.invalid/dashboard",
        "CostReportFunctionName": "invmon-costs",
    }
    return json.dumps(
        {
            "Resources": {"Placeholder": {"Type": "AWS::SNS::Topic"}},
            "Outputs": {key: {"Value": value} for key, value in outputs.items()},
        }
    )


@pytest.fixture
def deployed():
    with mock_aws():
        session = boto3.session.Session(region_name="us-east-1")
        iam = session.client("iam")
        role = iam.create_role(RoleName="sfn", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        machine = session.client("stepfunctions").create_state_machine(
            name="invmon", roleArn=role, definition=json.dumps({"StartAt": "A", "States": {"A": {"Type": "Succeed"}}})
        )["stateMachineArn"]
        session.client("cloudformation").create_stack(StackName="Invmon-dev", TemplateBody=_template(machine))
        s3 = session.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        session.client("dynamodb").create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                  {"AttributeName": "sk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield aws.Deployment(stack_name="Invmon-dev", session=session)


def test_a_missing_stack_is_a_clear_error(deployed, capsys):
    assert main(["pipeline", "status", "--stack", "Nope-dev"]) == 1
    assert "stack Nope-dev not found in us-east-1: deploy it with `npx cdk deploy`" in capsys.readouterr().err


def test_missing_credentials_are_a_clear_error(monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    assert main(["costs"]) == 1
    assert "no AWS credentials found" in capsys.readouterr().err


def test_pipeline_start_sends_the_input_file(deployed, tmp_path: Path):
    request = tmp_path / "input.json"
    request.write_text(json.dumps({"training": {"instanceCount": 3}}))
    arn = aws.start_pipeline(deployed, json.loads(request.read_text()), "run-1")
    described = deployed.client("stepfunctions").describe_execution(executionArn=arn)
    assert json.loads(described["input"]) == {"training": {"instanceCount": 3}}
    assert aws.latest_execution(deployed) == arn


def test_pipeline_start_refuses_an_input_that_is_not_an_object(deployed, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(aws, "Deployment", lambda stack_name, **_: deployed)
    request = tmp_path / "input.json"
    request.write_text("[1, 2]")
    assert main(["pipeline", "start", "--input", str(request)]) == 1
    assert "must be a JSON object" in capsys.readouterr().err


def test_status_lists_each_step_with_its_outcome_and_the_failure_cause():
    t0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)

    def event(seconds: int, kind: str, **details) -> dict:
        return {"timestamp": t0 + timedelta(seconds=seconds), "type": kind, "id": seconds, **details}

    history = [
        event(0, "ExecutionStarted"),
        event(1, "PassStateEntered", stateEnteredEventDetails={"name": "Prepare"}),
        event(1, "PassStateExited", stateExitedEventDetails={"name": "Prepare"}),
        event(2, "ParallelStateEntered", stateEnteredEventDetails={"name": "Ingest stage"}),
        event(300, "ParallelStateExited", stateExitedEventDetails={"name": "Ingest stage"}),
        event(301, "ParallelStateEntered", stateEnteredEventDetails={"name": "Training stage"}),
        event(900, "ExecutionFailed", executionFailedEventDetails={"error": "States.TaskFailed",
                                                                   "cause": "training stage failed: spot capacity"}),
    ]
    steps = aws.execution_steps(history)
    assert [(s.name, s.status) for s in steps] == [
        ("Prepare", "succeeded"), ("Ingest stage", "succeeded"), ("Training stage", "failed")
    ]
    assert steps[1].seconds == 298
    assert steps[2].detail == "States.TaskFailed: training stage failed: spot capacity"


def test_status_keeps_a_caught_failure_and_a_failed_stage_failed_and_a_retried_task_succeeded():
    # Event types as GetExecutionHistory names them (Step Functions API reference, HistoryEvent): a Lambda task
    # that failed once and was retried, a stage whose branch ended in a Fail state (the Parallel fails, its Catch
    # records the failure and the stage exits), and a task failure caught inside a stage.
    t0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    events: list[dict] = []

    def event(kind: str, **details) -> None:
        events.append({"timestamp": t0 + timedelta(seconds=len(events)), "type": kind, "id": len(events) + 1,
                       **details})

    def entered(kind: str, name: str) -> None:
        event(f"{kind}StateEntered", stateEnteredEventDetails={"name": name})

    def exited(kind: str, name: str) -> None:
        event(f"{kind}StateExited", stateExitedEventDetails={"name": name})

    event("ExecutionStarted")
    entered("Parallel", "Ingest stage")
    event("ParallelStateStarted")
    entered("Task", "Select images")
    event("LambdaFunctionScheduled")
    event("LambdaFunctionFailed", lambdaFunctionFailedEventDetails={"error": "Lambda.ServiceException", "cause": "x"})
    event("LambdaFunctionScheduled")
    event("LambdaFunctionSucceeded")
    exited("Task", "Select images")
    entered("Task", "Copy batch")
    event("TaskScheduled")
    event("TaskFailed", taskFailedEventDetails={"error": "S3.NoSuchKey", "cause": "no such key"})
    exited("Task", "Copy batch")  # caught: the state exits into its Catch's Next
    entered("Pass", "Note copy failure")
    exited("Pass", "Note copy failure")
    event("ParallelStateSucceeded")
    exited("Parallel", "Ingest stage")
    entered("Parallel", "Deploy stage")
    event("ParallelStateStarted")
    entered("Choice", "Endpoint ready?")
    exited("Choice", "Endpoint ready?")
    entered("Fail", "Endpoint failed")
    event("ParallelStateFailed")
    exited("Parallel", "Deploy stage")  # the stage's Catch took the failure
    entered("Pass", "Record deploy failure")
    exited("Pass", "Record deploy failure")
    entered("Fail", "Pipeline failed")
    event("ExecutionFailed", executionFailedEventDetails={
        "error": "EndpointFailed", "cause": "deploy stage failed: Endpoint invmon-dev-counter is OutOfService"})

    status = {s.name: s.status for s in aws.execution_steps(events)}
    assert status == {
        "Ingest stage": "succeeded", "Select images": "succeeded", "Copy batch": "failed",
        "Note copy failure": "succeeded", "Deploy stage": "failed", "Endpoint ready?": "succeeded",
        "Endpoint failed": "failed", "Record deploy failure": "succeeded", "Pipeline failed": "failed",
    }
    steps = {s.name: s for s in aws.execution_steps(events)}
    assert steps["Copy batch"].detail == "S3.NoSuchKey: no such key"
    assert steps["Select images"].detail == ""
    assert steps["Pipeline failed"].detail.startswith("EndpointFailed: deploy stage failed: Endpoint")


def test_watch_polls_until_the_execution_ends():
    deployment = aws.Deployment(stack_name="x", session=boto3.session.Session(region_name="us-east-1"))
    client = deployment.client("stepfunctions")
    stubber = Stubber(client)
    arn = "arn:aws:states:us-east-1:123456789012:execution:invmon:run"
    t0 = datetime(2026, 11, 25, tzinfo=UTC)
    for status in ("RUNNING", "SUCCEEDED"):
        stubber.add_response("describe_execution", {
            "executionArn": arn, "stateMachineArn": arn, "status": status, "startDate": t0})
        stubber.add_response("get_execution_history", {"events": [
            {"timestamp": t0, "type": "PassStateEntered", "id": 1, "stateEnteredEventDetails": {"name": "Prepare"}}]})
    sleeps = []
    with stubber:
        statuses = [status for status, _ in aws.watch_execution(deployment, arn, interval=5, sleep=sleeps.append)]
    assert statuses == ["RUNNING", "SUCCEEDED"]
    assert sleeps == [5]


def test_count_uploads_with_the_expected_count_and_reads_the_record(deployed, sample_dir: Path):
    photo = sample_dir / "bin-images" / "01046.jpg"
    key, version = aws.upload_photo(deployed, photo, expected=4)
    head = deployed.client("s3").head_object(Bucket=BUCKET, Key=key)
    assert key == "incoming/01046.jpg"
    assert head["Metadata"] == {"expected-count": "4"}
    # The count Lambda writes this record in AWS; here the test plays its part.
    deployed.client("dynamodb").put_item(TableName=TABLE, Item={
        "pk": {"S": photo_pk(key)}, "sk": {"S": version_sk(version)}, "status": {"S": "match"},
        "count": {"N": "4"}, "expectedCount": {"N": "4"}, "confidence": {"N": "0.81"}})
    record = aws.wait_for_count(deployed, key, version, timeout=1, sleep=lambda _: None)
    assert record["status"] == "match"
    assert record["count"] == 4


def test_count_gives_up_with_a_pointer_to_the_logs(deployed):
    with pytest.raises(aws.CliError, match=r"no count for incoming/x\.jpg after 0 s: see the count Lambda's logs"):
        aws.wait_for_count(deployed, "incoming/x.jpg", None, timeout=0, sleep=lambda _: None)


def test_costs_without_a_report_says_how_to_make_one(deployed):
    with pytest.raises(aws.CliError, match="invmon costs --refresh"):
        aws.latest_cost_report(deployed)


def test_costs_prints_the_latest_report(deployed, monkeypatch, capsys):
    report = {"project": "invmon", "start": "2026-11-18", "end": "2026-11-25", "currency": "USD", "total": 15.76,
              "by_service": {"Amazon SageMaker": 15.5, "AWS Lambda": 0.26}, "daily": [],
              "training_jobs": [{"job_name": "a"}], "spot_saved_percent": 65.0}
    deployed.client("s3").put_object(Bucket=BUCKET, Key="reports/costs/latest.json", Body=json.dumps(report))
    monkeypatch.setattr(aws, "Deployment", lambda stack_name, **_: deployed)
    assert main(["costs"]) == 0
    out = capsys.readouterr().out
    assert "invmon 2026-11-18 .. 2026-11-25: 15.76 USD" in out
    assert "Amazon SageMaker  15.50" in out
    assert "spot capacity saved 65.0 % of training time over 1 spot job(s)" in out


def test_status_shows_the_trainers_health_findings_on_the_report_step():
    t0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    health = {"status": "warning", "findings": [
        {"check": "overfitting", "severity": "warning", "epoch": 9, "message": "validation loss rose"},
        {"check": "data_starvation", "severity": "warning", "epoch": 1, "message": "41% of step time"}]}
    output = json.dumps({"training": {"jobName": "invmon-dev-1", "health": health}})
    history = [
        {"timestamp": t0, "type": "TaskStateEntered", "id": 1,
         "stateEnteredEventDetails": {"name": aws.TRAINING_REPORT_STATE}},
        {"timestamp": t0 + timedelta(seconds=3), "type": "TaskStateExited", "id": 2,
         "stateExitedEventDetails": {"name": aws.TRAINING_REPORT_STATE, "output": output}},
    ]
    (step,) = aws.execution_steps(history)
    assert step.detail == "health warning: overfitting (epoch 9), data_starvation (epoch 1)"


def test_the_report_state_named_by_the_cli_is_the_one_the_pipeline_runs():
    from aws_cdk.assertions import Template

    from tests.infra.conftest import definition_of, synth_stack

    machines = Template.from_stack(synth_stack()).find_resources("AWS::StepFunctions::StateMachine")
    definitions = json.dumps([definition_of(machine) for machine in machines.values()])
    assert f'"{aws.TRAINING_REPORT_STATE}"' in definitions
