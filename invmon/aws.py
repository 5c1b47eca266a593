"""Talking to a deployed invmon stack: its outputs, its pipeline, its counts and its cost report.

Every function takes its boto3 clients from a :class:`Deployment`, so tests hand in moto- or Stubber-backed
clients and the CLI hands in real ones. Problems a user can fix (no credentials, no such stack, a stack
without the expected output) become :class:`CliError` with the fix in the message.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
    ReadTimeoutError,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)

from lambdas.count.records import photo_pk, version_sk

DEFAULT_STACK = "Invmon-dev"
DEFAULT_STAGE = "dev"
# The stack outputs the CLI reads (infra/stack.py writes them).
OUTPUTS = {
    "bucket": "DataBucketName",
    "incoming_prefix": "IncomingPrefix",
    "state_machine": "StateMachineArn",
    "table": "CountsTableName",
    "endpoint": "EndpointName",
    "dashboard": "DashboardUrl",
    "cost_function": "CostReportFunctionName",
    "count_dlq": "CountDeadLetterQueueUrl",
}


# The training stage's report state (infra/training.py): its output's ``training.health`` is what the trainer
# found about its own run (ml/health.py).
TRAINING_REPORT_STATE = "RecordTraining"


class CliError(RuntimeError):
    """A problem the user can fix; the message says how."""


NO_CREDENTIALS = ("no AWS credentials found: run `aws configure` or `aws sso login`, or name a profile that has "
                  "them with --profile or AWS_PROFILE")
# What AWS answers for credentials that were good once: a session token past its expiry, a signed request too old.
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired"}
_REJECTED = {"InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
             "InvalidSignatureException", "IncompleteSignature", "AuthFailure"}


def explain(error: BotoCoreError | ClientError) -> str:
    """One line that says what went wrong with an AWS call and what to do about it."""
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        if code in _EXPIRED:
            return (f"the AWS session has expired ({code}): renew it (`aws sso login`, or fresh "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN) and run the command again")
        if code in _REJECTED:
            return f"AWS did not accept these credentials ({code}): check AWS_PROFILE or the AWS_* variables"
        if "AccessDenied" in code:
            return f"AWS refused {error.operation_name} ({code}): {message}"
        return f"{error.operation_name} failed ({code}): {message}"
    if isinstance(error, NoCredentialsError):
        return NO_CREDENTIALS
    if isinstance(error, TokenRetrievalError | UnauthorizedSSOTokenError | SSOTokenLoadError):
        return f"the AWS SSO session has expired or was never started: run `aws sso login` ({error})"
    if isinstance(error, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return (f"cannot reach AWS at {error.kwargs.get('endpoint_url', 'its endpoint')}: check the network "
                "connection, AWS_REGION, and AWS_ENDPOINT_URL if it is set")
    return f"the AWS call failed: {error}"


def stack_name(stage: str, project: str = "invmon") -> str:
    """The stack app.py names for a stage: ``<Project>-<stage>`` (Invmon-dev, Invmon-prod)."""
    return f"{project.capitalize()}-{stage}"


NO_REGION = ("no AWS region set: pass --region, export AWS_REGION (or AWS_DEFAULT_REGION), or use a profile "
             "with a region (--profile or AWS_PROFILE)")


def resolve_region(region: str | None, session: boto3.session.Session,
                   environ: Mapping[str, str] | None = None) -> str | None:
    """The region the way the AWS CLI and SDKs choose it: ``--region``, then ``AWS_REGION``, then
    ``AWS_DEFAULT_REGION``, then the profile's ``region`` (docs.aws.amazon.com/sdkref/latest/guide/
    feature-region.html: AWS_REGION is the SDKs' variable, AWS_DEFAULT_REGION the CLI's; botocore 1.x reads only
    the second, so the first is applied here)."""
    environ = os.environ if environ is None else environ
    for value in (region, environ.get("AWS_REGION"), environ.get("AWS_DEFAULT_REGION")):
        if value and value.strip():
            return value.strip()
    return session.region_name


def make_session(*, region: str | None = None, profile: str | None = None) -> boto3.session.Session:
    """A boto3 session for ``--profile`` (or AWS_PROFILE) in the region :func:`resolve_region` picks."""
    try:
        session = boto3.session.Session(profile_name=profile or None)
        chosen = resolve_region(region, session)
        if chosen and chosen != session.region_name:
            session = boto3.session.Session(profile_name=profile or None, region_name=chosen)
    except ProfileNotFound:
        name = profile or os.environ.get("AWS_PROFILE", "")
        raise CliError(f"no AWS profile named {name!r} in the AWS config or credentials file: list them with "
                       f"`aws configure list-profiles`, or create it with `aws configure --profile {name}`"
                       ) from None
    return session


@dataclass
class Deployment:
    stack_name: str = DEFAULT_STACK
    session: boto3.session.Session = field(default_factory=boto3.session.Session)
    _outputs: dict[str, str] | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            try:
                self._clients[service] = self.session.client(service)
            except NoRegionError:
                raise CliError(NO_REGION) from None
        return self._clients[service]

    def output(self, name: str) -> str:
        if self._outputs is None:
            self._outputs = stack_outputs(self.client("cloudformation"), self.stack_name)
        key = OUTPUTS[name]
        if key not in self._outputs:
            raise CliError(
                f"stack {self.stack_name} has no output {key}: it predates this invmon version; "
                "deploy it again with `npx cdk deploy`"
            )
        return self._outputs[key]


def stack_outputs(cloudformation: Any, stack_name: str) -> dict[str, str]:
    try:
        (stack,) = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except NoCredentialsError:
        raise CliError(NO_CREDENTIALS) from None
    except ClientError as error:
        if "does not exist" in str(error):
            region = cloudformation.meta.region_name
            raise CliError(
                f"stack {stack_name} not found in {region}: deploy it with `npx cdk deploy`, "
                "or name another with --stage or --stack"
            ) from None
        raise
    return {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs", [])}


# --- pipeline ---------------------------------------------------------------------------------------------


def start_pipeline(deployment: Deployment, execution_input: dict[str, Any], name: str | None = None) -> str:
    request = {"stateMachineArn": deployment.output("state_machine"), "input": json.dumps(execution_input)}
    if name:
        request["name"] = name
    return deployment.client("stepfunctions").start_execution(**request)["executionArn"]


def latest_execution(deployment: Deployment) -> str:
    executions = deployment.client("stepfunctions").list_executions(
        stateMachineArn=deployment.output("state_machine"), maxResults=1
    )["executions"]
    if not executions:
        raise CliError("the pipeline has never run: start it with `invmon pipeline start`")
    return executions[0]["executionArn"]


@dataclass
class StepProgress:
    name: str
    status: str  # running | succeeded | failed
    started: datetime
    ended: datetime | None = None
    detail: str = ""  # a failed step: the error and the reason a person can read
    cause: str = ""  # a failed step: the whole cause, as Step Functions recorded it (--verbose)

    @property
    def seconds(self) -> float:
        return ((self.ended or datetime.now(self.started.tzinfo)) - self.started).total_seconds()


# GetExecutionHistory's event types (Step Functions API reference, HistoryEvent.type). A state's own failure:
# the task (or the Lambda/activity it ran) failed or timed out. The state may still exit afterwards, when a Catch
# handled the error, or run again, when a Retry did: a retry shows as a new Scheduled/Started event.
_TASK_FAILURES = frozenset({
    "TaskFailed", "TaskTimedOut", "TaskStartFailed", "TaskSubmitFailed",
    "LambdaFunctionFailed", "LambdaFunctionTimedOut", "LambdaFunctionStartFailed", "LambdaFunctionScheduleFailed",
    "ActivityFailed", "ActivityTimedOut", "ActivityScheduleFailed",
})
_TASK_RETRIES = frozenset({"TaskScheduled", "LambdaFunctionScheduled", "ActivityScheduled"})
# A Parallel or Map state failed as a whole (a branch or the tolerated failure count failed); its branch states
# that are still open failed with it.
_CONTAINER_FAILURES = {"ParallelStateFailed": "Parallel", "MapStateFailed": "Map", "MapRunFailed": "Map",
                       "MapRunAborted": "Map", "ParallelStateAborted": "Parallel", "MapStateAborted": "Map"}
_CONTAINER_RETRIES = {"ParallelStateStarted": "Parallel", "MapStateStarted": "Map"}
_EXECUTION_ENDS = frozenset({"ExecutionFailed", "ExecutionTimedOut", "ExecutionAborted"})


def execution_steps(history: list[dict[str, Any]]) -> list[StepProgress]:
    """Each state the execution entered, in order, with its status, from GetExecutionHistory events.

    A state that failed stays failed when a Catch handled its error and it then exited (that exit is what AWS
    records for a caught error), and so does a stage whose Parallel failed; a Retry that runs it again makes it
    running again."""
    steps: dict[str, StepProgress] = {}
    kinds: dict[str, str] = {}  # state name -> its type, from the *StateEntered event type
    order: list[str] = []
    open_states: list[str] = []  # entered and not exited, innermost last
    last_failure: dict[str, str] = {}

    def innermost(kind: str) -> StepProgress | None:
        name = next((n for n in reversed(open_states) if kinds[n] == kind), None)
        return steps[name] if name else None

    def fail(step: StepProgress, event: dict[str, Any], details: dict[str, str]) -> None:
        step.status = "failed"
        step.ended = event["timestamp"]
        step.cause = details.get("cause", "")
        step.detail = f"{details.get('error', '')}: {failure_reason(step.cause)}".strip(": ")

    for event in history:
        kind = event["type"]
        details = next((value for key, value in event.items() if key.endswith("EventDetails")), {})
        if kind.endswith("StateEntered"):
            name = event["stateEnteredEventDetails"]["name"]
            if name not in steps:
                order.append(name)
            steps[name] = StepProgress(name=name, status="running", started=event["timestamp"])
            kinds[name] = kind.removesuffix("StateEntered")
            if name in open_states:
                open_states.remove(name)
            open_states.append(name)
        elif kind.endswith("StateExited"):
            name = event["stateExitedEventDetails"]["name"]
            if name in open_states:
                open_states.remove(name)
            if name in steps:
                steps[name].ended = event["timestamp"]
                if steps[name].status == "running":
                    steps[name].status = "succeeded"
                if name == TRAINING_REPORT_STATE:
                    steps[name].detail = health_detail(event["stateExitedEventDetails"].get("output"))
        elif kind in _TASK_FAILURES:
            last_failure = details
            if step := innermost("Task"):
                fail(step, event, details)
        elif kind in _TASK_RETRIES:
            if (step := innermost("Task")) and step.status == "failed":
                step.status, step.ended, step.detail, step.cause = "running", None, "", ""
        elif kind in _CONTAINER_FAILURES:
            details = details or last_failure  # ParallelStateFailed carries no details: its branch's failure
            last_failure = details
            if step := innermost(_CONTAINER_FAILURES[kind]):
                for name in open_states[open_states.index(step.name):]:
                    if steps[name].status == "running" or name == step.name:
                        fail(steps[name], event, details)
        elif kind in _CONTAINER_RETRIES:
            if (step := innermost(_CONTAINER_RETRIES[kind])) and step.status == "failed":
                step.status, step.ended, step.detail, step.cause = "running", None, "", ""
        elif kind in _EXECUTION_ENDS:
            # Every state still open was cut short, a Fail state (which never exits) included.
            for name in open_states:
                fail(steps[name], event, details or last_failure)
    return [steps[name] for name in order]


def failure_reason(cause: str) -> str:
    """The sentence a person needs from a Step Functions cause, which often wraps a whole JSON document: a
    Lambda's error (``errorType``/``errorMessage`` with its stack trace) or ~6 KB of DescribeTrainingJob with
    the ``FailureReason`` buried inside, behind the stage's "<stage> stage failed: " prefix."""
    prefix, brace, rest = cause.partition("{")
    if brace:
        try:
            document = json.loads(brace + rest)
        except ValueError:
            document = None
        if isinstance(document, dict):
            if isinstance(document.get("Cause"), str):  # a cause re-wrapped by a Parallel or Catch
                return prefix + failure_reason(document["Cause"])
            reason = document.get("FailureReason") or document.get("errorMessage")
            if isinstance(reason, str) and reason:
                kind = document.get("errorType")
                job = next((document[key] for key in ("TrainingJobName", "HyperParameterTuningJobName",
                                                      "EndpointName") if isinstance(document.get(key), str)), None)
                return (f"{prefix}{kind + ': ' if kind else ''}{reason.strip()}"
                        f"{f' ({job})' if job else ''}")
    lines = cause.strip().splitlines()
    return lines[0] if lines else ""


