"""Typed, validated settings built from the CDK context.

Every knob has its default in ``cdk.json`` (one place to read them all); this module only knows each knob's
type and range. Values given with ``cdk synth -c key=value`` arrive as strings, so each parser accepts the
string form too ("3", "true"), and anything else fails synth with a message that names the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ml.decisions import ERROR_RATE_RANGE

CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"
# The data bucket's prefixes that the pipeline writes (infra/storage.py names each; a test keeps the two equal,
# because importing infra.storage here would start the CDK's runtime for every tool that reads settings).
PIPELINE_PREFIXES = ("raw/", "manifests/", "shards/", "models/", "checkpoints/", "reports/")


class ConfigError(ValueError):
    """A context value that cannot become a setting; the message names the key."""


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"expected an integer {bound}, got {value}")
        return value

    parse.allowed = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"  # type: ignore[attr-defined]
    return parse


def _float(minimum: float, maximum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not minimum <= number <= maximum:
            raise ValueError(f"expected a number between {minimum} and {maximum}, got {number}")
        return number

    parse.allowed = f"{minimum} to {maximum}"  # type: ignore[attr-defined]
    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
        return value.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


_bool.allowed = "true, false"  # type: ignore[attr-defined]


def _threshold(value: Any) -> float | str:
    """``"model"`` (each answer's own operating point) or a probability that overrides it."""
    if isinstance(value, str) and value.strip().lower() == "model":
        return "model"
    try:
        return _float(0.0, 1.0)(value)
    except ValueError:
        raise ValueError(f"expected \"model\" or a number between 0.0 and 1.0, got {value!r}") from None


_threshold.allowed = '"model", or a number 0.0 to 1.0'  # type: ignore[attr-defined]


# The most one InvokeEndpoint request may carry, by endpoint mode: "The maximum request and response payload
# size for serverless invocations is 4 MB" (docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints-
# invoke.html; 4,000,000 bytes, whichever megabyte is meant), and the InvokeEndpoint Body's maximum length of
# 6,291,456 bytes for a real-time endpoint (the API's service model, as botocore ships it).
ENDPOINT_PAYLOAD_LIMIT_BYTES = {"serverless": 4_000_000, "realtime": 6_291_456}


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    parse.allowed = ", ".join(allowed)  # type: ignore[attr-defined]
    return parse


def _one_of_ints(*allowed: int) -> Callable[[Any], int]:
    as_int = _int(min(allowed), max(allowed))

    def parse(value: Any) -> int:
        number = as_int(value)
        if number not in allowed:
            raise ValueError(f"expected one of {', '.join(map(str, allowed))}, got {number}")
        return number

    parse.allowed = ", ".join(map(str, allowed))  # type: ignore[attr-defined]
    return parse


def _pattern(regex: str, what: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(regex, value):
            raise ValueError(f"expected {what}, got {value!r}")
        return value

    parse.allowed = what  # type: ignore[attr-defined]
    return parse


_INSTANCE_TYPE = _pattern(
    r"ml\.[a-z0-9-]+\.([0-9]*x?large|medium|small|micro)", "an instance type such as ml.g4dn.xlarge"
)


def _training_instance_type(value: Any) -> str:
    """A type SageMaker training offers that the PyTorch images run on: the very check the prepare step makes on
    every execution (lambdas/training/request.py), so a type it would refuse never deploys."""
    from lambdas.training.request import TrainingInputError, check_instance_type

    instance_type = _INSTANCE_TYPE(value)
    try:
        check_instance_type(instance_type)
    except TrainingInputError as error:
        raise ValueError(str(error).removeprefix("instanceType: ")) from None
    return instance_type


def _instance_types(value: Any) -> tuple[str, ...]:
    """A non-empty list of training instance types (a comma-separated string from ``-c`` works too), each one the
    prepare step would accept."""
    if isinstance(value, str):
        value = _json(value, "a list of instance types", '["ml.g4dn.xlarge"]') if value.strip().startswith("[") \
            else [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of instance types such as [\"ml.g4dn.xlarge\"], got {value!r}")
    return tuple(_training_instance_type(item) for item in value)
_instance_types.allowed = "a non-empty list of training instance types"  # type: ignore[attr-defined]


_training_instance_type.allowed = "a SageMaker training instance type the PyTorch images run on"  # type: ignore[attr-defined]


def _photos_per_shard(value: Any) -> int:
    """Photos per shard, up to the most whose packer result still fits a Step Functions state (the bound the
    plan step enforces on every execution: lambdas/pack/plan.py)."""
    from lambdas.pack.plan import MAX_PHOTOS_PER_SHARD

    return _int(1, MAX_PHOTOS_PER_SHARD)(value)


# The cost report calls Cost Explorer, and every Cost Explorer API request is billed (USD 0.01 each, AWS Cost
# Management pricing); its data refreshes at most a few times a day. So the report runs at most once a day.
MIN_COST_REPORT_SECONDS = 24 * 3600
_RATE_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
_MONTH_NAMES = {name: n for n, name in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), start=1)}


def _cron_values(field: str, low: int, high: int, names: Mapping[str, int] | None = None) -> set[int] | None:
    """The numbers a plain cron field (``5``, ``1,15``, ``1-10``, ``*/2``, ``JAN``) selects, or None for ``*``,
    ``?`` and the forms (``L``, ``W``, ``#``) that this check does not expand."""
    if field in {"*", "?"} or any(mark in field.upper() for mark in "LW#"):
        return None

    def number(text: str) -> int:
        value = int(text) if text.isdigit() else (names or {}).get(text.upper())
        if value is None or not low <= value <= high:
            raise ValueError(f"cron field {field!r}: expected values between {low} and {high}")
        return value

    values: set[int] = set()
    for part in field.split(","):
        span, _, step = part.partition("/")
        first, last = (low, high) if span == "*" else (number(span.split("-")[0]), number(span.split("-")[-1]))
        values |= set(range(first, last + 1, int(step) if step.isdigit() and int(step) > 0 else 1))
    return values


def _check_cron_fires(expression: str) -> None:
    """Refuses a cron whose day-of-month never occurs in any of its months (31 February, 30 February, 31 April)."""
    fields = expression.removeprefix("cron(").removesuffix(")").split()
    days = _cron_values(fields[2], 1, 31)
    months = _cron_values(fields[3], 1, 12, _MONTH_NAMES)
    if days is None:
        return
    if not any(day <= _MONTH_DAYS[month] for month in (months or _MONTH_DAYS) for day in days):
        raise ValueError(f"{expression!r} never fires: no month it names has day {min(days)}")


_photos_per_shard.allowed = "1 to lambdas/pack/plan.py MAX_PHOTOS_PER_SHARD"  # type: ignore[attr-defined]


def _rate_or_cron(value: Any) -> str:
    """An EventBridge schedule. A rate's value is a positive number, its unit minute/hour/day, singular for 1 and
    plural above ("rate(1 hours) and rate(5 hour) aren't valid": EventBridge's rate expressions reference); a cron
    expression has six fields, and a day that some month it names has."""
    expression = _SCHEDULE(value)
    rate = re.fullmatch(r"rate\((\d+) (minute|hour|day)(s?)\)", expression)
    if expression.startswith("rate("):
        if rate is None or int(rate[1]) < 1 or (rate[3] == "s") != (int(rate[1]) > 1):
            raise ValueError(f"expected rate(N unit) with N at least 1 and the unit singular for 1, plural above "
                             f"(rate(1 day), rate(7 days)), got {expression!r}")
    elif len(expression.removeprefix("cron(").removesuffix(")").split()) != 6:
        raise ValueError(f"expected cron(minutes hours day-of-month month day-of-week year), six fields, "
                         f"such as cron(0 6 ? * MON *), got {expression!r}")
    else:
        _check_cron_fires(expression)
    return expression


def _cost_report_schedule(value: Any) -> str:
    """A schedule for the cost report, at most daily: a rate below a day, or a cron that fires more than once a
    day (a minute or hour field that is a wildcard or a list), is a paid Cost Explorer call per firing."""
    expression = _rate_or_cron(value)
    rate = re.fullmatch(r"rate\((\d+) (minute|hour|day)s?\)", expression)
    if rate:
        too_often = int(rate[1]) * _RATE_UNIT_SECONDS[rate[2]] < MIN_COST_REPORT_SECONDS
    else:
        minutes, hours = expression.removeprefix("cron(").split()[:2]
        too_often = any(mark in field for field in (minutes, hours) for mark in "*,-/")
    if too_often:
        raise ValueError(f"the cost report runs at most once a day (each Cost Explorer request is billed), "
                         f"got {expression!r}; use rate(1 day) or a cron with a fixed minute and hour")
    return expression
_cost_report_schedule.allowed = "rate(N unit) or cron(six fields), at most once a day"  # type: ignore[attr-defined]


_rate_or_cron.allowed = "rate(N unit) or cron(six fields)"  # type: ignore[attr-defined]


def _json(value: Any, shape: str, example: str) -> Any:
    """A JSON-valued key given with ``-c key=...``: a parse error says what shape is expected, not where the
    parser stopped."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ValueError(f"expected {shape} in JSON, such as {example}, got {value!r}") from None
def _review_statuses(value: Any) -> tuple[str, ...]:
    """Count statuses that need a person; the audit sample covers the confident ones separately."""
    from lambdas.count.records import LOW_CONFIDENCE, MISMATCH, REJECTED

    allowed = (MISMATCH, LOW_CONFIDENCE, REJECTED)
    if isinstance(value, str) and not value.strip().startswith("["):
        value = [part.strip() for part in value.split(",") if part.strip()]
    value = _json(value, "a list of statuses", '["mismatch", "uncounted-low-confidence"]')
    if not isinstance(value, list) or not all(isinstance(item, str) and item in allowed for item in value):
        raise ValueError(f"expected a list of statuses from {', '.join(allowed)}, got {value!r}")
    return tuple(dict.fromkeys(value))
_review_statuses.allowed = "a list of mismatch, uncounted-low-confidence, rejected"  # type: ignore[attr-defined]


_PREFIX = _pattern(r"[A-Za-z0-9!_.*'()\-/]+/", "an S3 prefix ending in '/', such as incoming/")
_BUCKET = _pattern(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", "an S3 bucket name")
_SCHEDULE = _pattern(r"(rate|cron)\(.+\)", "an EventBridge schedule such as rate(7 days)")
_EMAIL = _pattern(r"|[^@\s]+@[^@\s]+\.[^@\s]+", "an e-mail address or an empty string")


def _id_list(prefix: str) -> Callable[[Any], tuple[str, ...]]:
    """A list of AWS resource ids such as subnet-0abc (a comma-separated string from ``-c`` works too)."""

    def parse(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(
            isinstance(item, str) and re.fullmatch(rf"{prefix}-[0-9a-f]{{8,17}}", item) for item in value
        ):
            raise ValueError(f"expected a list of ids such as {prefix}-0123456789abcdef0, got {value!r}")
        return tuple(value)

    parse.allowed = f"a list of ids such as {prefix}-0123456789abcdef0"  # type: ignore[attr-defined]
    return parse


def _number_range(minimum: float, maximum: float, *, integer: bool) -> Callable[[Any], tuple[float, float]]:
    """A [low, high] pair inside [minimum, maximum] with low < high (a tuning range)."""
    bound = _int(int(minimum), int(maximum)) if integer else _float(minimum, maximum)

    def parse(value: Any) -> tuple[float, float]:
        if isinstance(value, str) and not value.strip().startswith("["):
            value = value.split(",")
        example = "[2, 10]" if integer else "[0.0001, 0.01]"
        value = _json(value, "a [low, high] pair", example)
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"expected a [low, high] pair, got {value!r}")
        low, high = bound(value[0]), bound(value[1])
        if low >= high:
            raise ValueError(f"expected low < high, got [{low}, {high}]")
        return (low, high)

    parse.allowed = f"[low, high], each {bound.allowed}, low < high"  # type: ignore[attr-defined]
    return parse


def _int_choices(minimum: int, maximum: int) -> Callable[[Any], tuple[int, ...]]:
    as_int = _int(minimum, maximum)

    def parse(value: Any) -> tuple[int, ...]:
        if isinstance(value, str) and not value.strip().startswith("["):
            value = value.split(",")
        value = _json(value, "a list of integers", "[16, 32, 64]")
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list of integers, got {value!r}")
        return tuple(sorted({as_int(item) for item in value}))

    parse.allowed = f"a non-empty list of integers, each {as_int.allowed}"  # type: ignore[attr-defined]
    return parse


def _hyperparameters(value: Any) -> tuple[tuple[str, str | int | float | bool], ...]:
    """Extra trainer arguments (``--name value``), checked by the trainer's own parser as the prepare step checks
    an execution's; stored as sorted pairs so Settings stays hashable."""
    from lambdas.training.arguments import HyperparameterError, check_hyperparameters
    from lambdas.training.limits import limits
    from lambdas.training.request import _CONTAINER_ENTRIES, DATA_DISTRIBUTION

    value = _json(value, "an object of ml.train hyperparameters", '{"lr": 0.001, "network": "efficientnet-lite0"}')
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of hyperparameters such as {{\"lr\": 0.001}}, got {value!r}")
    for name, item in value.items():
        if not isinstance(item, str | int | float | bool):
            raise ValueError(f"{name}: must be a string, number or boolean, got {item!r}")
    if DATA_DISTRIBUTION in value:
        # The prepare step refuses it on every execution: it must match how SageMaker hands out the channel.
        raise ValueError(f"{DATA_DISTRIBUTION}: set from trainingDataDistribution, which also decides how "
                         "SageMaker hands the train channel to each host; set that key instead")
    sagemaker = limits()["hyperParameters"]
    try:
        check_hyperparameters(value, max_entries=sagemaker["maxEntries"] - _CONTAINER_ENTRIES,
                              max_value_length=sagemaker["maxValueLength"])
    except HyperparameterError as error:
        raise ValueError(str(error)) from None
    return tuple(sorted(value.items()))


_hyperparameters.allowed = "an object of ml.train arguments (name: string, number or boolean)"  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """All knobs of the system. Field names are the ``cdk.json`` context keys in snake case."""

    project: str
    stage: str
    # ingest
    source_bucket: str
    dataset_selector: str
    ingest_max_concurrency: int
    ingest_batch_size: int
    ingest_tolerated_failure_percent: int
    split_validation_fraction: float
    split_test_fraction: float
    # pack (infra/pack.py)
    pack_photos_per_shard: int
    pack_max_concurrency: int
    packer_memory_mb: int
    shard_retention_days: int
    # training
    training_instance_type: str
    training_instance_count: int
    training_use_spot: bool
    training_max_runtime_seconds: int
    training_max_wait_seconds: int
    training_volume_size_gb: int
    training_epochs: int
    training_network_isolation: bool
    allow_network_isolation_off: bool
    training_allowed_instance_types: tuple[str, ...]
    training_max_instance_count: int
    training_max_seconds: int
    training_debugger: bool
    training_profiler: bool
    # How the training job reads its channels (lambdas/training/request.py)
    training_input_mode: str
    training_data_distribution: str
    framework_version: str
    python_version: str
    # tuning
    tuning_enabled: bool
    tuning_max_jobs: int
    tuning_max_parallel_jobs: int
    tuning_max_jobs_cap: int
    tuning_max_parallel_jobs_cap: int
    tuning_learning_rate_range: tuple[float, float]
    tuning_batch_sizes: tuple[int, ...]
    tuning_epochs_range: tuple[int, int]
    training_hyperparameters: tuple[tuple[str, str | int | float | bool], ...]
    training_subnet_ids: tuple[str, ...]
    training_security_group_ids: tuple[str, ...]
    # endpoint
    endpoint_mode: str
    endpoint_serverless_memory_mb: int
    endpoint_serverless_max_concurrency: int
    endpoint_instance_type: str
    endpoint_min_instances: int
    endpoint_max_instances: int
    deploy_min_improvement: float
    allow_force_deploy: bool
    endpoint_target_invocations_per_instance: int
    deploy_bake_seconds: int
    # counting
    incoming_prefix: str
    # "model": apply the operating point each answer carries; a number overrides it with one threshold.
    count_confidence_threshold: float | str
    count_max_image_bytes: int
    # share of consignments whose expected count is wrong: the prior of each record's discrepancyProbability
    consignment_error_rate: float
    # review (infra/review.py, lambdas/review/)
    review_statuses: tuple[str, ...]
    review_audit_rate: float
    review_max_per_day: int
    review_lease_seconds: int
    review_oldest_pending_alarm_hours: int
    review_api_rate_limit: int
    review_api_burst_limit: int
    # notebooks (optional SageMaker Studio domain, infra/studio.py)
    studio_domain: bool
    studio_can_start_pipeline: bool
    studio_network_access: str
    # platform
    alarm_email: str
    cost_report_schedule: str
    log_retention_days: int

    @property
    def is_production(self) -> bool:
        return self.stage == "prod"


# The context key for each field, and how to parse it. Keys are camelCase as CDK context keys usually are.
_SPEC: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "project": ("project", _pattern(r"[a-z][a-z0-9-]{1,30}", "a lower-case name such as invmon")),
    "stage": ("stage", _choice("dev", "prod")),
    "source_bucket": ("sourceBucket", _BUCKET),
    "dataset_selector": ("datasetSelector", _choice("file-list", "count-range", "challenge", "manifest", "all")),
    "ingest_max_concurrency": ("ingestMaxConcurrency", _int(1, 1000)),
    "ingest_batch_size": ("ingestBatchSize", _int(1, 1000)),
    "ingest_tolerated_failure_percent": ("ingestToleratedFailurePercent", _int(0, 100)),
    "split_validation_fraction": ("splitValidationFraction", _float(0.01, 0.5)),
    "split_test_fraction": ("splitTestFraction", _float(0.0, 0.5)),
    "pack_photos_per_shard": ("packPhotosPerShard", _photos_per_shard),
    "pack_max_concurrency": ("packMaxConcurrency", _int(1, 1000)),
    # Lambda gives a function between 128 MB and 10,240 MB (Lambda developer guide, "Lambda quotas").
    "packer_memory_mb": ("packerMemoryMb", _int(128, 10240)),
    "shard_retention_days": ("shardRetentionDays", _int(1, 3650)),
    "training_instance_type": ("trainingInstanceType", _training_instance_type),
    "training_instance_count": ("trainingInstanceCount", _int(1, 20)),
    "training_use_spot": ("trainingUseSpot", _bool),
    "training_max_runtime_seconds": ("trainingMaxRuntimeSeconds", _int(60, 28 * 24 * 3600)),
    "training_max_wait_seconds": ("trainingMaxWaitSeconds", _int(60, 28 * 24 * 3600)),
    "training_volume_size_gb": ("trainingVolumeSizeGb", _int(1, 16384)),
    "training_epochs": ("trainingEpochs", _int(1, 500)),
    "training_network_isolation": ("trainingNetworkIsolation", _bool),
    "allow_network_isolation_off": ("allowNetworkIsolationOff", _bool),
    "training_allowed_instance_types": ("trainingAllowedInstanceTypes", _instance_types),
    "training_max_instance_count": ("trainingMaxInstanceCount", _int(1, 100)),
    "training_max_seconds": ("trainingMaxSeconds", _int(60, 28 * 24 * 3600)),
    "training_debugger": ("trainingDebugger", _bool),
    "training_profiler": ("trainingProfiler", _bool),
    "training_input_mode": ("trainingInputMode", _choice("File", "FastFile")),
    "training_data_distribution": ("trainingDataDistribution", _choice("ShardedByS3Key", "FullyReplicated")),
    "framework_version": ("frameworkVersion", _pattern(r"\d+\.\d+(\.\d+)?", "a PyTorch version such as 2.3")),
    "python_version": ("pythonVersion", _pattern(r"py3\d+", "a Python tag such as py311")),
    "tuning_enabled": ("tuningEnabled", _bool),
    "tuning_max_jobs": ("tuningMaxJobs", _int(1, 500)),
    "tuning_max_parallel_jobs": ("tuningMaxParallelJobs", _int(1, 100)),
    "tuning_max_jobs_cap": ("tuningMaxJobsCap", _int(1, 500)),
    "tuning_max_parallel_jobs_cap": ("tuningMaxParallelJobsCap", _int(1, 100)),
    "tuning_learning_rate_range": ("tuningLearningRateRange", _number_range(1e-7, 10.0, integer=False)),
    "tuning_batch_sizes": ("tuningBatchSizes", _int_choices(1, 4096)),
    "tuning_epochs_range": ("tuningEpochsRange", _number_range(1, 500, integer=True)),
    "training_hyperparameters": ("trainingHyperparameters", _hyperparameters),
    "training_subnet_ids": ("trainingSubnetIds", _id_list("subnet")),
    "training_security_group_ids": ("trainingSecurityGroupIds", _id_list("sg")),
    "endpoint_mode": ("endpointMode", _choice("serverless", "realtime")),
    "endpoint_serverless_memory_mb": ("endpointServerlessMemoryMb", _one_of_ints(1024, 2048, 3072, 4096, 5120, 6144)),
    "endpoint_serverless_max_concurrency": ("endpointServerlessMaxConcurrency", _int(1, 200)),
    "endpoint_instance_type": ("endpointInstanceType", _INSTANCE_TYPE),
    "endpoint_min_instances": ("endpointMinInstances", _int(1, 100)),
    "endpoint_max_instances": ("endpointMaxInstances", _int(1, 100)),
    "deploy_min_improvement": ("deployMinImprovement", _float(0.0, 1.0)),
    "allow_force_deploy": ("allowForceDeploy", _bool),
    "endpoint_target_invocations_per_instance": ("endpointTargetInvocationsPerInstance", _int(1, 100000)),
    "deploy_bake_seconds": ("deployBakeSeconds", _int(0, 3600)),
    "incoming_prefix": ("incomingPrefix", _PREFIX),
    "count_confidence_threshold": ("countConfidenceThreshold", _threshold),
    "count_max_image_bytes": ("countMaxImageBytes", _int(1024, max(ENDPOINT_PAYLOAD_LIMIT_BYTES.values()))),
    "consignment_error_rate": ("consignmentErrorRate", _float(*ERROR_RATE_RANGE)),
    "review_statuses": ("reviewStatuses", _review_statuses),
    "review_audit_rate": ("reviewAuditRate", _float(0.0, 1.0)),
    "review_max_per_day": ("reviewMaxPerDay", _int(0, 1_000_000)),
    "review_lease_seconds": ("reviewLeaseSeconds", _int(30, 3600)),
    "review_oldest_pending_alarm_hours": ("reviewOldestPendingAlarmHours", _int(1, 24 * 14)),
    "review_api_rate_limit": ("reviewApiRateLimit", _int(1, 10000)),
    "review_api_burst_limit": ("reviewApiBurstLimit", _int(1, 5000)),
    "studio_domain": ("studioDomain", _bool),
    "studio_can_start_pipeline": ("studioCanStartPipeline", _bool),
    "studio_network_access": ("studioNetworkAccess", _choice("ByStage", "PublicInternetOnly", "VpcOnly")),
    "alarm_email": ("alarmEmail", _EMAIL),
    "cost_report_schedule": ("costReportSchedule", _cost_report_schedule),
    "log_retention_days": ("logRetentionDays", _int(1, 3653)),
}

assert set(_SPEC) == {f.name for f in fields(Settings)}, "every Settings field needs a context key"

# What each context key means, for people: docs/configuration.md is generated from this (python -m infra.reference)
# and a test fails when a key has none. Adding a knob: one line here, next to its _SPEC entry's domain.
MEANINGS: dict[str, str] = {
    "project": "Name prefix of the stack (`<Project>-<stage>`) and of its resources; the `project` cost tag.",
    "stage": "`dev` or `prod`: names the stack (`Invmon-dev`, `Invmon-prod`); prod keeps data buckets and "
             "table when the stack is destroyed.",
    # ingest
    "sourceBucket": "The public bucket the ingest stage copies photos and metadata from (ABID's aft-vbi-pds).",
    "datasetSelector": "Which photos an execution ingests when its input names none (`dataset.selector`).",
    "ingestMaxConcurrency": "Parallel copy batches in the ingest stage's distributed Map.",
    "ingestBatchSize": "Photos copied per ingest batch (one Lambda invocation).",
    "ingestToleratedFailurePercent": "Percent of ingest batches that may fail before the stage fails.",
    "splitValidationFraction": "Share of the dataset kept for validation (the deploy gate's metrics).",
    "splitTestFraction": "Share of the dataset kept for the final test (never seen in training).",
    # pack
    "packPhotosPerShard": "Photos per training shard the pack stage writes.",
    "packMaxConcurrency": "Parallel packers in the pack stage's Map.",
    "packerMemoryMb": "Memory of the packer Lambda (MB); CPU scales with it.",
    "shardRetentionDays": "Days until shards/ and manifests/ (each run's packed shards and lists) expire by a "
                          "lifecycle rule.",
    # training
    "trainingInstanceType": "SageMaker training instance type.",
    "trainingInstanceCount": "Training instances (data-parallel when more than one).",
    "trainingUseSpot": "Train on spot capacity (managed spot training, with checkpoints).",
    "trainingMaxRuntimeSeconds": "Longest a training job may run (StoppingCondition.MaxRuntimeInSeconds).",
    "trainingMaxWaitSeconds": "Longest a spot job may wait and run in all; at least trainingMaxRuntimeSeconds.",
    "trainingVolumeSizeGb": "Training instance storage volume (GB).",
    "trainingEpochs": "Training epochs when the execution input names none.",
    "trainingNetworkIsolation": "Run the training container without network access.",
    "trainingDebugger": "Ask SageMaker Debugger for its rules (closed to new customers since 2026-07-30).",
    "trainingProfiler": "Ask SageMaker Debugger's profiler for system metrics (closed as trainingDebugger).",
    "trainingInputMode": "How the job reads its channels: `File` (downloaded first) or `FastFile` (streamed).",
    "trainingDataDistribution": "Shards per instance (`ShardedByS3Key`) or every shard on each (`FullyReplicated`).",
    "frameworkVersion": "PyTorch version of the SageMaker training and inference images.",
    "pythonVersion": "Python tag of the SageMaker PyTorch images.",
    # tuning
    "tuningEnabled": "Run a hyperparameter tuning job instead of one training job.",
    "tuningMaxJobs": "Training jobs a tuning run may start in all.",
    "tuningMaxParallelJobs": "Training jobs a tuning run may run at once; at most tuningMaxJobs.",
    "tuningLearningRateRange": "Learning rates the tuner searches (log scale).",
    "tuningBatchSizes": "Batch sizes the tuner chooses from.",
    "tuningEpochsRange": "Epochs the tuner searches.",
    "trainingHyperparameters": "Extra ml.train arguments for every job (`--name value`), checked at synth.",
    "trainingSubnetIds": "Run training inside these VPC subnets (with trainingSecurityGroupIds); empty: no VPC.",
    "trainingSecurityGroupIds": "Security groups of training in a VPC (with trainingSubnetIds).",
    "allowNetworkIsolationOff": "Whether an execution input may set training.networkIsolation=false (the stack's own "
                                "default aside).",
    "trainingAllowedInstanceTypes": "The instance types an execution input may name in training.instanceType.",
    "trainingMaxInstanceCount": "The most instances an execution input may ask for (training.instanceCount).",
    "trainingMaxSeconds": "The longest training.maxRuntimeSeconds / maxWaitSeconds an execution input may ask for.",
    "tuningMaxJobsCap": "The most tuning jobs (training.tuning.maxJobs) an execution input may ask for.",
    "tuningMaxParallelJobsCap": "The most parallel tuning jobs (training.tuning.maxParallelJobs) an execution input "
                                "may ask for.",
    # endpoint
    "endpointMode": "`serverless` (pay per request) or `realtime` (instances, autoscaled).",
    "endpointServerlessMemoryMb": "Memory of a serverless endpoint (MB).",
    "endpointServerlessMaxConcurrency": "Concurrent invocations of a serverless endpoint.",
    "endpointInstanceType": "Instance type of a realtime endpoint.",
    "endpointMinInstances": "Fewest instances of a realtime endpoint (autoscaling floor).",
    "endpointMaxInstances": "Most instances of a realtime endpoint (autoscaling ceiling).",
    "deployMinImprovement": "How much a new model's validation accuracy must beat the model in service by to "
                            "be deployed (0.0: any improvement).",
    "endpointTargetInvocationsPerInstance": "Autoscaling target: invocations per instance per minute (realtime).",
    "deployBakeSeconds": "How long a new model takes traffic under the rollback alarms before the old one goes.",
    "allowForceDeploy": "Whether an execution input may set deploy.force=true (deploy whatever the gate's metrics "
                        "say).",
    # counting
    "incomingPrefix": "Where uploads to count arrive in the data bucket; must not overlap the pipeline's prefixes.",
    "countConfidenceThreshold": "`model`: each answer's own operating point decides; a number: one confidence "
                                "threshold for every answer.",
    "countMaxImageBytes": "Largest photo sent to the endpoint; larger ones are recorded `rejected` (too-large).",
    "consignmentErrorRate": "Share of consignments whose expected count is wrong (0.001 to 0.5): the prior of every "
                            "record's discrepancyProbability and the rate the decisions are stated at.",
    # review
    "reviewStatuses": "Count statuses that go to a person (besides the audit sample).",
    "reviewAuditRate": "Share of confident decisions (counted, match) sent to a person blind, to measure production "
                       "precision.",
    "reviewMaxPerDay": ("Most photos queued for review per UTC day. Once reached, a photo more likely wrong than the "
                        "least likely one waiting takes its place (never an audit item's or a held one's); the "
                        "rest keep their status and are not queued."),
    "reviewLeaseSeconds": "How long a claimed photo stays with its reviewer before it returns to the queue.",
    "reviewOldestPendingAlarmHours": "The alarm on the age of the oldest pending review fires above this many hours.",
    "reviewApiRateLimit": "The review API stage's steady request rate (requests per second); API Gateway answers 429 "
                          "above it.",
    "reviewApiBurstLimit": "The review API stage's burst of requests above reviewApiRateLimit.",
    # notebooks
    "studioDomain": "Create a SageMaker Studio domain for notebooks on the data (infra/studio.py).",
    "studioCanStartPipeline": "Whether the Studio user may start the pipeline (states:StartExecution); it may always "
                              "follow it.",
    "studioNetworkAccess": "Studio's network: `ByStage` (`VpcOnly` in prod, `PublicInternetOnly` elsewhere), "
                           "`PublicInternetOnly` or `VpcOnly`.",
    # platform
    "alarmEmail": "E-mail address subscribed to the alarms topic; empty: no subscription.",
    "costReportSchedule": "When the cost report runs (EventBridge schedule).",
    "logRetentionDays": "Days the functions' and jobs' logs are kept.",
}

CONTEXT_KEYS: tuple[str, ...] = tuple(key for key, _ in _SPEC.values())


def _allowance_checks(settings: Settings) -> None:
    """The stack's own defaults must be what it allows an execution input to ask for."""
    if settings.training_instance_type not in settings.training_allowed_instance_types:
        raise ConfigError(f"trainingAllowedInstanceTypes: must include trainingInstanceType "
                          f"({settings.training_instance_type})")
    for key, value, cap_key, cap in (
        ("trainingInstanceCount", settings.training_instance_count, "trainingMaxInstanceCount",
         settings.training_max_instance_count),
        ("trainingMaxRuntimeSeconds", settings.training_max_runtime_seconds, "trainingMaxSeconds",
         settings.training_max_seconds),
        ("trainingMaxWaitSeconds", settings.training_max_wait_seconds, "trainingMaxSeconds",
         settings.training_max_seconds),
        ("tuningMaxJobs", settings.tuning_max_jobs, "tuningMaxJobsCap", settings.tuning_max_jobs_cap),
        ("tuningMaxParallelJobs", settings.tuning_max_parallel_jobs, "tuningMaxParallelJobsCap",
         settings.tuning_max_parallel_jobs_cap),
    ):
        if value > cap:
            raise ConfigError(f"{cap_key}: must be at least {key} ({value}), got {cap}")


IMAGES_JSON = Path(__file__).resolve().parent / "images.json"  # infra.images' table (that module needs the CDK)


def _check_framework_images(settings: Settings) -> None:
    """The framework and Python versions must be ones whose image URIs infra/images.json holds (otherwise the
    synth ends in a traceback from the image lookup)."""
    key = f"{settings.framework_version}/{settings.python_version}"
    known = sorted(json.loads(IMAGES_JSON.read_text())["pytorch"])
    if key not in known:
        raise ConfigError(
            f"frameworkVersion: no PyTorch {settings.framework_version} ({settings.python_version}) images in "
            f"infra/images.json, which has {', '.join(known)}; run `.venv/bin/python -m infra.images` after "
            "changing frameworkVersion or pythonVersion"
        )


def check_context_keys(context: Mapping[str, Any]) -> None:
    """Refuses a context key that is no knob (``-c trainingInstanceTyp=...`` would otherwise be ignored), with
    the closest knob's name. Keys with ':' or '@' are the CDK's own (``aws:cdk:...``, ``@aws-cdk/...`` feature
    flags) and pass."""
    import difflib

    unknown = sorted(key for key in context if ":" not in key and "@" not in key and key not in CONTEXT_KEYS)
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key, CONTEXT_KEYS, n=1)
            problems.append(f"{key}: not an invmon setting" + (f"; did you mean {close[0]}?" if close else ""))
        raise ConfigError("invalid invmon settings:\n  " + "\n  ".join(problems))


