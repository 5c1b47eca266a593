"""The one way invmon builds a Lambda function: Python 3.14, arm64, Powertools layer, X-Ray, JSON logs into a
log group with a set retention, and a role that may write to that log group only."""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Aws, Duration, RemovalPolicy, Stack, Tags
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.config import Settings
from infra.nag import XRAY_REASON, suppress, wildcard_suppression

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUNTIME = lambda_.Runtime.PYTHON_3_14
# Powertools for AWS Lambda (Python) v3, the public layer that AWS publishes in every commercial region.
POWERTOOLS_LAYER = "arn:{partition}:lambda:{region}:017000801446:layer:AWSLambdaPowertoolsPythonV3-python314-arm64:38"

# One code asset for every function: the lambdas package plus the torch-free ABID and shard modules it shares
# with the trainer, and the trainer's source as text (the prepare step reads its argument parser without importing
# torch: lambdas/training/arguments.py). Everything else in the repository stays out of the zip. CDK matches these
# globs with minimatch's default of dot=false, so "*" leaves dot-files in (.venv/.installed-stamp, .git, .ci were
# staged): ".*" patterns exclude them, since a stray one changes the asset hash and redeploys every function.
TRAINER_SOURCES = ("ml/train.py", "ml/model.py", "ml/pretrained.py")
_ASSET_EXCLUDE = [
    "*",
    "!lambdas",
    "!lambdas/**",
    "!ml",
    "!ml/__init__.py",
    "!ml/abid.py",
    "!ml/shards.py",
    "!ml/decisions.py",
    *(f"!{path}" for path in TRAINER_SOURCES),
    ".*",
    "**/.*",
    "**/__pycache__",
    "**/*.pyc",
]


def code_asset() -> lambda_.Code:
    return lambda_.Code.from_asset(str(PROJECT_ROOT), exclude=_ASSET_EXCLUDE)


class PythonFunction(Construct):
    """A Lambda function running ``handler`` (a dotted path inside the repository, e.g.
    ``lambdas.ingest.select.handler``)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        handler: str,
        service: str,
        description: str,
        environment: dict[str, str] | None = None,
        timeout_seconds: int = 60,
        memory_size: int = 512,
        reserved_concurrency: int | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.log_group = log_group(self, settings)
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"{settings.project} {service}: runs one Lambda function",
        )
        self.log_group.grant_write(self.role)
        self.function = lambda_.Function(
            self,
            "Function",
            runtime=RUNTIME,
            architecture=lambda_.Architecture.ARM_64,
            handler=handler,
            code=code_asset(),
            description=description,
            role=self.role,
            timeout=Duration.seconds(timeout_seconds),
            memory_size=memory_size,
            reserved_concurrent_executions=reserved_concurrency,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=self.log_group,
            logging_format=lambda_.LoggingFormat.JSON,
            layers=[
                lambda_.LayerVersion.from_layer_version_arn(
                    self,
                    "Powertools",
                    POWERTOOLS_LAYER.format(partition=stack.partition, region=stack.region),
                )
            ],
            environment={
                "POWERTOOLS_SERVICE_NAME": service,
                "POWERTOOLS_METRICS_NAMESPACE": settings.project,
                "INVMON_STAGE": settings.stage,
                **(environment or {}),
            },
        )
        # Only X-Ray's '*' is this construct's: every other wildcard on the role is granted, and suppressed
        # with its own reason, by the construct that uses the function.
        suppress(self.role, wildcard_suppression(self, XRAY_REASON, resources=["*"]))


# CloudWatch accepts only these retention periods (days); RetentionDays names them, in this order.
_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                   3288, 3653)
_RETENTIONS = dict(zip(_RETENTION_DAYS, [m for m in logs.RetentionDays if m is not logs.RetentionDays.INFINITE],
                       strict=True))


def retention(days: int) -> logs.RetentionDays:
    """The shortest retention CloudWatch offers that keeps logs at least ``days`` long."""
    return _RETENTIONS[next((choice for choice in _RETENTION_DAYS if choice >= days), _RETENTION_DAYS[-1])]


def log_group(scope: Construct, settings: Settings, construct_id: str = "Logs", *,
              name: str | None = None) -> logs.LogGroup:
    """A log group with the configured retention, encrypted with the stack's logs key, kept in production and
    removed with a dev stack. ``name`` pre-creates a group a service writes to by name (SageMaker's own)."""
    return logs.LogGroup(
        scope,
        construct_id,
        log_group_name=name,
        retention=retention(settings.log_retention_days),
        encryption_key=logs_key(scope, settings),
        removal_policy=RemovalPolicy.RETAIN if settings.is_production else RemovalPolicy.DESTROY,
    )


LOGS_KEY_ID = "LogsKey"


def logs_key(scope: Construct, settings: Settings) -> kms.Key:
    """The stack's one customer-managed key for CloudWatch Logs, made on first use.

    CloudWatch Logs uses the key as the regional service principal, and its key policy may hold that principal to
    this account's log groups with the ``kms:EncryptionContext:aws:logs:arn`` condition ("Encrypt log data in
    CloudWatch Logs using AWS KMS", Step 2: set permissions on the key,
    docs.aws.amazon.com/AmazonCloudWatch/latest/logs/encrypt-log-data-kms.html).
    """
    stack = Stack.of(scope)
    existing = stack.node.try_find_child(LOGS_KEY_ID)
    if existing is not None:
        return existing  # type: ignore[return-value]
    key = kms.Key(
        stack,
        LOGS_KEY_ID,
        description=f"{settings.project}: encrypts every log group of the stack (Lambdas, state machines, SageMaker)",
        enable_key_rotation=True,
        removal_policy=RemovalPolicy.RETAIN if settings.is_production else RemovalPolicy.DESTROY,
    )
    Tags.of(key).add("component", "observability")
    key.add_to_resource_policy(iam.PolicyStatement(
        sid="CloudWatchLogsForThisAccountsLogGroups",
        principals=[iam.ServicePrincipal(f"logs.{Aws.REGION}.amazonaws.com")],
        actions=["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"],
        resources=["*"],
        conditions={"ArnLike": {
            "kms:EncryptionContext:aws:logs:arn": f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:*",
        }},
    ))
    return key