def health_detail(output: str | None) -> str:
    """One line from the report state's output: the trainer's health status and the checks that fired."""
    try:
        health = (json.loads(output or "{}").get("training") or {}).get("health")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(health, dict):
        return ""
    findings = [f"{f.get('check')} (epoch {f.get('epoch')})" for f in health.get("findings") or []]
    return f"health {health.get('status')}" + (": " + ", ".join(findings) if findings else "")


def execution_progress(deployment: Deployment, execution_arn: str) -> tuple[str, list[StepProgress]]:
    sfn = deployment.client("stepfunctions")
    status = sfn.describe_execution(executionArn=execution_arn)["status"]
    history: list[dict[str, Any]] = []
    for page in sfn.get_paginator("get_execution_history").paginate(executionArn=execution_arn):
        history += page["events"]
    return status, execution_steps(history)


def watch_execution(
    deployment: Deployment, execution_arn: str, *, interval: float = 15.0, sleep: Callable[[float], None] = time.sleep
) -> Iterator[tuple[str, list[StepProgress]]]:
    while True:
        status, steps = execution_progress(deployment, execution_arn)
        yield status, steps
        if status != "RUNNING":
            return
        sleep(interval)


# --- counting ---------------------------------------------------------------------------------------------


def upload_photo(deployment: Deployment, photo: Path, *, expected: int | None = None) -> tuple[str, str | None]:
    """Upload under the incoming prefix; returns the key and the version the count record will carry."""
    if not photo.is_file():
        raise CliError(f"{photo}: no such file")
    key = f"{deployment.output('incoming_prefix')}{photo.name}"
    extra: dict[str, Any] = {"Metadata": {"expected-count": str(expected)}} if expected is not None else {}
    response = deployment.client("s3").put_object(
        Bucket=deployment.output("bucket"), Key=key, Body=photo.read_bytes(), **extra
    )
    return key, response.get("VersionId")


