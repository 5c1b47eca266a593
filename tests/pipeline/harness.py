"""The execution tests' SageMaker: jobs end with the outcome each scenario scripts (invmon/execution.py runs the
state machines; this is the part only the tests need)."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3

from invmon.execution import ACCOUNT, REGION, JobOutcome, SageMakerBridge


@dataclass
class Outcome(JobOutcome):
    """A scripted job's end, and what it leaves behind."""

    # What the trainer's metrics.json in output.tar.gz holds (the report Lambda reads it; the gate decides on it).
    metrics: dict[str, float] = field(default_factory=lambda: {"valid_accuracy": 0.6, "valid_rmse": 1.0})
    # A completed transform job's answer for each input key (written to S3OutputPath/<key>.out).
    answer: Callable[[str], Any] = lambda key: {}
    # Whether model.tar.gz holds code/inference.py, as ml/train.py writes it: a job stopped mid-run (spot
    # capacity that never came back) uploads what the model dir held, without it.
    serving_code: bool = True
    # The trainer's health.json in output.tar.gz (ml/health.py), where the scenario has one.
    health: dict[str, Any] | None = None


def served_answer(count: int = 3) -> bytes:
    """What the endpoint returns for one photo: ``ml/inference.py`` output_fn itself, on the shipped model's
    class layout (0-5 and "more than 5"), most of the probability on ``count``."""
    import torch

    from ml.inference import output_fn
    from ml.model import ModelConfig

    config = ModelConfig(num_classes=7, overflow=True, model_id="scripted")
    probabilities = torch.full((config.num_classes,), 0.05)
    probabilities[count] = 1 - 0.05 * (config.num_classes - 1)
    return output_fn({"probabilities": probabilities.unsqueeze(0), "config": config, "batch": False},
                     "application/json").encode()


@dataclass
class ScriptedSageMaker(SageMakerBridge):
    """Each job ends with ``outcome(action, request)``; a completed one writes the outputs its kind writes. An
    endpoint invocation (sagemaker-runtime InvokeEndpoint, ``scripted_endpoints``) is answered by
    ``endpoint_answer(endpoint name, request body)``: (HTTP status, body)."""

    outcome: Callable[[str, dict[str, Any]], Outcome] = lambda action, request: Outcome()
    endpoint_answer: Callable[[str, bytes], tuple[int, bytes]] = lambda name, body: (200, served_answer())
    invocations: list[tuple[str, bytes]] = field(default_factory=list)  # (endpoint, body) per InvokeEndpoint

    def finish(self, operation: str, request: dict[str, Any]) -> JobOutcome:
        action = operation[0].lower() + operation[1:]
        outcome = self.outcome(action, request)
        if operation == "CreateHyperParameterTuningJob":
            self._best_trial(boto3.client("sagemaker", region_name=REGION), request)
        # A job the .sync task returns (Completed, or Stopped where the task does not fail) left its outputs.
        if not outcome.fails_task and not outcome.timed_out and operation == "CreateTrainingJob":
            described = boto3.client("sagemaker", region_name=REGION).describe_training_job(
                TrainingJobName=request["TrainingJobName"])
            write_job_outputs(described["ModelArtifacts"]["S3ModelArtifacts"], outcome.metrics,
                              serving_code=outcome.serving_code, health=outcome.health)
        if outcome.status == "Completed" and operation == "CreateTransformJob":
            write_transform_outputs(request, outcome.answer)
        return outcome

    @staticmethod
    def _best_trial(sagemaker: Any, request: dict[str, Any]) -> None:
        """One trial of the tuning job, run as a training job from its TrainingJobDefinition, named as its best
        job: moto's tuning job names a fixed "FakeTrainingJobName" that DescribeTrainingJob cannot find."""
        from moto.sagemaker.models import sagemaker_backends

        definition = request["TrainingJobDefinition"]
        tuning_name = request["HyperParameterTuningJobName"]
        trial = f"{tuning_name}-001-0000abcd"[:63]
        copied = ("AlgorithmSpecification", "RoleArn", "InputDataConfig", "OutputDataConfig", "ResourceConfig",
                  "StoppingCondition", "EnableManagedSpotTraining", "CheckpointConfig", "EnableNetworkIsolation",
                  "EnableInterContainerTrafficEncryption", "VpcConfig")
        sagemaker.create_training_job(TrainingJobName=trial, HyperParameters=definition.get(
            "StaticHyperParameters", {}), **{k: definition[k] for k in copied if k in definition})
        trial_job = sagemaker.describe_training_job(TrainingJobName=trial)
        arn = trial_job["TrainingJobArn"]
        write_job_outputs(trial_job["ModelArtifacts"]["S3ModelArtifacts"], Outcome().metrics)
        job = sagemaker_backends[ACCOUNT][REGION].hyper_parameter_tuning_jobs[tuning_name]
        job.best_training_job = {
            "TrainingJobName": trial, "TrainingJobArn": arn, "TuningJobName": tuning_name,
            "TrainingJobStatus": "Completed", "TunedHyperParameters": {},
            "FinalHyperParameterTuningJobObjectiveMetric": {
                "MetricName": request["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"][
                    "MetricName"], "Value": 0.5},
        }


