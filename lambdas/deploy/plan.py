"""Deployment decisions, pure: whether a new model goes live, and the SageMaker requests that put it there.

The gate compares validation accuracy (higher is better) and, on a tie, validation RMSE (lower is better)
with the model in service, whose metrics the finish step records in the data bucket when an endpoint
reaches InService. The requests follow the SageMaker API (CreateModel, CreateEndpointConfig,
CreateEndpoint / UpdateEndpoint) for the two endpoint modes: serverless (memory, max concurrency) or
real-time instances (autoscaled by Application Auto Scaling target tracking).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from lambdas.training.request import has_local_storage
from ml import decisions

VARIANT = "AllTraffic"  # blue/green needs the same variant name in the old and the new endpoint config
PRIMARY_METRIC = "valid_accuracy"
TIE_METRIC = "valid_rmse"
REPORT_PREFIX = "reports/deploy/"
TIE_TOLERANCE = 1e-9
SCALING_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_POLICY = "invocations-per-instance"


def in_service_key(endpoint_name: str) -> str:
    """Where the finish step records the model that an endpoint serves (and its metrics)."""
    return f"{REPORT_PREFIX}in-service/{endpoint_name}.json"


def decision_key(execution: str) -> str:
    return f"{REPORT_PREFIX}{execution}.json"


@dataclass(frozen=True)
class EndpointSettings:
    """The endpoint knobs, as the construct passes them to the deploy Lambdas (JSON in ``DEPLOY_SETTINGS``)."""

    endpoint_name: str
    mode: str  # serverless | realtime
    serverless_memory_mb: int
    serverless_max_concurrency: int
    instance_type: str
    min_instances: int
    max_instances: int
    target_invocations_per_instance: int
    min_improvement: float
    image_uri: str
    role_arn: str
    rollback_alarms: list[str] = field(default_factory=list)
    bake_seconds: int = 300
    # The data key: encrypts a real-time endpoint's instance volumes (KmsKeyId on the endpoint config).
    kms_key_arn: str = ""

    @classmethod
    def from_json(cls, text: str) -> EndpointSettings:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def serving_shape(self) -> dict[str, Any]:
        """The part of the settings that changes what the endpoint config holds, apart from the model."""
        if self.mode == "serverless":
            return {"mode": "serverless", "memoryMb": self.serverless_memory_mb,
                    "maxConcurrency": self.serverless_max_concurrency, "imageUri": self.image_uri}
        return {"mode": "realtime", "instanceType": self.instance_type, "minInstances": self.min_instances,
                "maxInstances": self.max_instances, "imageUri": self.image_uri}


# --- the gate -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    decision: str  # deploy | skip
    reasons: list[str]

    @property
    def deploy(self) -> bool:
        return self.decision == "deploy"


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    value = (metrics or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# The trainer's flat operating-point figures (ml.operating.summary_metrics): a threshold per decision it takes.
OPERATING_POINT_METRICS = {f"op_{key}": key for key in decisions.THRESHOLD_KEYS}
DECISIONS_TAKEN_METRIC = "op_decisions_taken"


def operating_point_problem(metrics: Mapping[str, Any] | None) -> str | None:
    """Why the new model's operating point cannot serve, or None: thresholds that are not finite numbers in
    [0, 1] in a consistent order (the check ``model_fn`` applies at load, ``ml.decisions``), or an operating
    point that decides nothing (every upload would stay uncounted). A model that reports no operating point is
    decided by the stack's single threshold, as before operating points existed."""
    metrics = metrics or {}
    if not any(name in metrics for name in (*OPERATING_POINT_METRICS, DECISIONS_TAKEN_METRIC)):
        return None
    point: dict[str, Any] = {key: metrics.get(name) for name, key in OPERATING_POINT_METRICS.items()}
    point["not_decided"] = {key: "the trainer reports no threshold for it" for key, value in point.items()
                            if value is None}
    try:
        decisions.check_operating_point(point, where="training metrics op_*")
    except decisions.OperatingPointError as error:
        return f"the new model's operating point cannot be served: {error}"
    if not decisions.decided(point):
        return ("the new model's operating point decides nothing: no threshold reached its precision target on "
                "validation, so every upload would stay uncounted (retrain, or lower --count-precision, "
                "--match-precision, --mismatch-precision)")
    return None


