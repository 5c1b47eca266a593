"""Run the synthesized state machines in moto's Step Functions interpreter, offline: the execution tests
(tests/pipeline) and ``invmon demo`` both run the pipeline through this module.

The app is synthesized (``cdk synth`` in-process, assets staged); a definition is taken from the template with
its references resolved to the names this module gives the resources, registered with moto's interpreter
(``mock_aws(config={"stepfunctions": {"execute_state_machine": True}})`` in tests, ``enable_interpreter`` for a
moto server running in this process), and executed. Lambda tasks run the real handlers in-process with each
function's template environment; SageMaker ``.sync`` tasks are answered by a ``SageMakerBridge`` subclass (the
tests' scripted outcomes, the demo's local trainer), after checking the request against botocore's model.

Every place where moto's interpreter differs from AWS is handled here and nowhere else, and each difference is
measured (by tests/pipeline/test_harness.py, or by an assertion where the stand-in is installed) so that a moto
that behaves otherwise fails loudly instead of silently changing what the tests and the demo exercise. Measured
on moto 5.2.5 (those marked * in test_harness.py):

- * its ASL grammar rejects ``ItemBatcher`` and an integer ``ToleratedFailurePercentage``: ``for_moto`` takes the
  batcher out (``ITEM_BATCHERS``) and ``interpreter`` batches the Map's items with it as AWS does (each item
  through the ItemSelector, then runs of MaxItemsPerBatch), and the percentage becomes a float;
- * a SageMaker ``.sync`` task fails at run time ("Unsupported sync callback procedure") before any mock is
  consulted: ``SageMakerBridge`` replaces the service for ``sagemaker`` resources;
- with no Docker engine moto cannot run Lambda code (with ``use_docker: False`` it echoes the event back):
  the interpreter's Lambda client is replaced with ``InProcessLambda``;
- * ``"RoleArn.$"`` inside Parameters stays a literal key: the bridge resolves such keys against the state's
  input before validating the request against botocore's model;
- * an error named ``States.*`` passed on by a Fail state, a Parallel or a Map crashes the execution (moto's
  CustomErrorName refuses the prefix): ``interpreter`` passes such names on as AWS does; and then a catch-all
  catches ``States.Runtime``, which AWS never does: ``Execution.assert_no_runtime_error`` fails a test whose
  history holds one;
- * a distributed Map succeeds whatever fails in it (no tolerance check), and its ResultWriter writes an empty
  manifest and no result files: ``complete_result_writer`` writes them from the batches the Lambda ran;
- * moto's SageMaker has no StopTrainingJob, StopHyperParameterTuningJob or UpdateEndpoint: stand-ins while
  ``interpreter`` is active; its tuning jobs name a fixed "FakeTrainingJobName" best job, which the tests'
  bridge replaces with a real trial; its endpoints are InService at once (``set_endpoint_status`` changes that);
- Wait and Retry delays are real seconds: ``for_moto`` scales them down;
- the interpreter's SDK tasks call ``http://localhost:$MOTO_PORT`` when moto is a server rather than a mock:
  ``enable_interpreter`` points that at the server and switches the interpreter on there.
"""

from __future__ import annotations

import contextlib
import copy
import filecmp
import importlib
import inspect
import io
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import boto3
import botocore.session
from botocore.validate import ParamValidator

ACCOUNT = "123456789012"
REGION = "us-east-1"
MEASURED_MOTO = "5.2.5"
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------- synthesis


@dataclass(frozen=True)
class Synthesized:
    template: dict[str, Any]
    assembly: Path

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.template["Resources"].items() if r["Type"] == kind}

    def logical_id(self, kind: str, prefix: str) -> str:
        (found,) = [k for k in self.resources(kind) if k.startswith(prefix)]
        return found

    def code_asset(self) -> Path:
        """The staged directory of the Lambda code asset that the pipeline's functions share."""
        keys = {r["Properties"]["Code"]["S3Key"] for r in self.resources("AWS::Lambda::Function").values()
                if str(r["Properties"].get("Handler", "")).startswith("lambdas.")}
        (key,) = keys
        return self.assembly / f"asset.{key.removesuffix('.zip')}"


def synthesize(outdir: Path) -> Synthesized:
    """The app as ``cdk synth`` builds it, with its assets staged under ``outdir``."""
    import aws_cdk as cdk

    from app import build_app
    from infra.config import default_context

    app = build_app(cdk.App(outdir=str(outdir), context=default_context()))
    assembly = app.synth()
    (stack,) = [s for s in assembly.stacks if s.stack_name.startswith("Invmon")]
    return Synthesized(template=stack.template, assembly=Path(assembly.directory))


