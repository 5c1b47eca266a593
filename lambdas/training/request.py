"""The SageMaker CreateTrainingJob / CreateHyperParameterTuningJob requests, as pure functions.

``build(deployment, overrides, channels, execution, started_at)`` takes what the stack fixed at deploy time
(:class:`Deployment`: role, bucket, images, config defaults) and what one execution asks for
(``$.input.training``, parsed into :class:`TrainingInput`), checks the combination, and returns the request
the state machine passes to SageMaker. Every refusal is a :class:`TrainingInputError` whose message starts
with the field to change, so a bad input stops the execution before any job starts.

The state machine maps the request's top-level fields one by one (JSONPath cannot splice a whole object
into a task's parameters), so the builder emits exactly :func:`training_fields` / :data:`TUNING_FIELDS`;
the stack builds its task states from the same functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from pydantic.alias_generators import to_camel

from lambdas.training.arguments import HyperparameterError, check_hyperparameters, check_value
from lambdas.training.limits import check_training_instance_type, limits

# Where the framework container finds the code: the source tarball arrives as the "code" channel, so the
# container never needs S3 access of its own (this is how the SageMaker SDK runs script mode under network
# isolation; it works the same without isolation).
CODE_CHANNEL = "code"
CODE_DIR = f"/opt/ml/input/data/{CODE_CHANNEL}"
ENTRY_POINT = "ml/train.py"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
DATA_CHANNELS = ("train", "validation", "test")
REQUIRED_CHANNELS = ("train", "validation")
# What the trainer prints each epoch ("epoch=3; train_loss=0.91; valid_accuracy=0.512; valid_rmse=0.98;"), and
# its own health line in place of Debugger's rules ("health: grad_norm=2.1; data_wait_share=0.04; ...", ml/health.py).
METRICS = ("epoch", "train_loss", "valid_loss", "valid_accuracy", "valid_rmse", "valid_mae",
           "grad_norm", "data_wait_share", "health_warnings", "health_fatal")
OBJECTIVE_METRIC = "valid_accuracy"
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
# The trainer's reading of the train channel that matches each S3DataDistributionType (ml/channel.py).
DATA_DISTRIBUTION = "data-distribution"
TRAINER_DISTRIBUTION = {"ShardedByS3Key": "sharded", "FullyReplicated": "replicated"}
# Tuned hyperparameters, by the trainer's argument names.
LEARNING_RATE, BATCH_SIZE, EPOCHS = "lr", "batch-size", "epochs"
# Time a job may spend outside MaxRuntime/MaxWait (provisioning, downloading, uploading the model, the
# Debugger rules finishing) before the state machine gives up on it and stops it.
STATE_TIMEOUT_MARGIN_SECONDS = 3600
MAX_TRAINING_NAME, MAX_TUNING_NAME = 63, 32
# SageMaker limits: MaxRuntimeInSeconds/MaxWaitTimeInSeconds of a training job, MaxRuntime of a tuning job.
MAX_JOB_SECONDS = 28 * 24 * 3600
MAX_TUNING_SECONDS = 30 * 24 * 3600

INSTANCE_TYPE = re.compile(r"ml\.(?P<family>[a-z][a-z0-9-]*)\.(?P<size>[0-9]*x?large|medium|small|micro)")
# Instance families whose local NVMe storage is encrypted by the hardware: SageMaker refuses a
# VolumeKmsKeyId for them ("You can't request a VolumeKmsKeyId when using an instance type with local
# storage"). The families ending in "d"/"dn" (m5d, c6id, g4dn, p4d, ...) are matched by pattern.
_LOCAL_STORAGE_FAMILIES = {"g5", "g6", "g6e", "gr6", "p5", "p5e", "p5en", "trn1", "trn1n", "trn2"}
_JOB_NAME_PREFIX_BUDGET = MAX_TUNING_NAME - len("-yymmddHHMMSS-abcdef")


class TrainingInputError(ValueError):
    """The execution input (or its combination with the config) cannot become a job; the message names the
    field."""


def processor(instance_type: str) -> Literal["cpu", "gpu"]:
    """Which PyTorch image an instance type needs; refuses types the PyTorch framework images do not run on."""
    match = INSTANCE_TYPE.fullmatch(instance_type)
    if match is None:
        raise TrainingInputError(
            f"instanceType: expected ml.<family>.<size> such as ml.g4dn.xlarge, got {instance_type!r}"
        )
    family = match["family"]
    if family.startswith(("inf", "trn")):
        raise TrainingInputError(
            f"instanceType: {instance_type} needs the Neuron images, which this pipeline does not use; "
            "choose a CPU (ml.c5.*, ml.m5.*) or GPU (ml.g4dn.*, ml.g5.*, ml.p3.*) type"
        )
    return "gpu" if family.startswith(("p", "g")) else "cpu"


def has_local_storage(instance_type: str) -> bool:
    family = INSTANCE_TYPE.fullmatch(instance_type)["family"]  # type: ignore[index]
    return family in _LOCAL_STORAGE_FAMILIES or re.fullmatch(r"[a-z]+[0-9]+[a-z]*dn?", family) is not None


# --- what the stack fixes at deploy time --------------------------------------------------------------


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TuningDefaults(_Camel):
    enabled: bool
    max_jobs: int
    max_parallel_jobs: int
    learning_rate: tuple[float, float]
    batch_sizes: tuple[int, ...]
    epochs: tuple[int, int]


class Deployment(_Camel):
    """Everything the stack decides: written into the prepare Lambda's environment as JSON."""

    project: str
    stage: str
    region: str
    role_arn: str
    bucket: str
    kms_key_arn: str
    source_dir: str  # s3:// URI of sourcedir.tar.gz
    pretrained: str | None = None  # s3:// URI of the ImageNet weights the stack deploys (the default channel)
    images: dict[str, str]  # processor ("cpu"/"gpu") -> training image URI for this region
    debugger_image: str  # rule evaluator image, or "none" where the region has none
    debugger: bool
    profiler: bool
    subnets: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    instance_type: str
    instance_count: int
    use_spot: bool
    max_runtime_seconds: int
    max_wait_seconds: int
    volume_size_gb: int
    network_isolation: bool
    epochs: int
    hyperparameters: dict[str, str | int | float | bool] = {}
    # How the data channels are read (trainingInputMode, trainingDataDistribution; see _channels).
    input_mode: Literal["File", "FastFile"]
    data_distribution: Literal["ShardedByS3Key", "FullyReplicated"]
    tuning: TuningDefaults
    # Seconds after the execution's start by which the training stage must end (infra/budget.py); None: unchecked.
    training_deadline_seconds: int | None = None