def write_job_outputs(model_artifact: str, metrics: dict[str, float], *, serving_code: bool = True,
                      health: dict[str, Any] | None = None) -> None:
    """A finished job's model.tar.gz (with the serving entry point ml/train.py writes, unless told otherwise)
    and, beside it, output.tar.gz holding the trainer's metrics.json."""
    bucket, key = model_artifact.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", region_name=REGION)

    def tarball(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, body in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        return buffer.getvalue()

    code = {"code/inference.py": b"from ml.inference import input_fn, model_fn, output_fn, predict_fn\n"}
    s3.put_object(Bucket=bucket, Key=key, Body=tarball({"model.pt": b"weights", **(code if serving_code else {})}))
    s3.put_object(Bucket=bucket, Key=key.rsplit("/", 1)[0] + "/output.tar.gz",
                  Body=tarball({"metrics.json": json.dumps(metrics).encode(),
                                **({"health.json": json.dumps(health).encode()} if health else {})}))


def write_transform_outputs(request: dict[str, Any], answer: Callable[[str], Any]) -> None:
    """What Batch Transform writes for a ManifestFile input: S3OutputPath/<key relative to the manifest's
    prefix>.out for each listed object (SageMaker developer guide, "Batch transform")."""
    s3 = boto3.client("s3", region_name=REGION)
    source = request["TransformInput"]["DataSource"]["S3DataSource"]
    assert source["S3DataType"] == "ManifestFile", "the bridge writes outputs for a ManifestFile input only"
    bucket, key = source["S3Uri"].removeprefix("s3://").split("/", 1)
    header, *keys = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    prefix = header["prefix"].removeprefix(f"s3://{bucket}/")
    out_bucket, out_prefix = request["TransformOutput"]["S3OutputPath"].removeprefix("s3://").split("/", 1)
    for relative in keys:
        s3.put_object(Bucket=out_bucket, Key=f"{out_prefix.rstrip('/')}/{relative}.out",
                      Body=json.dumps(answer(prefix + relative)).encode())


@contextlib.contextmanager
def scripted_endpoints(bridge: ScriptedSageMaker) -> Iterator[None]:
    """moto's InvokeEndpoint answers every call with a fixed "body" (or a queue set through its moto-api), which
    no photo would get from a model, and decodes every request body as UTF-8 before that (a JPEG fails with
    UnicodeDecodeError; measured on moto 5.2.5): while active, the body is kept raw, ``bridge.endpoint_answer``
    answers for an endpoint moto holds, and each call is recorded in ``bridge.invocations``."""
    from moto.core.exceptions import JsonRESTError
    from moto.sagemaker.models import sagemaker_backends
    from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

    original = SageMakerRuntimeResponse.invoke_endpoint

    def invoke_endpoint(response: Any) -> Any:
        name = response._get_param("EndpointName") or response.uri.split("/endpoints/")[1].split("/")[0]
        body = response.body if isinstance(response.body, bytes) else str(response.body).encode("latin-1")
        bridge.invocations.append((name, body))
        if name not in sagemaker_backends[ACCOUNT][REGION].endpoints:
            raise JsonRESTError("ValidationError", f"Endpoint {name} of account {ACCOUNT} not found.")
        status, answer = bridge.endpoint_answer(name, body)
        if status != 200:
            # How InvokeEndpoint reports a container's error status: ModelError (HTTP 424), with the original one.
            error = JsonRESTError("ModelError", f"Received server error ({status}) from primary")
            error.code = 424
            error.description = json.dumps({"__type": "ModelError", "message": error.message,
                                            "OriginalStatusCode": status,
                                            "OriginalMessage": answer.decode(errors="replace")})
            raise error
        return 200, {"Content-Type": "application/json"}, answer

    SageMakerRuntimeResponse.invoke_endpoint = invoke_endpoint
    SageMakerRuntimeResponse.use_raw_body = True
    try:
        yield
    finally:
        SageMakerRuntimeResponse.invoke_endpoint = original
        del SageMakerRuntimeResponse.use_raw_body