def load_synthesized(outdir: Path) -> Synthesized:
    """The app as an earlier ``synthesize(outdir)`` (or ``cdk synth -o outdir``) left it."""
    (template,) = [path for path in outdir.glob("Invmon*.template.json")]
    return Synthesized(template=json.loads(template.read_text()), assembly=outdir)


def physical_name(logical_id: str) -> str:
    """The name a resource gets offline: its logical id, lower-cased (valid for S3 buckets and tables)."""
    return logical_id.lower()


def create_resources(synthesized: Synthesized) -> None:
    """The stack's buckets (versioned where the template says so) and tables, under their offline names."""
    s3 = boto3.client("s3", region_name=REGION)
    for logical_id, bucket in synthesized.resources("AWS::S3::Bucket").items():
        name = physical_name(logical_id)
        s3.create_bucket(Bucket=name)
        if bucket["Properties"].get("VersioningConfiguration", {}).get("Status") == "Enabled":
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    for logical_id, table in synthesized.resources("AWS::DynamoDB::Table").items():
        properties = table["Properties"]
        keys = ("KeySchema", "AttributeDefinitions", "GlobalSecondaryIndexes", "LocalSecondaryIndexes")
        dynamodb.create_table(TableName=physical_name(logical_id), BillingMode="PAY_PER_REQUEST",
                              **{k: properties[k] for k in keys if k in properties})


class Resolver:
    """Resolves CloudFormation intrinsics in the template to the names and ARNs used offline."""

    def __init__(self, template: dict[str, Any]) -> None:
        self.template = template

    def arn(self, logical_id: str) -> str:
        kind = self.template["Resources"][logical_id]["Type"]
        name = physical_name(logical_id)
        return {
            "AWS::Lambda::Function": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}",
            "AWS::IAM::Role": f"arn:aws:iam::{ACCOUNT}:role/{name}",
            "AWS::S3::Bucket": f"arn:aws:s3:::{name}",
            "AWS::DynamoDB::Table": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}",
            "AWS::StepFunctions::StateMachine": f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:{name}",
        }.get(kind, f"arn:aws:{kind.split('::')[1].lower()}:{REGION}:{ACCOUNT}:{name}")

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) != 1:
            return {k: self(v) for k, v in value.items()}
        ((key, arg),) = value.items()
        if key == "Ref":
            pseudo = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": ACCOUNT,
                      "AWS::URLSuffix": "amazonaws.com", "AWS::StackName": "Invmon-dev"}
            return pseudo.get(arg) or physical_name(arg)
        if key == "Fn::GetAtt":
            logical_id, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
            return self.arn(logical_id) if attribute == "Arn" else physical_name(logical_id)
        if key == "Fn::Join":
            separator, parts = arg
            return separator.join(str(self(p)) for p in self(parts))
        if key == "Fn::FindInMap":
            name, first, second = (self(a) for a in arg)
            return self.template["Mappings"][name][first][second]
        if key == "Fn::Select":
            index, items = arg
            return self(items)[int(self(index))]
        if key == "Fn::Split":
            separator, text = arg
            return str(self(text)).split(separator)
        if key == "Fn::Sub":
            text = arg if isinstance(arg, str) else arg[0]
            names = {} if isinstance(arg, str) else {k: self(v) for k, v in arg[1].items()}
            for token in {t.split("}")[0] for t in text.split("${")[1:]}:
                resolved = names.get(token) or self({"Ref": token} if "." not in token else {"Fn::GetAtt": token})
                text = text.replace("${" + token + "}", str(resolved))
            return text
        return {key: self(arg)}

    def definition(self, logical_id: str) -> dict[str, Any]:
        return json.loads(self(self.template["Resources"][logical_id]["Properties"]["DefinitionString"]))

    def environment(self, logical_id: str) -> dict[str, str]:
        variables = self.template["Resources"][logical_id]["Properties"].get("Environment", {}).get("Variables", {})
        return {k: str(self(v)) for k, v in variables.items()}


# -------------------------------------------------------------------------------------- definition rewrites


# Each Map state's ItemBatcher by the Map's name: moto's grammar rejects the field, so ``for_moto`` takes it out and
# records it here, and ``interpreter`` batches that Map's items with it as Step Functions does.
ITEM_BATCHERS: dict[str, dict[str, Any]] = {}
# Step Functions' default and largest MaxInputBytesPerBatch (developer guide, "ItemBatcher"): 256 KiB.
MAX_BATCH_BYTES = 256 * 1024


