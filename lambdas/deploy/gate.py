"""Deploy gate Lambda: decides whether the newly trained model replaces the one in service.

Input (from the state machine): ``{"training": $.training, "input": $.input, "execution": name}``; the
options are ``input.deploy`` (``force``, ``minImprovement``), absent for defaults. Output: the stage's
``$.deploy`` contract (decision, reasons, modelName, endpointName). The decision and its reasons are
written to ``reports/deploy/<execution>.json`` whatever they are.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from lambdas.deploy import plan
from lambdas.deploy.options import DeployOptions

logger = Logger()
tracer = Tracer()


@cache
def clients() -> tuple[Any, Any]:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", region_name=region), boto3.client("sagemaker", region_name=region)


def endpoint_exists(sagemaker: Any, endpoint_name: str) -> bool:
    try:
        sagemaker.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as error:
        # DescribeEndpoint answers a missing endpoint with a ValidationException, not a 404.
        if error.response["Error"]["Code"] == "ValidationException":
            return False
        raise
    return True


def read_in_service(s3: Any, bucket: str, endpoint_name: str) -> dict[str, Any]:
    try:
        body = s3.get_object(Bucket=bucket, Key=plan.in_service_key(endpoint_name))["Body"].read()
    except ClientError as error:
        if error.response["Error"]["Code"] in {"NoSuchKey", "404"}:
            return {}  # an endpoint nobody recorded: it is in service, its metrics are unknown
        raise
    return json.loads(body)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    settings = plan.EndpointSettings.from_json(os.environ["DEPLOY_SETTINGS"])
    bucket = os.environ["DATA_BUCKET"]
    s3, sagemaker = clients()
    training = event.get("training") or {}
    options = (event.get("input") or {}).get("deploy") or {}
    # Read with the model that checked it at the pipeline's first state (lambdas/execution_input/schema.py).
    requested = DeployOptions.model_validate(options)
    execution = str(event["execution"])

    in_service = (read_in_service(s3, bucket, settings.endpoint_name)
                  if endpoint_exists(sagemaker, settings.endpoint_name) else None)
    decision = plan.decide(
        training.get("metrics"),
        in_service,
        margin=settings.min_improvement if requested.min_improvement is None else float(requested.min_improvement),
        force=bool(requested.force),
        serving_shape=settings.serving_shape(),
    )
    if decision.deploy and not training.get("modelArtifact"):
        decision = plan.Decision("skip", [*decision.reasons, "but the training result names no modelArtifact"])
    model_name = (plan.resource_name(settings.endpoint_name, execution, datetime.now(UTC))
                  if decision.deploy else (in_service or {}).get("modelName", ""))
    result = {
        "decision": decision.decision,
        "reasons": decision.reasons,
        "modelName": model_name,
        "endpointName": settings.endpoint_name,
    }
    report = result | {
        "execution": execution,
        "decidedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "candidate": {k: training.get(k) for k in ("jobName", "modelArtifact", "metrics", "tuningJobName")},
        "inService": in_service,
        "options": options,
    }
    s3.put_object(Bucket=bucket, Key=plan.decision_key(execution), Body=json.dumps(report, indent=2).encode(),
                  ContentType="application/json")
    logger.info("deploy gate decided", extra=result)
    return result