def training_fields(*, debugger: bool, profiler: bool, vpc: bool) -> tuple[str, ...]:
    """The top-level CreateTrainingJob fields the builder emits for a deployment with these switches."""
    fields = [
        "TrainingJobName", "RoleArn", "AlgorithmSpecification", "HyperParameters", "InputDataConfig",
        "OutputDataConfig", "ResourceConfig", "StoppingCondition", "EnableManagedSpotTraining",
        "CheckpointConfig", "EnableNetworkIsolation", "EnableInterContainerTrafficEncryption", "Tags",
    ]
    if vpc:
        fields.append("VpcConfig")
    if debugger:
        fields += ["DebugHookConfig", "DebugRuleConfigurations"]
    if profiler:
        fields += ["ProfilerConfig", "ProfilerRuleConfigurations"]
    return tuple(fields)


TUNING_FIELDS = ("HyperParameterTuningJobName", "HyperParameterTuningJobConfig", "TrainingJobDefinition", "Tags")


# --- what one execution asks for ----------------------------------------------------------------------

_Seconds = Annotated[StrictInt, Field(ge=60, le=MAX_JOB_SECONDS)]
_HyperparameterValue = StrictStr | StrictBool | StrictInt | StrictFloat


class TuningInput(_Camel):
    enabled: StrictBool | None = None
    max_jobs: Annotated[StrictInt, Field(ge=1, le=500)] | None = None
    max_parallel_jobs: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    # The values' ranges are the trainer's own (--lr, --batch-size, --epochs): check() asks its parser.
    learning_rate: tuple[StrictFloat, StrictFloat] | None = None
    batch_sizes: Annotated[list[StrictInt], Field(min_length=1)] | None = None
    epochs: tuple[StrictInt, StrictInt] | None = None