def for_moto(definition: dict[str, Any], *, start_at: str | None = None) -> dict[str, Any]:
    """The definition as moto's interpreter can run it: Wait and Retry delays scaled to (almost) nothing, the
    Map fields its grammar rejects rewritten, and optionally a later state to start at (a stage run alone, its
    input given as the state the earlier stages leave)."""
    rewritten = copy.deepcopy(definition)
    if start_at is not None:
        rewritten["StartAt"] = start_at
    rewritten.pop("TimeoutSeconds", None)

    def walk(states: dict[str, Any]) -> None:
        for name, state in states.items():
            if state["Type"] == "Wait":
                for key in ("Seconds", "SecondsPath", "Timestamp", "TimestampPath"):
                    state.pop(key, None)
                state["Seconds"] = 0
            for retry in state.get("Retry", []):
                retry["IntervalSeconds"] = 1
                retry["BackoffRate"] = 1.0
                retry.pop("JitterStrategy", None)
                retry.pop("MaxDelaySeconds", None)
            for branch in state.get("Branches", []):
                walk(branch["States"])
            processor = state.get("ItemProcessor") or state.get("Iterator")
            if processor:
                walk(processor["States"])
            if "ItemBatcher" in state:
                # moto's grammar rejects ItemBatcher: ``interpreter`` batches the items instead (batch_items).
                batcher = state.pop("ItemBatcher")
                assert set(batcher) <= {"MaxItemsPerBatch", "MaxInputBytesPerBatch", "BatchInput"}, \
                    f"{name}: batch_items does not handle {sorted(batcher)}"
                ITEM_BATCHERS[name] = batcher
            if isinstance(state.get("ToleratedFailurePercentage"), int):
                # moto's grammar rejects an integer percentage; the same number as a float parses.
                state["ToleratedFailurePercentage"] = float(state["ToleratedFailurePercentage"])

    walk(rewritten["States"])
    return rewritten


# ------------------------------------------------------------------------------------------- Lambda in-process


class LambdaContext:
    """What a Lambda runtime hands a handler; Powertools reads these attributes."""

    def __init__(self, name: str) -> None:
        self.function_name = name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"
        self.memory_limit_in_mb = 512
        self.aws_request_id = f"req-{time.monotonic_ns()}"
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = "local"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@dataclass
class Invocation:
    function: str
    event: Any
    result: Any = None
    error: str | None = None


@contextlib.contextmanager
def handler_output(log: TextIO) -> Iterator[None]:
    """Sends a handler's printing and its loggers' output to ``log``. Powertools' Logger keeps the stdout it saw
    at import (a ``StreamHandler``), which a stdout redirect alone does not reach."""
    real = sys.stdout
    moved = [handler for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
             for handler in getattr(logger, "handlers", [])
             if isinstance(handler, logging.StreamHandler) and handler.stream in (real, sys.__stdout__)]
    previous = [handler.setStream(log) for handler in moved]
    try:
        with contextlib.redirect_stdout(log):
            yield
    finally:
        for handler, stream in zip(moved, previous, strict=True):
            handler.setStream(stream)


@dataclass
class InProcessLambda:
    """Stands in for the interpreter's boto3 Lambda client: ``invoke`` imports the function's handler and calls
    it with the function's template environment, answering as Lambda does (``FunctionError: Unhandled`` and an
    ``errorType``/``errorMessage`` payload when the handler raises)."""

    functions: dict[str, tuple[str, dict[str, str]]]  # function name -> (handler, environment)
    invocations: list[Invocation] = field(default_factory=list)
    # Called after each invocation: a scenario changes the world there (an endpoint's status, say).
    after: Callable[[Invocation], None] = lambda invocation: None
    # Where the handlers' own printing goes (Lambda sends it to CloudWatch Logs): the caller's stdout if None.
    # Other threads that print meanwhile should hold their own reference to the real stdout.
    log: TextIO | None = None
    # A Map runs its iterations in threads, and each invocation swaps the process environment: one at a time.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def invoke(self, FunctionName: str, Payload: bytes | str | None = None, **kwargs: Any) -> dict[str, Any]:
        with self.lock:
            return self._invoke(FunctionName, Payload)

    def _invoke(self, FunctionName: str, Payload: bytes | str | None = None) -> dict[str, Any]:
        name = FunctionName.rsplit(":function:", 1)[-1].split(":")[0]
        handler_path, environment = self.functions[name]
        module_name, attribute = handler_path.rsplit(".", 1)
        event = json.loads(Payload or b"{}")
        complete_result_writer(event, self.invocations)
        invocation = Invocation(function=name, event=event)
        self.invocations.append(invocation)
        saved = dict(os.environ)
        os.environ.update(environment, AWS_REGION=REGION, AWS_LAMBDA_FUNCTION_NAME=name)
        try:
            handler = getattr(importlib.import_module(module_name), attribute)
            with handler_output(self.log) if self.log else contextlib.nullcontext():
                result = handler(copy.deepcopy(event), LambdaContext(name))
            body, error = json.dumps(result, default=str).encode(), None
        except Exception as exc:
            error = "Unhandled"
            invocation.error = f"{type(exc).__name__}: {exc}"
            body = json.dumps({"errorType": type(exc).__name__, "errorMessage": str(exc),
                               "stackTrace": traceback.format_tb(exc.__traceback__)}).encode()
            result = None
        finally:
            os.environ.clear()
            os.environ.update(saved)
        invocation.result = result
        self.after(invocation)
        response: dict[str, Any] = {"StatusCode": 200, "ExecutedVersion": "$LATEST", "Payload": io.BytesIO(body)}
        if error:
            response["FunctionError"] = error
        return response