def wait_for_count(
    deployment: Deployment,
    key: str,
    version_id: str | None,
    *,
    timeout: float = 180.0,
    interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the counts table until the upload's record appears."""
    dynamodb = deployment.client("dynamodb")
    key_item = {"pk": {"S": photo_pk(key)}, "sk": {"S": version_sk(version_id)}}
    table = deployment.output("table")
    deadline = time.monotonic() + timeout
    while True:
        item = dynamodb.get_item(TableName=table, Key=key_item, ConsistentRead=True).get("Item")
        if item:
            return _plain(item)
        if time.monotonic() >= deadline:
            raise CliError(
                f"no count for {key} after {timeout:.0f} s: see the count Lambda's logs and the dead-letter queue"
            )
        sleep(interval)


def invoke_endpoint(deployment: Deployment, photo: Path) -> dict[str, Any]:
    body = photo.read_bytes()
    content_type = "image/png" if body.startswith(b"\x89PNG") else "image/jpeg"
    response = deployment.client("sagemaker-runtime").invoke_endpoint(
        EndpointName=deployment.output("endpoint"), ContentType=content_type, Accept="application/json", Body=body
    )
    return json.loads(response["Body"].read())


# --- the count dead-letter queue -------------------------------------------------------------------------


@dataclass
class DeadLetter:
    message_id: str
    keys: list[str]
    receives: int
    sent: datetime | None


def _uploads(body: str) -> list[str]:
    """The object keys an S3 notification names (URL-encoded in the message), or what the body starts with."""
    from urllib.parse import unquote_plus

    try:
        records = json.loads(body).get("Records", [])
        return [unquote_plus(r["s3"]["object"]["key"]) for r in records if "s3" in r]
    except (ValueError, AttributeError, KeyError, TypeError):
        return [f"(not an S3 notification) {body[:60]}"]


# How long a listed page stays hidden while the rest is read; each is made visible again at once afterwards, and
# SQS does so by itself after this long if the listing is cut short.
LISTING_VISIBILITY_SECONDS = 30


def dead_letters(deployment: Deployment, *, limit: int = 100) -> tuple[int, list[DeadLetter]]:
    """(approximate depth, up to ``limit`` messages) of the count DLQ, every message left in the queue.

    A receive with a zero visibility timeout returns a sample that may repeat the same ten messages forever
    (short polling reads a subset of SQS's servers: SQS Developer Guide, "Amazon SQS short and long polling").
    So each page is received with long polling and hidden for LISTING_VISIBILITY_SECONDS, which makes the next
    receive return other messages, until a receive finds none; then every listed message is made visible again
    at once (ChangeMessageVisibility to 0). Nothing is consumed: a message's receive count grows by one.
    """
    sqs, url = deployment.client("sqs"), deployment.output("count_dlq")
    depth = int(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
                ["Attributes"]["ApproximateNumberOfMessages"])
    found: dict[str, DeadLetter] = {}
    handles: dict[str, str] = {}
    try:
        while len(found) < limit:
            messages = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=min(10, limit - len(found)),
                VisibilityTimeout=LISTING_VISIBILITY_SECONDS, MessageSystemAttributeNames=["All"],
                WaitTimeSeconds=1).get("Messages", [])
            if not messages:
                break
            for message in messages:
                handles[message["MessageId"]] = message["ReceiptHandle"]
                attributes = message.get("Attributes", {})
                sent = attributes.get("SentTimestamp")
                found[message["MessageId"]] = DeadLetter(
                    message_id=message["MessageId"], keys=_uploads(message["Body"]),
                    receives=int(attributes.get("ApproximateReceiveCount", 0)),
                    sent=datetime.fromtimestamp(int(sent) / 1000).astimezone() if sent else None)
    finally:
        release = [{"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                   for i, handle in enumerate(handles.values())]
        for start in range(0, len(release), 10):  # ChangeMessageVisibilityBatch takes at most 10 entries
            sqs.change_message_visibility_batch(QueueUrl=url, Entries=release[start:start + 10])
    return depth, list(found.values())


def redrive_dead_letters(deployment: Deployment) -> str:
    """Move every message of the count DLQ back to the uploads queue (SQS StartMessageMoveTask: with no
    destination, messages return to the queue they came from); returns the task handle."""
    sqs, url = deployment.client("sqs"), deployment.output("count_dlq")
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    try:
        return sqs.start_message_move_task(SourceArn=arn)["TaskHandle"]
    except ClientError as error:
        if "already" in str(error).lower() or error.response["Error"]["Code"] == "UnsupportedOperation":
            raise CliError(f"the dead-letter queue cannot be redriven now: {error.response['Error']['Message']}"
                           ) from None
        raise


def _plain(item: dict[str, Any]) -> dict[str, Any]:
    from boto3.dynamodb.types import TypeDeserializer

    deserializer = TypeDeserializer()
    return {key: deserializer.deserialize(value) for key, value in item.items()}


# --- costs ------------------------------------------------------------------------------------------------


def latest_cost_report(deployment: Deployment, *, refresh: bool = False) -> dict[str, Any]:
    if refresh:
        response = deployment.client("lambda").invoke(
            FunctionName=deployment.output("cost_function"), Payload=json.dumps({}).encode()
        )
        if response.get("FunctionError"):
            raise CliError(f"the cost report failed: {response['Payload'].read().decode()[:500]}")
    try:
        body = deployment.client("s3").get_object(Bucket=deployment.output("bucket"), Key="reports/costs/latest.json")
    except ClientError as error:
        if error.response["Error"]["Code"] in {"NoSuchKey", "404"}:
            raise CliError("no cost report yet: it runs weekly; make one now with `invmon costs --refresh`") from None
        raise
    return json.loads(body["Body"].read())