class TrainingInput(_Camel):
    """``$.input.training``: every field optional, unknown fields refused (a typo must not pass silently)."""

    instance_type: StrictStr | None = None
    instance_count: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    use_spot: StrictBool | None = None
    max_runtime_seconds: _Seconds | None = None
    max_wait_seconds: _Seconds | None = None
    volume_size_gb: Annotated[StrictInt, Field(ge=1, le=16384)] | None = None
    network_isolation: StrictBool | None = None
    epochs: StrictInt | None = None  # the trainer's --epochs; its range is checked by the trainer's parser
    hyperparameters: dict[str, _HyperparameterValue] = {}
    pretrained: StrictStr | None = None
    tuning: TuningInput | None = None


def parse_input(raw: Any) -> TrainingInput:
    """``$.input.training`` (None or an object) -> :class:`TrainingInput`, or a readable refusal."""
    try:
        return TrainingInput.model_validate(raw or {})
    except ValidationError as error:
        raise TrainingInputError(describe(error, root="training")) from None


def describe(error: ValidationError, *, root: str) -> str:
    """One line per problem, each led by the dotted path of the field as the user wrote it."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in (root, *problem["loc"]))
        lines.append(f"{where}: {problem['msg']} (got {problem.get('input')!r})")
    return "invalid training input: " + "; ".join(lines)


# --- the resolved choice and its checks ---------------------------------------------------------------


class Plan(BaseModel):
    """The deployment's defaults with the execution's overrides applied."""

    model_config = ConfigDict(frozen=True)

    instance_type: str
    instance_count: int
    use_spot: bool
    max_runtime_seconds: int
    max_wait_seconds: int
    volume_size_gb: int
    network_isolation: bool
    hyperparameters: dict[str, str | int | float | bool]
    pretrained: str | None
    tuning: bool
    max_jobs: int
    max_parallel_jobs: int
    learning_rate: tuple[float, float]
    batch_sizes: tuple[int, ...]
    epochs_range: tuple[int, int]


def resolve(deployment: Deployment, overrides: TrainingInput) -> Plan:
    tuning_in = overrides.tuning or TuningInput()
    defaults = deployment.tuning

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    hyperparameters = {
        EPOCHS: pick(overrides.epochs, deployment.epochs),
        **deployment.hyperparameters,
        **overrides.hyperparameters,
    }
    for source, given in (("the deployment's hyperparameters", deployment.hyperparameters),
                          ("training.hyperparameters", overrides.hyperparameters)):
        if DATA_DISTRIBUTION in given:
            raise TrainingInputError(
                f"{source}.{DATA_DISTRIBUTION}: set from trainingDataDistribution, which also decides how SageMaker "
                "hands the train channel to each host; deploy with -c trainingDataDistribution=... to change both"
            )
    # The trainer must split the train shards the way SageMaker delivered them: with ShardedByS3Key each host
    # already holds only its share, so re-splitting by rank would train on a fraction of the data.
    hyperparameters[DATA_DISTRIBUTION] = TRAINER_DISTRIBUTION[deployment.data_distribution]
    plan = Plan(
        instance_type=pick(overrides.instance_type, deployment.instance_type),
        instance_count=pick(overrides.instance_count, deployment.instance_count),
        use_spot=pick(overrides.use_spot, deployment.use_spot),
        max_runtime_seconds=pick(overrides.max_runtime_seconds, deployment.max_runtime_seconds),
        max_wait_seconds=pick(overrides.max_wait_seconds, deployment.max_wait_seconds),
        volume_size_gb=pick(overrides.volume_size_gb, deployment.volume_size_gb),
        network_isolation=pick(overrides.network_isolation, deployment.network_isolation),
        hyperparameters=hyperparameters,
        pretrained=pick(overrides.pretrained, deployment.pretrained),
        tuning=pick(tuning_in.enabled, defaults.enabled),
        max_jobs=pick(tuning_in.max_jobs, defaults.max_jobs),
        max_parallel_jobs=pick(tuning_in.max_parallel_jobs, defaults.max_parallel_jobs),
        learning_rate=tuple(pick(tuning_in.learning_rate, defaults.learning_rate)),
        batch_sizes=tuple(sorted(set(pick(tuning_in.batch_sizes, defaults.batch_sizes)))),
        epochs_range=tuple(pick(tuning_in.epochs, defaults.epochs)),
    )
    if overrides.epochs is not None:
        try:
            check_value(EPOCHS, overrides.epochs)
        except HyperparameterError as error:
            raise TrainingInputError(f"training.epochs: {error.problem}") from None
    check(plan, deployment)
    return plan


def check_instance_type(instance_type: str) -> Literal["cpu", "gpu"]:
    """A type SageMaker training offers (limits.json) that the PyTorch images run on; synth asks the same."""
    kind = processor(instance_type)
    try:
        check_training_instance_type(instance_type)
    except ValueError as error:
        raise TrainingInputError(f"instanceType: {error}") from None
    return kind


# The container's own entries share SageMaker's 100: four from _container_hyperparameters plus the job name
# (a tuning job's trials get _tuning_objective_metric from SageMaker instead).
_CONTAINER_ENTRIES = 5


def check_tuning_range(field: str, name: str, values: tuple[Any, ...]) -> None:
    """Each end of a tuning range (or each categorical value) must be a value the trainer accepts for ``name``."""
    for value in values:
        try:
            check_value(name, value)
        except HyperparameterError as error:
            raise TrainingInputError(f"training.tuning.{field}: {error.problem}") from None


def check(plan: Plan, deployment: Deployment) -> None:
    """The rules no single field can check alone. Raises :class:`TrainingInputError` naming the field."""
    try:
        kind = check_instance_type(plan.instance_type)
    except TrainingInputError as error:
        raise TrainingInputError(f"training.{error}") from None
    # The stack writes "none" where its region lacks an image.
    if ".dkr.ecr." not in deployment.images.get(kind, ""):
        raise TrainingInputError(f"training.instanceType: no PyTorch {kind.upper()} training image for "
                                 f"{plan.instance_type} in {deployment.region}")
    if plan.use_spot and plan.max_wait_seconds < plan.max_runtime_seconds:
        raise TrainingInputError(
            f"training.maxWaitSeconds: must be at least maxRuntimeSeconds ({plan.max_runtime_seconds}) when "
            f"useSpot is true, got {plan.max_wait_seconds}"
        )
    sagemaker = limits()["hyperParameters"]
    try:
        check_hyperparameters(plan.hyperparameters, max_entries=sagemaker["maxEntries"] - _CONTAINER_ENTRIES,
                              max_value_length=sagemaker["maxValueLength"])
    except HyperparameterError as error:
        raise TrainingInputError(error.where("training.hyperparameters")) from None
    if plan.pretrained not in (None, deployment.pretrained) and not re.fullmatch(
        rf"s3://{re.escape(deployment.bucket)}/(models|raw)/\S+", plan.pretrained
    ):
        raise TrainingInputError(
            f"training.pretrained: must be an s3:// URI under models/ or raw/ of the data bucket "
            f"({deployment.bucket}), which the training role can read; got {plan.pretrained!r}"
        )
    if not plan.tuning:
        return
    if plan.max_parallel_jobs > plan.max_jobs:
        raise TrainingInputError(
            f"training.tuning.maxParallelJobs: must not exceed maxJobs ({plan.max_jobs}), got "
            f"{plan.max_parallel_jobs}"
        )
    check_tuning_range("learningRate", LEARNING_RATE, plan.learning_rate)
    check_tuning_range("epochs", EPOCHS, plan.epochs_range)
    check_tuning_range("batchSizes", BATCH_SIZE, plan.batch_sizes)
    if len(plan.batch_sizes) > limits()["maxCategoricalValues"]:
        raise TrainingInputError(f"training.tuning.batchSizes: SageMaker tunes at most "
                                 f"{limits()['maxCategoricalValues']} values, got {len(plan.batch_sizes)}")
    low, high = plan.learning_rate
    if not 0 < low < high:
        raise TrainingInputError(
            f"training.tuning.learningRate: expected [low, high] with 0 < low < high (the range is searched "
            f"on a log scale), got [{low}, {high}]"
        )
    low, high = plan.epochs_range
    if not 1 <= low < high:
        raise TrainingInputError(f"training.tuning.epochs: expected [low, high] with 1 <= low < high, got "
                                 f"[{low}, {high}]")
    tuned = sorted({LEARNING_RATE, BATCH_SIZE, EPOCHS} & (set(plan.hyperparameters) - {EPOCHS}))
    if tuned:
        raise TrainingInputError(
            f"training.hyperparameters.{tuned[0]}: tuned by the tuning job; set its range under training.tuning "
            "instead, or turn tuning off"
        )


# A channel the pipeline passes is a split's shard prefix (lambdas/pack/finish.py); a user may still pass a
# SageMaker manifest (lambdas/ingest/split.py writes one per split).
_SHARD_PREFIX_URI = r"shards/\S+/"
_MANIFEST_URI = r"manifests/\S+\.manifest"


def check_channels(channels: Any, bucket: str) -> dict[str, str]:
    """``$.pack.channels`` -> {channel: URI}; train and validation are required, each must be a shard prefix
    (``s3://<bucket>/shards/.../``) or a manifest (``s3://<bucket>/manifests/....manifest``) of the data bucket,
    which the training role can read."""
    if not isinstance(channels, dict):
        raise TrainingInputError(f"pack.channels: expected an object of shard prefixes, got {channels!r}")
    unknown = sorted(set(channels) - set(DATA_CHANNELS))
    if unknown:
        raise TrainingInputError(f"pack.channels.{unknown[0]}: not a training channel (expected "
                                 f"{', '.join(DATA_CHANNELS)})")
    for name in REQUIRED_CHANNELS:
        if not channels.get(name):
            raise TrainingInputError(f"pack.channels.{name}: missing; the trainer needs it")
    bucket_uri = rf"s3://{re.escape(bucket)}/"
    for name, uri in channels.items():
        if not isinstance(uri, str) or not re.fullmatch(rf"{bucket_uri}({_SHARD_PREFIX_URI}|{_MANIFEST_URI})", uri):
            raise TrainingInputError(
                f"pack.channels.{name}: expected a shard prefix s3://{bucket}/shards/.../ or a manifest "
                f"s3://{bucket}/manifests/....manifest, got {uri!r}"
            )
    return {name: channels[name] for name in DATA_CHANNELS if channels.get(name)}


def check_shard_hosts(plan: Plan, deployment: Deployment, channels: dict[str, str],
                      shards: dict[str, int] | None) -> None:
    """With ShardedByS3Key each instance gets its own share of the train channel's objects; more instances than
    shards leaves some with nothing ("Don't choose more ML compute instances for training than available S3
    objects. If you do, some nodes won't get any data": SageMaker API reference, S3DataSource)."""
    count = (shards or {}).get("train")
    if deployment.data_distribution != "ShardedByS3Key" or count is None or not channels["train"].endswith("/"):
        return
    if plan.instance_count > count:
        raise TrainingInputError(
            f"training.instanceCount: {plan.instance_count} instances but the train channel holds {count} shards; "
            "with ShardedByS3Key each instance reads its own shards, so some would get none: use at most "
            f"{count} instances, or pack smaller shards (packPhotosPerShard)"
        )


# --- names -------------------------------------------------------------------------------------------


def name_prefix(project: str, stage: str) -> str:
    """The start of every job name of this deployment; IAM scopes the state machine to it."""
    return f"{project}-{stage}"[:_JOB_NAME_PREFIX_BUDGET].rstrip("-")


def job_name(project: str, stage: str, execution: str, started_at: str) -> str:
    """Unique per execution and stable across retries of the same step: the execution's start time plus a
    digest of its name (which Step Functions keeps unique), short enough for a tuning job (32 characters)."""
    try:
        started = datetime.fromisoformat(started_at.replace("Z", "+00:00"))
    except ValueError:
        raise TrainingInputError(f"execution start time is not an ISO timestamp: {started_at!r}") from None
    digest = hashlib.sha256(execution.encode()).hexdigest()[:6]
    return f"{name_prefix(project, stage)}-{started:%y%m%d%H%M%S}-{digest}"


# --- the requests ------------------------------------------------------------------------------------


def metric_definitions() -> list[dict[str, str]]:
    # \b keeps "epoch=" from matching inside "best_epoch=".
    return [{"Name": name, "Regex": rf"\b{name}={_NUMBER}"} for name in METRICS]


def _encode(hyperparameters: dict[str, Any]) -> dict[str, str]:
    """JSON-encode each value as the SageMaker SDK does; the training toolkit json.loads each back."""
    return {name: json.dumps(value) for name, value in sorted(hyperparameters.items())}


def code_path(source_dir: str) -> str:
    """Where the source tarball lands in the container: an S3Prefix channel keeps the object's file name
    (a CDK asset's is its hash; the toolkit recognises a tarball by content, not name)."""
    return f"{CODE_DIR}/{source_dir.rsplit('/', 1)[-1]}"


def _container_hyperparameters(deployment: Deployment) -> dict[str, str]:
    return _encode({
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": code_path(deployment.source_dir),
        "sagemaker_container_log_level": 20,
        "sagemaker_region": deployment.region,
    })


def data_type(uri: str) -> Literal["S3Prefix", "ManifestFile"]:
    """A prefix (ending in '/', the pack stage's shards) is read as S3Prefix: every object under it; a
    ``.manifest`` is read as ManifestFile: the keys it lists (SageMaker API reference, S3DataSource.S3DataType)."""
    if uri.endswith("/"):
        return "S3Prefix"
    if uri.endswith(".manifest"):
        return "ManifestFile"
    raise TrainingInputError(f"pack.channels: {uri!r} is neither a prefix ending in '/' nor a .manifest")


def _channels(deployment: Deployment, plan: Plan, channels: dict[str, str]) -> list[dict[str, Any]]:
    """The job's channels. What the choices mean (SageMaker API reference, as botocore 1.44.8 ships it):

    - InputMode ``FastFile``: "SageMaker streams data directly from S3 to the container with no code changes,
      and provides file system access to the data", and "works best when the data is read sequentially", as a
      tar shard is; ``File`` "downloads the training data from S3 to the provisioned ML storage volume" before
      the first step (TrainingInputMode). trainingInputMode picks one for the data channels; the code and the
      pretrained weights, one small object each, stay ``File``.
    - S3DataDistributionType ``ShardedByS3Key``: "If there are n ML compute instances launched for a training
      job, each instance gets approximately 1/n of the number of S3 objects"; ``FullyReplicated`` replicates
      "the entire dataset on each ML compute instance" (S3DataSource). trainingDataDistribution applies to the
      train channel; validation and test stay FullyReplicated, because only rank 0 evaluates and it must see
      every photo of them.
    """
    def channel(name: str, uri: str, data_type: str, distribution: str, mode: str) -> dict[str, Any]:
        return {
            "ChannelName": name,
            "DataSource": {
                "S3DataSource": {
                    "S3DataType": data_type,
                    "S3Uri": uri,
                    "S3DataDistributionType": distribution,
                }
            },
            "InputMode": mode,
        }

    result = [
        channel(name, uri, data_type(uri),
                deployment.data_distribution if name == "train" else "FullyReplicated", deployment.input_mode)
        for name, uri in channels.items()
    ]
    result.append(channel(CODE_CHANNEL, deployment.source_dir, "S3Prefix", "FullyReplicated", "File"))
    if plan.pretrained:
        result.append(channel("pretrained", plan.pretrained, "S3Prefix", "FullyReplicated", "File"))
    return result


def _resources(deployment: Deployment, plan: Plan) -> dict[str, Any]:
    resources: dict[str, Any] = {
        "InstanceType": plan.instance_type,
        "InstanceCount": plan.instance_count,
        "VolumeSizeInGB": plan.volume_size_gb,
    }
    if not has_local_storage(plan.instance_type):
        resources["VolumeKmsKeyId"] = deployment.kms_key_arn
    return resources


def _stopping(plan: Plan) -> dict[str, int]:
    stopping = {"MaxRuntimeInSeconds": plan.max_runtime_seconds}
    if plan.use_spot:
        stopping["MaxWaitTimeInSeconds"] = plan.max_wait_seconds
    return stopping


def _job_seconds(plan: Plan) -> int:
    return plan.max_wait_seconds if plan.use_spot else plan.max_runtime_seconds


def _common(deployment: Deployment, plan: Plan, channels: dict[str, str], checkpoints: str | None) -> dict[str, Any]:
    """The parts a single job and a tuning job's training definition share."""
    common: dict[str, Any] = {
        "RoleArn": deployment.role_arn,
        "InputDataConfig": _channels(deployment, plan, channels),
        "OutputDataConfig": {"S3OutputPath": f"s3://{deployment.bucket}/models/",
                             "KmsKeyId": deployment.kms_key_arn},
        "ResourceConfig": _resources(deployment, plan),
        "StoppingCondition": _stopping(plan),
        "EnableManagedSpotTraining": plan.use_spot,
        "EnableNetworkIsolation": plan.network_isolation,
        # Instances of one job exchange weights (DDP); SageMaker encrypts that traffic when asked. One instance
        # has no such traffic, so it pays nothing for it (docs.aws.amazon.com/sagemaker/latest/dg/train-encrypt.html).
        "EnableInterContainerTrafficEncryption": plan.instance_count > 1,
    }
    if checkpoints:
        common["CheckpointConfig"] = {"S3Uri": checkpoints, "LocalPath": CHECKPOINT_LOCAL_PATH}
    if deployment.subnets:
        common["VpcConfig"] = {"Subnets": list(deployment.subnets),
                               "SecurityGroupIds": list(deployment.security_groups)}
    return common


def _tags(deployment: Deployment, execution: str) -> list[dict[str, str]]:
    return [
        {"Key": "project", "Value": deployment.project},
        {"Key": "stage", "Value": deployment.stage},
        # Execution names allow characters tag values do not.
        {"Key": "execution", "Value": re.sub(r"[^\w.:/=+\-@ ]", "_", execution)[:256]},
    ]


def _rule(deployment: Deployment, rule: str, **parameters: str) -> dict[str, Any]:
    return {
        "RuleConfigurationName": rule,
        "RuleEvaluatorImage": deployment.debugger_image,
        "RuleParameters": {"rule_to_invoke": rule, **parameters},
    }


def _debugging(deployment: Deployment, name: str) -> tuple[dict[str, Any], list[str]]:
    """Debugger hook, built-in rules, profiler and profiler rules, only where the deployment opts in.

    Off by default: AWS closed Debugger to new customers ("we have made the decision to close new customer
    access to Amazon SageMaker Debugger, effective 7/30/26", docs.aws.amazon.com/sagemaker/latest/dg/
    debugger-createtrainingjob-api.html), so a default request carries none of its four fields and works in
    every account; the trainer checks its own health instead (ml/health.py). Accounts that used Debugger
    before that date may still switch it on (trainingDebugger, trainingProfiler)."""
    fields: dict[str, Any] = {}
    notes: list[str] = []
    output = f"s3://{deployment.bucket}/reports/training/{name}"
    rules_available = ".dkr.ecr." in deployment.debugger_image
    if (deployment.debugger or deployment.profiler) and not rules_available:
        notes.append(f"no Debugger rule image in {deployment.region}: rules skipped")
    if deployment.debugger:
        fields["DebugHookConfig"] = {
            "S3OutputPath": f"{output}/debug-output",
            # The tensors the rules read, as the SageMaker SDK's Rule.sagemaker(...) asks for them.
            "CollectionConfigurations": [
                {"CollectionName": "losses", "CollectionParameters": {"save_interval": "500"}},
                {"CollectionName": "gradients", "CollectionParameters": {"save_interval": "500"}},
            ],
        }
        fields["DebugRuleConfigurations"] = [
            _rule(deployment, "LossNotDecreasing"),
            _rule(deployment, "Overfit"),
            _rule(deployment, "VanishingGradient"),
        ] if rules_available else []
    if deployment.profiler:
        fields["ProfilerConfig"] = {"S3OutputPath": f"{output}/profiler-output",
                                    "ProfilingIntervalInMilliseconds": 500}
        fields["ProfilerRuleConfigurations"] = [
            _rule(deployment, "ProfilerReport"),
            # The SDK's defaults for this rule (sagemaker.debugger.rule_configs.LowGPUUtilization).
            _rule(deployment, "LowGPUUtilization", threshold_p95="70", threshold_p5="10", window="500",
                  patience="1000", scan_interval_us="60000000"),
        ] if rules_available else []
    return fields, notes


def _state_timeout(seconds: int) -> int:
    return seconds + STATE_TIMEOUT_MARGIN_SECONDS


def build(
    deployment: Deployment,
    overrides: TrainingInput,
    channels: Any,
    *,
    execution: str,
    started_at: str,
    shards: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The prepare step's output: ``mode``, ``jobName``, ``timeoutSeconds``, ``request`` (the API request's
    fields) and ``notes`` (choices the user should know about). ``shards`` (``$.pack.shards``), where given,
    lets a job that would leave instances without data be refused before it starts."""
    plan = resolve(deployment, overrides)
    checked = check_channels(channels, deployment.bucket)
    check_shard_hosts(plan, deployment, checked, shards)
    name = job_name(deployment.project, deployment.stage, execution, started_at)
    if plan.tuning:
        return _tuning(deployment, plan, checked, name, execution)
    checkpoints = f"s3://{deployment.bucket}/checkpoints/{name}/"
    debugging, notes = _debugging(deployment, name)
    request = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {
            "TrainingImage": deployment.images[processor(plan.instance_type)],
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(),
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": {**_encode(plan.hyperparameters), **_container_hyperparameters(deployment),
                            "sagemaker_job_name": json.dumps(name)},
        **_common(deployment, plan, checked, checkpoints),
        "Tags": _tags(deployment, execution),
        **debugging,
    }
    expected = training_fields(debugger=deployment.debugger, profiler=deployment.profiler,
                               vpc=bool(deployment.subnets))
    if set(request) != set(expected):  # the state machine maps exactly these fields
        raise RuntimeError(f"request fields differ from the task's: {sorted(set(request) ^ set(expected))}")
    if plan.instance_count > 1:
        notes.append(f"{plan.instance_count} instances: the trainer starts DDP from SM_HOSTS itself")
    return {
        "mode": "training",
        "jobName": name,
        "timeoutSeconds": _state_timeout(_job_seconds(plan)),
        "request": request,
        "notes": notes,
    }


def _tuning(deployment: Deployment, plan: Plan, channels: dict[str, str], name: str,
            execution: str) -> dict[str, Any]:
    static = {k: v for k, v in plan.hyperparameters.items() if k != EPOCHS}
    waves = math.ceil(plan.max_jobs / plan.max_parallel_jobs)
    tuning_seconds = min(waves * _job_seconds(plan), MAX_TUNING_SECONDS)
    # No CheckpointConfig for trials: the definition has one checkpoint URI for every trial, and the trainer
    # resumes from whatever checkpoint it finds, so trial 2 could resume trial 1's finished run. A spot
    # interruption restarts a trial from scratch instead (trials are short: tuningEpochsRange).
    definition = {
        "AlgorithmSpecification": {
            "TrainingImage": deployment.images[processor(plan.instance_type)],
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(),
        },
        "StaticHyperParameters": {**_encode(static), **_container_hyperparameters(deployment)},
        **_common(deployment, plan, channels, None),
    }
    low_lr, high_lr = plan.learning_rate
    low_epochs, high_epochs = plan.epochs_range
    config = {
        "Strategy": "Bayesian",
        "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": OBJECTIVE_METRIC},
        "ResourceLimits": {
            "MaxNumberOfTrainingJobs": plan.max_jobs,
            "MaxParallelTrainingJobs": plan.max_parallel_jobs,
            "MaxRuntimeInSeconds": max(tuning_seconds, 120),
        },
        "ParameterRanges": {
            "ContinuousParameterRanges": [
                {"Name": LEARNING_RATE, "MinValue": repr(low_lr), "MaxValue": repr(high_lr),
                 "ScalingType": "Logarithmic"}
            ],
            "IntegerParameterRanges": [
                {"Name": EPOCHS, "MinValue": str(low_epochs), "MaxValue": str(high_epochs), "ScalingType": "Linear"}
            ],
            "CategoricalParameterRanges": [
                {"Name": BATCH_SIZE, "Values": [str(size) for size in plan.batch_sizes]}
            ],
        },
        "TrainingJobEarlyStoppingType": "Auto",
    }
    notes = []
    if deployment.debugger or deployment.profiler:
        notes.append("tuning jobs take no Debugger rules or profiler configuration: findings are recorded "
                     "for single training jobs only")
    return {
        "mode": "tuning",
        "jobName": name,
        "timeoutSeconds": _state_timeout(tuning_seconds),
        "request": {
            "HyperParameterTuningJobName": name,
            "HyperParameterTuningJobConfig": config,
            "TrainingJobDefinition": definition,
            "Tags": _tags(deployment, execution),
        },
        "notes": notes,
    }