# Where a step that reads a Distributed Map's results finds that Map's output, and which invocations are that
# Map's children: ingest's split at ``copy`` (copy batches, {"Items": [...]}), pack's finish at ``packed``
# (one shard each, {"ids": [...]}).
MAP_OUTPUTS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "copy": lambda event: "Items" in event,
    "packed": lambda event: "ids" in event,
}


def complete_result_writer(event: Any, invocations: list[Invocation]) -> None:
    """Writes what a Distributed Map's ResultWriter exports, before the step that reads it runs.

    moto's ResultWriter writes an empty manifest and no result files. Where an event carries a Map's
    ``ResultWriterDetails`` (at a key of ``MAP_OUTPUTS``), the manifest there is replaced with AWS's format
    (Step Functions developer guide, "ResultWriter"): ``ResultFiles`` by status, each file a JSON array of child
    executions with ``Input``, ``Output`` or ``Error``/``Cause``, and ``Status``; the child executions are the
    invocations of that Map's processor, each child's last attempt."""
    found = [(key, is_child) for key, is_child in MAP_OUTPUTS.items() if isinstance(event, dict)
             and (((event.get(key) or {}).get("ResultWriterDetails") or {}).get("Key"))]
    if not found:
        return
    ((key, is_child),) = found
    details = event[key]["ResultWriterDetails"]
    s3 = boto3.client("s3", region_name=REGION)
    written = json.loads(s3.get_object(Bucket=details["Bucket"], Key=details["Key"])["Body"].read())
    assert not written.get("ResultFiles", {}).get("SUCCEEDED"), "moto now writes Map results: drop the stand-in"
    last_attempt: dict[str, Invocation] = {}
    for invocation in invocations:
        if isinstance(invocation.event, dict) and is_child(invocation.event):
            last_attempt[json.dumps(invocation.event, sort_keys=True)] = invocation
    children: dict[str, list[dict[str, Any]]] = {"SUCCEEDED": [], "FAILED": []}
    for invocation in last_attempt.values():
        child: dict[str, Any] = {"Input": json.dumps(invocation.event)}
        if invocation.error is None:
            children["SUCCEEDED"].append({**child, "Status": "SUCCEEDED", "Output": json.dumps(invocation.result)})
        else:
            kind, _, message = invocation.error.partition(": ")
            children["FAILED"].append({**child, "Status": "FAILED", "Error": kind, "Cause": message})
    prefix = details["Key"].rsplit("/", 1)[0]
    files: dict[str, list[dict[str, Any]]] = {"SUCCEEDED": [], "FAILED": [], "PENDING": []}
    for status, executions in children.items():
        if executions:
            key = f"{prefix}/{status}_0.json"
            body = json.dumps(executions).encode()
            s3.put_object(Bucket=details["Bucket"], Key=key, Body=body)
            files[status].append({"Key": key, "Size": len(body)})
    s3.put_object(Bucket=details["Bucket"], Key=details["Key"], Body=json.dumps(
        {**written, "DestinationBucket": details["Bucket"], "ResultFiles": files}).encode())


def lambda_functions(synthesized: Synthesized, resolver: Resolver) -> dict[str, tuple[str, dict[str, str]]]:
    """Each Python function of the stack by the name the harness gives it: its handler and environment. The
    handlers are imported by module name after checking that the staged asset holds the very files that
    module name imports (the repository's ``lambdas`` package is the one already on ``sys.path``)."""
    asset = synthesized.code_asset()
    staged = [p.relative_to(asset) for p in asset.rglob("*.py")]
    mismatched = [str(p) for p in staged if not filecmp.cmp(asset / p, ROOT / p, shallow=False)]
    assert staged and not mismatched, f"the staged code asset differs from the checkout: {mismatched}"
    functions = {}
    for logical_id, resource in synthesized.resources("AWS::Lambda::Function").items():
        handler = str(resource["Properties"].get("Handler", ""))
        if handler.startswith("lambdas."):
            module = handler.rsplit(".", 1)[0]
            assert (asset / (module.replace(".", "/") + ".py")).is_file(), f"{handler} is not in the code asset"
            functions[physical_name(logical_id)] = (handler, resolver.environment(logical_id))
    return functions


