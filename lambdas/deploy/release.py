"""Release Lambda: CreateModel, CreateEndpointConfig, then CreateEndpoint or a blue/green UpdateEndpoint.

It starts the change and returns; the state machine waits for InService. Input: ``{"deploy": <gate
result>, "training": $.training}``. Output: ``{"action": "create"|"update", "modelName",
"endpointConfigName", "endpointName", "previousEndpointConfigName"}`` (None for a create).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from lambdas.deploy import plan

logger = Logger()
tracer = Tracer()

# An endpoint in one of these states is mid-change: the state machine retries the release later.
BUSY = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}


class EndpointBusy(RuntimeError):
    """The endpoint is changing; the state machine retries this error with backoff."""


class EndpointFailed(RuntimeError):
    """The endpoint is Failed or OutOfService and cannot take an update; an operator must look."""


class UnsupportedChange(RuntimeError):
    """The endpoint settings ask for a change UpdateEndpoint cannot make; the message says what to do."""


@cache
def clients() -> tuple[Any, Any]:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return (boto3.client("sagemaker", region_name=region),
            boto3.client("application-autoscaling", region_name=region))


def describe(sagemaker: Any, endpoint_name: str) -> dict[str, Any] | None:
    try:
        return sagemaker.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as error:
        if error.response["Error"]["Code"] == "ValidationException":
            return None
        raise


def release(
    sagemaker: Any,
    autoscaling: Any,
    settings: plan.EndpointSettings,
    *,
    model_name: str,
    model_data_url: str,
    region: str,
) -> dict[str, Any]:
    endpoint = describe(sagemaker, settings.endpoint_name)
    if endpoint is not None and endpoint["EndpointStatus"] in BUSY:
        raise EndpointBusy(f"endpoint {settings.endpoint_name} is {endpoint['EndpointStatus']}")
    if endpoint is not None and endpoint["EndpointStatus"] != "InService":
        raise EndpointFailed(
            f"endpoint {settings.endpoint_name} is {endpoint['EndpointStatus']} "
            f"({endpoint.get('FailureReason', 'no reason given')}); delete it and run the deploy again"
        )
    current_variant = None
    if endpoint is not None:
        current = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
        current_variant = current["ProductionVariants"][0]
        problem = plan.unsupported_change(settings, current_variant)
        if problem:
            raise UnsupportedChange(problem)
    config_name = model_name  # one model per config, so one name tells both apart per execution
    sagemaker.create_model(**plan.model_request(settings, model_name, model_data_url, region))
    sagemaker.create_endpoint_config(**plan.endpoint_config_request(settings, config_name, model_name))
    if endpoint is None:
        sagemaker.create_endpoint(
            EndpointName=settings.endpoint_name,
            EndpointConfigName=config_name,
            Tags=[{"Key": "managed-by", "Value": "invmon-deploy"}],
        )
        action = "create"
    else:
        if plan.needs_deregistration(settings, current_variant):
            _deregister(autoscaling, settings.endpoint_name)
        sagemaker.update_endpoint(
            EndpointName=settings.endpoint_name,
            EndpointConfigName=config_name,
            DeploymentConfig=plan.deployment_config(settings),
        )
        action = "update"
    # The config the endpoint served before: what a failed smoke check rolls back to (None on a first deploy).
    previous = endpoint["EndpointConfigName"] if endpoint is not None else None
    return {"action": action, "modelName": model_name, "endpointConfigName": config_name,
            "endpointName": settings.endpoint_name, "previousEndpointConfigName": previous}


def _deregister(autoscaling: Any, endpoint_name: str) -> None:
    try:
        autoscaling.deregister_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=plan.scaling_resource_id(endpoint_name),
            ScalableDimension=plan.SCALING_DIMENSION,
        )
    except ClientError as error:
        if error.response["Error"]["Code"] != "ObjectNotFoundException":
            raise


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    settings = plan.EndpointSettings.from_json(os.environ["DEPLOY_SETTINGS"])
    sagemaker, autoscaling = clients()
    result = release(
        sagemaker,
        autoscaling,
        settings,
        model_name=event["deploy"]["modelName"],
        model_data_url=event["training"]["modelArtifact"],
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", ""),
    )
    logger.info("endpoint change started", extra=result)
    return result