def _cross_checks(settings: Settings) -> None:
    """Rules that span several knobs, each named by the key a user would change."""
    _check_framework_images(settings)
    if settings.training_use_spot and settings.training_max_wait_seconds < settings.training_max_runtime_seconds:
        raise ConfigError(
            "trainingMaxWaitSeconds: must be at least trainingMaxRuntimeSeconds "
            f"({settings.training_max_runtime_seconds}) when trainingUseSpot is true, "
            f"got {settings.training_max_wait_seconds}"
        )
    if bool(settings.training_subnet_ids) != bool(settings.training_security_group_ids):
        raise ConfigError(
            "trainingSubnetIds: a training VPC needs both trainingSubnetIds and trainingSecurityGroupIds, "
            f"got {len(settings.training_subnet_ids)} subnets and "
            f"{len(settings.training_security_group_ids)} security groups"
        )
    if settings.tuning_max_parallel_jobs > settings.tuning_max_jobs:
        raise ConfigError(
            f"tuningMaxParallelJobs: must not exceed tuningMaxJobs ({settings.tuning_max_jobs}), "
            f"got {settings.tuning_max_parallel_jobs}"
        )
    _allowance_checks(settings)
    if settings.endpoint_min_instances > settings.endpoint_max_instances:
        raise ConfigError(
            f"endpointMinInstances: must not exceed endpointMaxInstances ({settings.endpoint_max_instances}), "
            f"got {settings.endpoint_min_instances}"
        )
    for prefix in PIPELINE_PREFIXES:
        incoming = settings.incoming_prefix
        if incoming.startswith(prefix) or prefix.startswith(incoming):
            # Every ingested image (raw/) or written manifest would be counted, and the count role read it all.
            raise ConfigError(
                f"incomingPrefix: must not overlap the prefix {prefix} that the pipeline writes to, got "
                f"{incoming!r}; use a prefix of its own such as incoming/"
            )
    payload_limit = ENDPOINT_PAYLOAD_LIMIT_BYTES[settings.endpoint_mode]
    if settings.count_max_image_bytes > payload_limit:
        # Sent anyway, such a photo would be refused by SageMaker on every retry and end in the DLQ.
        raise ConfigError(
            f"countMaxImageBytes: a {settings.endpoint_mode} endpoint accepts at most {payload_limit} bytes per "
            f"request, got {settings.count_max_image_bytes}; lower it (or use endpointMode realtime)"
        )
    if settings.split_validation_fraction + settings.split_test_fraction >= 0.9:
        raise ConfigError(
            "splitTestFraction: splitValidationFraction + splitTestFraction must leave at least 10 % "
            "for training"
        )


def settings_from_context(get: Callable[[str], Any]) -> Settings:
    """Build the settings from a context lookup (``app.node.try_get_context`` or a dict's ``get``).

    Every problem is collected first, so one synth reports all wrong keys at once.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, (key, parse) in _SPEC.items():
        raw = get(key)
        if raw is None:
            problems.append(f"{key}: missing from the CDK context (its default belongs in cdk.json)")
            continue
        try:
            values[name] = parse(raw)
        except ValueError as error:
            problems.append(f"{key}: {error}")
    if problems:
        raise ConfigError("invalid invmon settings:\n  " + "\n  ".join(problems))
    settings = Settings(**values)
    _cross_checks(settings)
    return settings


def default_context() -> dict[str, Any]:
    """The context block of ``cdk.json``: the defaults of every knob."""
    return dict(json.loads(CDK_JSON.read_text())["context"])


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """The defaults from ``cdk.json`` with ``overrides`` (context keys) applied; for tools and tests."""
    context = default_context() | dict(overrides or {})
    return settings_from_context(context.get)