# ------------------------------------------------------------------------------------ SageMaker .sync bridge

_SAGEMAKER_MODEL = botocore.session.get_session().get_service_model("sagemaker")


def validate_sagemaker_request(operation: str, request: dict[str, Any]) -> None:
    """Raises when ``request`` is not a valid ``operation`` request by botocore's SageMaker service model."""
    shape = _SAGEMAKER_MODEL.operation_model(operation).input_shape
    report = ParamValidator().validate(request, shape)
    if report.has_errors():
        raise AssertionError(f"{operation} request rejected by botocore's model:\n{report.generate_report()}")


@dataclass
class JobOutcome:
    """How a bridged SageMaker job ended: its status and, for a failure, its FailureReason."""

    status: str = "Completed"
    failure_reason: str = ""
    # Whether the .sync task fails on this end (States.TaskFailed, the Describe output as cause) or returns the
    # job as its output. None: it fails unless the job Completed. Step Functions' guide documents neither for a
    # Stopped job ("Run a Job (.sync)" says only that the task waits for the job), and botocore's
    # TrainingJobCompletedOrStopped waiter counts Stopped as success, so the tests run both.
    task_fails: bool | None = None
    # The task ran past its TimeoutSeconds: States.Timeout, which carries no cause.
    timed_out: bool = False

    @property
    def fails_task(self) -> bool:
        return self.status != "Completed" if self.task_fails is None else self.task_fails


# The jobs a bridge answers: boto3's name for the kind of job, and the request's name field (whose "...Name"
# becomes "...Status" in the Describe output).
_JOBS = {"CreateTrainingJob": ("training", "TrainingJobName"),
         "CreateHyperParameterTuningJob": ("hyper_parameter_tuning", "HyperParameterTuningJobName"),
         "CreateTransformJob": ("transform", "TransformJobName")}


@dataclass
class SageMakerBridge:
    """Answers ``arn:aws:states:::sagemaker:<action>.sync`` tasks. The request is checked against botocore's
    model, the job is created in moto's SageMaker (so DescribeTrainingJob finds it, as the report Lambda needs),
    then ``finish(operation, request)`` runs the job and says how it ended: a completed job's Describe output is
    the task's output; a failed one fails the task as Step Functions does, with the Describe output as its
    cause. Subclasses decide what running a job means (the tests' scripted outcomes, the demo's trainer)."""

    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # names given to StopTrainingJob / StopHyperParameterTuningJob
    updates: list[dict[str, Any]] = field(default_factory=list)  # UpdateEndpoint requests

    def finish(self, operation: str, request: dict[str, Any]) -> JobOutcome:
        """Runs the job that ``request`` describes, once moto knows it; writes what the job writes to S3."""
        raise NotImplementedError(f"this bridge runs no {operation} jobs")

    def run(self, action: str, request: dict[str, Any]) -> tuple[dict[str, Any], JobOutcome]:
        operation = action[0].upper() + action[1:]
        validate_sagemaker_request(operation, request)
        self.requests.append((operation, request))
        if operation not in _JOBS:
            raise AssertionError(f"the bridge does not answer sagemaker:{action}.sync")
        sagemaker = boto3.client("sagemaker", region_name=REGION)
        kind, name_key = _JOBS[operation]
        getattr(sagemaker, f"create_{kind}_job")(**request)
        outcome = self.finish(operation, request)
        if operation == "CreateTrainingJob":
            # moto completes every job at once; DescribeTrainingJob (the report step's read) must say how the job
            # really ended, as on AWS.
            from moto.sagemaker.models import sagemaker_backends

            job = sagemaker_backends[ACCOUNT][REGION].training_jobs[request[name_key]]
            job.training_job_status = job.secondary_status = outcome.status
            if outcome.failure_reason:
                job.failure_reason = outcome.failure_reason
        described = getattr(sagemaker, f"describe_{kind}_job")(**{name_key: request[name_key]})
        described[name_key.removesuffix("Name") + "Status"] = outcome.status
        if outcome.failure_reason:
            described["FailureReason"] = outcome.failure_reason
        described.pop("ResponseMetadata", None)
        return json.loads(json.dumps(described, default=str)), outcome


