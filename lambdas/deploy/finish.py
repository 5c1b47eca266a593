"""Finish Lambda: runs once the endpoint is InService on the new config.

Real-time mode: registers the variant with Application Auto Scaling (min..max instances) and puts the
target-tracking policy on invocations per instance; both calls are idempotent. Serverless mode scales by
itself. Then records the model in service, with its metrics, for the next gate. Output: the ``$.deploy``
contract.
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

from lambdas.deploy import plan

logger = Logger()
tracer = Tracer()


@cache
def clients() -> tuple[Any, Any]:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", region_name=region), boto3.client("application-autoscaling", region_name=region)


def autoscale(autoscaling: Any, settings: plan.EndpointSettings) -> None:
    if settings.mode != "realtime":
        return
    autoscaling.register_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=plan.scaling_resource_id(settings.endpoint_name),
        ScalableDimension=plan.SCALING_DIMENSION,
        MinCapacity=settings.min_instances,
        MaxCapacity=settings.max_instances,
    )
    autoscaling.put_scaling_policy(**plan.scaling_policy_request(settings))


def finish(s3: Any, autoscaling: Any, settings: plan.EndpointSettings, bucket: str, event: dict[str, Any]
           ) -> dict[str, Any]:
    gate, training, released = event["deploy"], event.get("training") or {}, event["release"]
    autoscale(autoscaling, settings)
    record = {
        "endpointName": settings.endpoint_name,
        "modelName": released["modelName"],
        "endpointConfigName": released["endpointConfigName"],
        "modelArtifact": training.get("modelArtifact"),
        "jobName": training.get("jobName"),
        "tuningJobName": training.get("tuningJobName"),
        "metrics": training.get("metrics") or {},
        "servingShape": settings.serving_shape(),
        "execution": event.get("execution"),
        "deployedAt": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    s3.put_object(Bucket=bucket, Key=plan.in_service_key(settings.endpoint_name),
                  Body=json.dumps(record, indent=2).encode(), ContentType="application/json")
    return {
        "decision": "deploy",
        "reasons": list(gate.get("reasons", [])),
        "modelName": released["modelName"],
        "endpointName": settings.endpoint_name,
    }


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    settings = plan.EndpointSettings.from_json(os.environ["DEPLOY_SETTINGS"])
    s3, autoscaling = clients()
    result = finish(s3, autoscaling, settings, os.environ["DATA_BUCKET"], event)
    logger.info("model in service", extra=result)
    return result