def decide(
    new_metrics: Mapping[str, Any] | None,
    in_service: Mapping[str, Any] | None,
    *,
    margin: float,
    force: bool = False,
    serving_shape: Mapping[str, Any] | None = None,
) -> Decision:
    """Deploy when forced, when nothing is in service, when the endpoint settings changed, or when the new
    model's accuracy beats the one in service by at least ``margin`` (and by something: a tie is not
    better, unless RMSE breaks it with a zero margin).

    ``in_service`` is the record the finish step wrote (``{"metrics": {...}, "servingShape": {...}}``), or
    None when no endpoint exists. A model whose operating point cannot be served or decides nothing
    (``operating_point_problem``) is never deployed, forced or not; the cause comes first when it is what kept the
    model out, after the comparison when that did.
    """
    decision = _compare(new_metrics, in_service, margin, force, serving_shape)
    problem = operating_point_problem(new_metrics)
    if problem is None:
        return decision
    if decision.deploy:
        # Refused even when forced: served, such a model answers every photo and decides none of them.
        return Decision("skip", [problem, *decision.reasons])
    return Decision("skip", [*decision.reasons, problem])


def _compare(new_metrics: Mapping[str, Any] | None, in_service: Mapping[str, Any] | None, margin: float,
             force: bool, serving_shape: Mapping[str, Any] | None) -> Decision:
    """``decide`` on the metrics alone."""
    new_accuracy = _metric(new_metrics, PRIMARY_METRIC)
    reasons: list[str] = []
    if force:
        reasons.append("forced by the execution input (deploy.force)")
    if new_accuracy is None and not force:
        return Decision("skip", [f"the new model reports no numeric {PRIMARY_METRIC}, so it cannot be judged"])
    if in_service is None:
        return Decision("deploy", [*reasons, "no model is in service"])
    current_accuracy = _metric(in_service.get("metrics"), PRIMARY_METRIC)
    if current_accuracy is None:
        return Decision("deploy", [*reasons, f"the model in service has no recorded {PRIMARY_METRIC}"])
    if new_accuracy is None:
        return Decision("deploy", reasons)
    improvement = new_accuracy - current_accuracy
    comparison = (f"{PRIMARY_METRIC} {new_accuracy:.4f} vs {current_accuracy:.4f} in service "
                  f"({improvement:+.4f}; required margin {margin:.4f})")
    if force:
        return Decision("deploy", [*reasons, comparison])
    if serving_shape is not None and in_service.get("servingShape") not in (None, dict(serving_shape)):
        return Decision("deploy", [comparison, "the endpoint settings changed since the model in service was "
                                               f"deployed: {in_service.get('servingShape')} -> {dict(serving_shape)}"])
    if improvement > TIE_TOLERANCE and improvement >= margin - TIE_TOLERANCE:
        return Decision("deploy", [comparison, "the new model is better by at least the margin"])
    if abs(improvement) <= TIE_TOLERANCE and margin <= TIE_TOLERANCE:
        new_rmse = _metric(new_metrics, TIE_METRIC)
        current_rmse = _metric(in_service.get("metrics"), TIE_METRIC)
        if new_rmse is not None and current_rmse is not None and new_rmse < current_rmse - TIE_TOLERANCE:
            return Decision("deploy", [comparison, f"tie broken by {TIE_METRIC}: {new_rmse:.4f} < {current_rmse:.4f}"])
        return Decision("skip", [comparison, "the new model is not better than the model in service"])
    if improvement > TIE_TOLERANCE:
        return Decision("skip", [comparison, "the new model is better, but by less than the margin"])
    return Decision("skip", [comparison, "the new model is not better than the model in service"])


# --- names and requests -------------------------------------------------------------------------------


def resource_name(endpoint_name: str, execution: str, now: datetime) -> str:
    """A model / endpoint-config name: unique per execution, sortable by time, within SageMaker's 63 chars."""
    digest = hashlib.sha256(execution.encode()).hexdigest()[:6]
    stamp = now.strftime("%Y%m%d-%H%M%S")
    base = re.sub(r"[^a-zA-Z0-9-]", "-", endpoint_name)[: 63 - len(stamp) - len(digest) - 2]
    return f"{base}-{stamp}-{digest}"


# Serverless Inference does not support network isolation (nor VPC configuration, GPUs or data capture): "Feature
# exclusions", docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints.html. A serverless model runs without
# it; the inference role it names can read models/ and write its own log streams, nothing else.
SERVERLESS_EXCLUDES_NETWORK_ISOLATION = True


def network_isolation(settings: EndpointSettings) -> bool:
    """Whether the serving model runs with no network: always, except where SageMaker refuses it (serverless)."""
    return not (settings.mode == "serverless" and SERVERLESS_EXCLUDES_NETWORK_ISOLATION)