def resolve_literal_path_keys(parameters: Any, state_input: Any) -> Any:
    """moto 5.2.5 leaves some ``"Key.$"`` entries (``RoleArn.$``) unresolved; resolve them as AWS does."""
    from jsonpath_ng import parse  # moto[stepfunctions] depends on it

    if isinstance(parameters, list):
        return [resolve_literal_path_keys(p, state_input) for p in parameters]
    if not isinstance(parameters, dict):
        return parameters
    resolved = {}
    for key, value in parameters.items():
        if key.endswith(".$") and isinstance(value, str) and value.startswith("$"):
            matches = [m.value for m in parse(value).find(state_input)]
            assert matches, f"{key}: {value} not found in the state input"
            resolved[key[:-2]] = matches[0]
        else:
            resolved[key] = resolve_literal_path_keys(value, state_input)
    return resolved


def _bridge_service_class() -> type:
    from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
        FailureEvent,
        FailureEventException,
    )
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
        StatesErrorNameType,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import ResourceCondition
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_callback import (
        StateTaskServiceCallback,
    )
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails

    class BridgedSageMaker(StateTaskServiceCallback):
        bridge: SageMakerBridge

        def __init__(self) -> None:
            super().__init__(supported_integration_patterns={ResourceCondition.Sync})

        def _validate_service_integration_is_supported(self) -> None:
            # moto knows no SageMaker parameters; each request is checked against botocore's model instead.
            assert self.resource.api_action in {"createTrainingJob", "createHyperParameterTuningJob",
                                                "createTransformJob"}, \
                f"the bridge does not answer sagemaker:{self.resource.api_action}"

        def _eval_service_task(self, env, resource_runtime_part, normalised_parameters, state_credentials) -> None:
            request = resolve_literal_path_keys(normalised_parameters, env.states.get_input())
            described, outcome = self.bridge.run(self.resource.api_action, request)
            if outcome.timed_out:
                # States.Timeout has no cause on AWS either: the interpreter's own timeout event.
                raise FailureEventException(failure_event=self._get_timed_out_failure_event(env))
            if outcome.fails_task:
                # Step Functions fails a .sync task whose job failed with States.TaskFailed and the Describe
                # output as its cause. moto refuses a custom error named States.*, so the failure names
                # the interpreter's own States.TaskFailed.
                cause = json.dumps(described, separators=(",", ":"))
                raise FailureEventException(failure_event=FailureEvent(
                    env=env,
                    error_name=StatesErrorName(typ=StatesErrorNameType.StatesTaskFailed),
                    event_type=HistoryEventType.TaskFailed,
                    event_details=EventDetails(taskFailedEventDetails=TaskFailedEventDetails(
                        resourceType="sagemaker", resource=self.resource.api_action + ".sync",
                        error=TASK_FAILED_ERROR, cause=cause)),
                ))
            env.stack.append(described)

        def _eval_integration_pattern(self, env, resource_runtime_part, normalised_parameters,
                                      state_credentials) -> None:
            pass  # the job has already ended: its Describe output is on the stack

    return BridgedSageMaker


# The error a failed .sync job raises on AWS (Step Functions developer guide, "Run a job (.sync)").
TASK_FAILED_ERROR = "States.TaskFailed"


# ------------------------------------------------------------------------------------------------- patching


def batches_of(items: list[Any], batcher: dict[str, Any]) -> list[dict[str, Any]]:
    """Items grouped as Step Functions' ItemBatcher groups them: consecutive runs of at most MaxItemsPerBatch items
    and MaxInputBytesPerBatch bytes, each child's input ``{"Items": [...]}`` plus ``BatchInput`` where given."""
    max_items = batcher.get("MaxItemsPerBatch") or len(items) or 1
    max_bytes = min(batcher.get("MaxInputBytesPerBatch") or MAX_BATCH_BYTES, MAX_BATCH_BYTES)
    shared = {"BatchInput": batcher["BatchInput"]} if "BatchInput" in batcher else {}
    batches: list[dict[str, Any]] = []
    current: list[Any] = []
    for item in items:
        grown = {**shared, "Items": [*current, item]}
        if current and (len(current) == max_items or len(json.dumps(grown).encode()) > max_bytes):
            batches.append({**shared, "Items": current})
            current = []
        current.append(item)
    if current:
        batches.append({**shared, "Items": current})
    return batches


