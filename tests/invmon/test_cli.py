"""The CLI speaks in sentences (issue 16): every mistake a person can make at the command line, and every
AWS failure they can fix, ends in one line on stderr and exit status 1 (2 for usage), never a traceback."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from invmon import aws
from invmon.cli import main

ARN = "arn:aws:states:us-east-1:123456789012:execution:invmon:run-16"
T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> aws.Deployment:
    """A deployment whose clients are real botocore clients with fake keys; tests stub or redirect them."""
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_SESSION_TOKEN": "x",
                        "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    deployment = aws.Deployment(stack_name="Invmon-dev", session=boto3.session.Session(region_name="us-east-1"))
    monkeypatch.setattr(aws, "Deployment", lambda stack_name, **_: deployment)
    return deployment


def test_an_input_file_that_is_not_json_is_one_line(offline, tmp_path: Path, capsys) -> None:
    request = tmp_path / "input.json"
    request.write_text('{"training": {"epochs": 5,}}')
    assert main(["pipeline", "start", "--input", str(request)]) == 1
    line = one_line(capsys)
    assert line.startswith(f"invmon: {request}: not JSON (")
    assert line.endswith('the execution input is a JSON object such as {"training": {"epochs": 5}}')


def test_a_missing_input_file_is_one_line(offline, tmp_path: Path, capsys) -> None:
    assert main(["pipeline", "start", "--input", str(tmp_path / "nope.json")]) == 1
    assert one_line(capsys) == (f"invmon: {tmp_path / 'nope.json'}: no such file; --input takes a JSON file such "
                                'as {"training": {"epochs": 5}}')


@pytest.mark.parametrize("stack", ["", " ", "my stack", "1-starts-with-a-digit"])
def test_a_stack_name_cloudformation_cannot_have_is_a_usage_error(offline, capsys, stack: str) -> None:
    assert main(["pipeline", "status", "--stack", stack]) == 2
    assert one_line(capsys) == f"invmon: --stack: expected a stack name such as Invmon-dev, got {stack!r}"


def test_an_unreachable_endpoint_is_one_line(offline, monkeypatch, capsys) -> None:
    # Nothing listens on the discard port: botocore's real connection error, no network involved.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert main(["pipeline", "status"]) == 1
    assert one_line(capsys) == ("invmon: cannot reach AWS at http://127.0.0.1:9/: check the network connection, "
                                "AWS_REGION, and AWS_ENDPOINT_URL if it is set")


@pytest.mark.parametrize("code", ["ExpiredToken", "ExpiredTokenException", "RequestExpired"])
def test_an_expired_session_token_is_one_line_that_says_how_to_renew_it(offline, capsys, code: str) -> None:
    cloudformation = offline.client("cloudformation")
    stubber = Stubber(cloudformation)
    stubber.add_client_error("describe_stacks", service_error_code=code, http_status_code=400,
                             service_message="The security token included in the request is expired")
    with stubber:
        assert main(["costs"]) == 1
    assert one_line(capsys) == (f"invmon: the AWS session has expired ({code}): renew it (`aws sso login`, or fresh "
                                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN) and run the command again")


# --- failure causes a person can read ------------------------------------------------------------------

LAMBDA_CAUSE = json.dumps({
    "errorMessage": "training.hyperparameters.lr: must be greater than 0, got -0.1",
    "errorType": "TrainingInputError",
    "requestId": "0b1c2d3e-0000-4000-8000-000000000016",
    "stackTrace": ['  File "/var/task/lambdas/training/prepare.py", line 58, in handler\n'] * 12,
})
JOB_CAUSE = "Training stage failed: " + json.dumps({
    "TrainingJobName": "invmon-dev-261125100000-abc123",
    "TrainingJobStatus": "Failed",
    "SecondaryStatus": "Failed",
    "HyperParameters": {f"knob{i}": json.dumps("x" * 60) for i in range(40)},
    "AlgorithmSpecification": {"TrainingImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training",
                               "MetricDefinitions": [{"Name": f"m{i}", "Regex": "x" * 40} for i in range(6)]},
    "SecondaryStatusTransitions": [{"Status": "Downloading", "StatusMessage": "y" * 200}] * 8,
    "FailureReason": "AlgorithmError: ExecuteUserScriptError: Command \"/opt/conda/bin/python3.10 ml/train.py\" "
                     "exit status 1",
    "ResourceConfig": {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
})


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (LAMBDA_CAUSE, "TrainingInputError: training.hyperparameters.lr: must be greater than 0, got -0.1"),
        (JOB_CAUSE, "Training stage failed: AlgorithmError: ExecuteUserScriptError: Command \"/opt/conda/bin/"
                    "python3.10 ml/train.py\" exit status 1 (invmon-dev-261125100000-abc123)"),
        (json.dumps({"Error": "States.TaskFailed", "Cause": LAMBDA_CAUSE}), "TrainingInputError: training."
                                                                            "hyperparameters.lr: must be greater"),
        ("ingest stage failed: too many images failed\nsee the report", "ingest stage failed: too many images failed"),
    ],
)
def test_the_reason_is_taken_out_of_the_cause(cause: str, reason: str) -> None:
    assert len(JOB_CAUSE) > 5000  # about the size SageMaker's DescribeTrainingJob gives Step Functions
    assert aws.failure_reason(cause).startswith(reason)


def _failed_history(stubber: Stubber, cause: str) -> None:
    stubber.add_response("describe_execution", {"executionArn": ARN, "stateMachineArn": ARN, "status": "FAILED",
                                                "startDate": T0})
    stubber.add_response("get_execution_history", {"events": [
        {"timestamp": T0, "type": "TaskStateEntered", "id": 1, "stateEnteredEventDetails": {"name": "Train"}},
        {"timestamp": T0 + timedelta(seconds=90), "type": "ExecutionFailed", "id": 2,
         "executionFailedEventDetails": {"error": "States.TaskFailed", "cause": cause}},
    ]})


@pytest.mark.parametrize("verbose", [False, True])
def test_status_prints_the_failure_reason_first_and_the_whole_cause_only_when_asked(offline, capsys,
                                                                                    verbose: bool) -> None:
    stubber = Stubber(offline.client("stepfunctions"))
    _failed_history(stubber, JOB_CAUSE)
    with stubber:
        assert main(["pipeline", "status", "--execution", ARN, *(["--verbose"] if verbose else [])]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"{ARN}: FAILED"
    assert out[1] == ("failed at Train: States.TaskFailed: Training stage failed: AlgorithmError: "
                      "ExecuteUserScriptError: Command \"/opt/conda/bin/python3.10 ml/train.py\" exit status 1 "
                      "(invmon-dev-261125100000-abc123)")
    printed = "\n".join(out)
    assert ('"SecondaryStatusTransitions"' in printed) is verbose
    assert ("(the whole cause: add --verbose)" in printed) is not verbose