def model_request(settings: EndpointSettings, model_name: str, model_data_url: str, region: str) -> dict[str, Any]:
    """CreateModel for the endpoint: it names the inference role (read models/, decrypt, pull the image, write
    its own log group), never the training role that writes models/."""
    return {
        "ModelName": model_name,
        "ExecutionRoleArn": settings.role_arn,
        # The container needs no network: the model is in model.tar.gz and the code under code/ inside it.
        "EnableNetworkIsolation": network_isolation(settings),
        "PrimaryContainer": {
            "Image": settings.image_uri,
            "ModelDataUrl": model_data_url,
            # The PyTorch serving container runs ml/inference.py from code/ inside model.tar.gz.
            "Environment": {
                "SAGEMAKER_PROGRAM": "inference.py",
                "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                "SAGEMAKER_REGION": region,
            },
        },
        "Tags": [{"Key": "endpoint", "Value": settings.endpoint_name}],
    }


def endpoint_config_request(settings: EndpointSettings, config_name: str, model_name: str) -> dict[str, Any]:
    variant: dict[str, Any] = {"VariantName": VARIANT, "ModelName": model_name}
    if settings.mode == "serverless":
        variant["ServerlessConfig"] = {
            "MemorySizeInMB": settings.serverless_memory_mb,
            "MaxConcurrency": settings.serverless_max_concurrency,
        }
    else:
        variant.update(
            InstanceType=settings.instance_type,
            InitialInstanceCount=settings.min_instances,
            InitialVariantWeight=1.0,
        )
    request: dict[str, Any] = {
        "EndpointConfigName": config_name,
        "ProductionVariants": [variant],
        "Tags": [{"Key": "endpoint", "Value": settings.endpoint_name}],
    }
    # KmsKeyId encrypts "the storage volume attached to the ML compute instance that hosts the endpoint"
    # (CreateEndpointConfig API reference): a serverless variant has no instance volume of its own, so only a
    # real-time config carries it. Instance types with local NVMe storage refuse it (the same reference); those
    # are encrypted by the instance's hardware module.
    if settings.mode == "realtime" and settings.kms_key_arn and not has_local_storage(settings.instance_type):
        request["KmsKeyId"] = settings.kms_key_arn
    return request


def deployment_config(settings: EndpointSettings) -> dict[str, Any]:
    """Blue/green with automatic rollback on the endpoint's alarms.

    A canary needs a fleet of two or more (the canary may be at most half of it); a single instance and a
    serverless endpoint shift all at once, then bake while the alarms watch before the old fleet goes.
    """
    if settings.mode == "realtime" and settings.min_instances >= 2:
        routing = {"Type": "CANARY", "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 1},
                   "WaitIntervalInSeconds": settings.bake_seconds}
    else:
        routing = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    config: dict[str, Any] = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": settings.bake_seconds,
            # The API accepts 600..14400 seconds: room for a canary, the bake and the fleet swap.
            "MaximumExecutionTimeoutInSeconds": min(14400, max(600, 4 * settings.bake_seconds + 1800)),
        }
    }
    if settings.rollback_alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": name} for name in settings.rollback_alarms]}
    return config


def scaling_resource_id(endpoint_name: str) -> str:
    return f"endpoint/{endpoint_name}/variant/{VARIANT}"


def scaling_policy_request(settings: EndpointSettings) -> dict[str, Any]:
    return {
        "PolicyName": SCALING_POLICY,
        "ServiceNamespace": "sagemaker",
        "ResourceId": scaling_resource_id(settings.endpoint_name),
        "ScalableDimension": SCALING_DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(settings.target_invocations_per_instance),
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            # Scale out fast for a burst of uploads, scale in slowly so one quiet minute does not flap.
            "ScaleOutCooldown": 60,
            "ScaleInCooldown": 600,
        },
    }


def needs_deregistration(settings: EndpointSettings, current_variant: Mapping[str, Any] | None) -> bool:
    """UpdateEndpoint refuses to change the instance type of an autoscaled variant (only the model may
    change), so the scalable target goes first and the finish step registers it again."""
    if current_variant is None or settings.mode != "realtime":
        return False
    current_type = current_variant.get("InstanceType")
    return current_type is not None and current_type != settings.instance_type


def unsupported_change(settings: EndpointSettings, current_variant: Mapping[str, Any] | None) -> str | None:
    """Why UpdateEndpoint cannot make this change, or None. SageMaker does not update a real-time
    endpoint into a serverless one; that takes a delete and a fresh create."""
    if current_variant is not None and settings.mode == "serverless" and current_variant.get("InstanceType"):
        return (f"endpoint {settings.endpoint_name} runs on {current_variant['InstanceType']} instances and "
                "SageMaker cannot update a real-time endpoint to serverless: delete the endpoint (and its "
                "scalable target), then run the deploy again to create it serverless")
    return None