def _batching_map_run(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps moto's distributed Map run: a Map with an ItemBatcher (ITEM_BATCHERS) gets its items selected one by
    one (ItemSelector, with ``$$.Map.Item``), as AWS selects them, then batched; each child's input is a batch."""
    from moto.stepfunctions.parser.asl.eval.states import ItemData, MapData

    def map_run(self: Any, env: Any, eval_input: Any) -> Any:
        batcher = ITEM_BATCHERS.get(eval_input.state_name)
        if batcher is None:
            return original(self, env, eval_input)
        items = env.stack.pop()
        selector, map_input = eval_input.item_selector, env.stack[-1]
        selected = []
        frame = env.open_frame()
        try:
            for index, item in enumerate(items):
                if selector is None:
                    selected.append(item)
                    continue
                frame.states.context_object.context_object_data["Map"] = MapData(
                    Item=ItemData(Index=index, Value=item))
                frame.states.reset(input_value=map_input)
                frame.stack.append(map_input)
                selector.eval(frame)
                selected.append(frame.stack.pop())
        finally:
            env.close_frame(frame)
        eval_input.item_selector = None  # applied above, item by item; a child's input is its batch
        env.stack.append(batches_of(selected, batcher))
        return original(self, env, eval_input)

    return map_run


@contextlib.contextmanager
def interpreter(lambdas: InProcessLambda, bridge: SageMakerBridge) -> Iterator[None]:
    """moto's interpreter with Lambda invocations run in-process and SageMaker .sync tasks bridged."""
    from moto.core.responses import ActionResult
    from moto.sagemaker.exceptions import ValidationError
    from moto.sagemaker.models import sagemaker_backends
    from moto.sagemaker.responses import SageMakerResponse
    from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.error_name import ErrorName
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration import iteration_worker
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration.distributed_iteration_component import (
        DistributedIterationComponent,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_parallel import branches_decl
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils, state_task_factory
    from moto.stepfunctions.parser.asl.component.state.fail import state_fail

    for action in ("stop_training_job", "stop_hyper_parameter_tuning_job", "update_endpoint"):
        assert not hasattr(SageMakerResponse, action), f"moto now has {action}: drop its stand-in"

    service_class = _bridge_service_class()
    service_class.bridge = bridge
    original_client = lambda_eval_utils.boto_client_for
    original_factory = state_task_factory.state_task_service_for

    def client_for(service: str, *args: Any, **kwargs: Any) -> Any:
        return lambdas if service == "lambda" else original_client(service, *args, **kwargs)

    def service_for(service_name: str) -> Any:
        return service_class() if service_name == "sagemaker" else original_factory(service_name)

    def stop(parameter: str) -> Callable[[Any], Any]:
        # moto has no StopTrainingJob / StopHyperParameterTuningJob. A bridged job has always ended by the time
        # a stop is asked for, and SageMaker refuses to stop an ended job with a ValidationException.
        def respond(response: Any) -> Any:
            name = response._get_param(parameter)
            bridge.stopped.append(name)
            raise ValidationError(f"The job {name} has already ended and cannot be stopped")
        return respond

    class ReraisedErrorName(ErrorName):
        """An error passed on under its own name: by a Fail state's ErrorPath, by a Parallel whose branch
        failed, by a Map whose iteration failed. AWS passes a States.TaskFailed on as it is; moto builds these
        with CustomErrorName, which refuses any name that starts with States. and so crashes the execution."""

    reraisers = (state_fail, branches_decl, iteration_worker)

    def update_endpoint(response: Any) -> Any:
        # moto has no UpdateEndpoint: the blue/green update completes at once, on the new config.
        request = {k: response._get_param(k) for k in ("EndpointName", "EndpointConfigName", "DeploymentConfig")}
        bridge.updates.append(request)
        endpoint = sagemaker_backends[ACCOUNT][REGION].endpoints[request["EndpointName"]]
        endpoint.endpoint_config_name = request["EndpointConfigName"]
        endpoint.endpoint_status = "InService"
        return ActionResult({"EndpointArn": endpoint.arn})

    original_map_run = DistributedIterationComponent._map_run
    lambda_eval_utils.boto_client_for = client_for
    state_task_factory.state_task_service_for = service_for
    DistributedIterationComponent._map_run = _batching_map_run(original_map_run)
    SageMakerResponse.update_endpoint = update_endpoint
    for module in reraisers:
        module.CustomErrorName = ReraisedErrorName
    SageMakerResponse.stop_training_job = stop("TrainingJobName")
    SageMakerResponse.stop_hyper_parameter_tuning_job = stop("HyperParameterTuningJobName")
    try:
        yield
    finally:
        lambda_eval_utils.boto_client_for = original_client
        state_task_factory.state_task_service_for = original_factory
        DistributedIterationComponent._map_run = original_map_run
        del SageMakerResponse.stop_training_job, SageMakerResponse.stop_hyper_parameter_tuning_job
        del SageMakerResponse.update_endpoint
        for module in reraisers:
            module.CustomErrorName = CustomErrorName


# ------------------------------------------------------------------------------------------------ executions


@dataclass
class Execution:
    status: str
    output: Any
    error: str | None
    cause: str | None
    history: list[dict[str, Any]]

    def states_entered(self) -> list[str]:
        return [e["stateEnteredEventDetails"]["name"] for e in self.history if e["type"].endswith("StateEntered")]

    def runtime_errors(self) -> list[dict[str, Any]]:
        """Every States.Runtime failure: AWS never catches one, moto's catch-all does, so each is a test failure."""
        text = [e for e in self.history if "States.Runtime" in json.dumps(e, default=str)]
        return text

    def assert_no_runtime_error(self) -> None:
        assert self.runtime_errors() == [], json.dumps(self.runtime_errors(), default=str, indent=1)[:3000]


def start(sfn: Any, definition: dict[str, Any], execution_input: Any, *, name: str = "run") -> str:
    """Registers ``definition`` and starts one execution of it; returns the execution's ARN."""
    machine = sfn.create_state_machine(name=f"machine-{name}-{time.monotonic_ns()}",
                                       definition=json.dumps(definition),
                                       roleArn=f"arn:aws:iam::{ACCOUNT}:role/pipeline")["stateMachineArn"]
    return sfn.start_execution(stateMachineArn=machine, name=name, input=json.dumps(execution_input))["executionArn"]


def history(sfn: Any, arn: str) -> list[dict[str, Any]]:
    """The execution's whole history, page by page."""
    events: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {}
    while True:
        page = sfn.get_execution_history(executionArn=arn, maxResults=1000, **kwargs)
        events += page["events"]
        if not page.get("nextToken"):
            return events
        kwargs["nextToken"] = page["nextToken"]


def wait(sfn: Any, arn: str, *, timeout: float = 60.0, poll: float = 0.02,
         on_event: Callable[[dict[str, Any]], None] | None = None) -> Execution:
    """Waits for the execution to end; ``on_event`` sees each history event once, in order, as it appears."""
    deadline = time.monotonic() + timeout
    seen = 0

    def report() -> list[dict[str, Any]]:
        nonlocal seen
        events = history(sfn, arn)
        if on_event is not None:
            for event in events[seen:]:
                on_event(event)
        seen = len(events)
        return events

    while (described := sfn.describe_execution(executionArn=arn))["status"] == "RUNNING":
        assert time.monotonic() < deadline, f"execution still running after {timeout} s"
        if on_event is not None:
            report()
        time.sleep(poll)
    events = report()
    output = json.loads(described["output"]) if described.get("output") else None
    return Execution(status=described["status"], output=output, error=described.get("error"),
                     cause=described.get("cause"), history=events)


def run(sfn: Any, definition: dict[str, Any], execution_input: Any, *, name: str = "run",
        timeout: float = 60.0) -> Execution:
    """Registers ``definition`` and runs one execution of it to its end."""
    return wait(sfn, start(sfn, definition, execution_input, name=name), timeout=timeout)


def enable_interpreter(server_url: str) -> None:
    """Switches moto's interpreter on for a moto server running in this process (``mock_aws(config=...)`` does
    it for a mock), and points the interpreter's own SDK clients at that server: without a mock they call
    ``http://localhost:$MOTO_PORT`` (moto.stepfunctions.parser.asl.utils.boto_client)."""
    import urllib.request
    from urllib.parse import urlsplit

    from moto.stepfunctions.parser.asl.utils import boto_client

    assert "localhost:{moto_server_port()}" in inspect.getsource(boto_client.boto_client_for), \
        "moto's interpreter no longer calls localhost:$MOTO_PORT without a mock: revisit enable_interpreter"
    os.environ["MOTO_PORT"] = str(urlsplit(server_url).port)
    body = json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode()
    request = urllib.request.Request(f"{server_url}/moto-api/config", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201, response.status



def set_endpoint_status(endpoint_name: str, status: str, failure_reason: str | None = None) -> None:
    """Puts a moto endpoint in ``status``: moto's endpoints are InService from creation and it has no
    UpdateEndpoint, so a scenario that needs another status sets it on moto's model of the endpoint."""
    from moto.sagemaker.models import sagemaker_backends

    endpoint = sagemaker_backends[ACCOUNT][REGION].endpoints[endpoint_name]
    endpoint.endpoint_status = status
    endpoint.failure_reason = failure_reason
