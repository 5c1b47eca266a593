"""Training: the SageMaker execution role, the trainer's source as an asset, the prepare/report Lambdas and
the training stage of the pipeline (a single job or a tuning job, waited on with ``.sync``).

Stage contract: reads ``$.input.training`` (optional) and ``$.ingest.channels``; writes ``$.training`` (see
lambdas/training/report.py) and leaves the prepared request at ``$.trainingRequest`` for the record.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from aws_cdk import Aws, Duration, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from cdk_nag import NagSuppressions
from constructs import Construct

from infra.config import Settings
from infra.function import PROJECT_ROOT, PythonFunction
from infra.images import debugger_image_for_stack_region, image_for_stack_region
from infra.storage import CHECKPOINT_PREFIX, MANIFEST_PREFIX, MODEL_PREFIX, RAW_PREFIX, REPORT_PREFIX
from lambdas.training.prepare import DEPLOYMENT_ENV
from lambdas.training.request import STATE_TIMEOUT_MARGIN_SECONDS, TUNING_FIELDS, name_prefix, training_fields

TRAINING_REPORT_PREFIX = f"{REPORT_PREFIX}training/"
# Debugger/profiler rules usually finish minutes after the job; the report step looks again this often, at
# most this many times, then records whatever state they are in.
RULE_POLL_INTERVAL = Duration.seconds(60)
RULE_POLL_ATTEMPTS = 15
# Throttling and transient service errors on Create*/Describe* are worth retrying; a job that failed is
# not (that surfaces as States.TaskFailed and goes to the stop-and-fail path).
SAGEMAKER_RETRYABLE = ["SageMaker.AmazonSageMakerException", "SageMaker.ThrottlingException", "ThrottlingException"]
_SOURCE_EXCLUDED_PARTS = {"__pycache__", ".pytest_cache"}
# For the state machine that runs this stage (its role is the pipeline's): the wildcards the stage adds.
STATE_MACHINE_IAM5_REASON = (
    "SageMaker job ARNs are limited to this deployment's job-name prefix (names are made per execution); "
    "Lambda ARNs end in ':*' to invoke the functions' versions; X-Ray and log delivery accept no resource "
    "narrower than '*'."
)


def stage_timeout_seconds(settings: Settings) -> int:
    """The longest the training stage can run with the config's defaults (a tuning job's waves of spot
    trials, or one job), so the pipeline's overall timeout can be set above it. Execution inputs that ask
    for more time can exceed it."""
    job = settings.training_max_wait_seconds if settings.training_use_spot else settings.training_max_runtime_seconds
    waves = -(-settings.tuning_max_jobs // settings.tuning_max_parallel_jobs) if settings.tuning_enabled else 1
    rules = int(RULE_POLL_INTERVAL.to_seconds()) * RULE_POLL_ATTEMPTS
    return waves * job + STATE_TIMEOUT_MARGIN_SECONDS + rules


def build_source_tarball(source: Path = PROJECT_ROOT / "ml") -> Path:
    """``sourcedir.tar.gz`` with the ``ml`` package at its root, byte-for-byte the same for the same files
    (sorted members, zero mtimes and owners, gzip without a timestamp) so the asset hash only changes when
    the code does. The framework container accepts a tar.gz only; a CDK directory asset would be a zip."""
    files = sorted(
        path for path in source.rglob("*")
        if path.is_file() and not _SOURCE_EXCLUDED_PARTS & set(path.parts) and path.suffix != ".pyc"
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(source).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    target = Path(tempfile.gettempdir()) / f"invmon-sourcedir-{digest.hexdigest()[:20]}" / "sourcedir.tar.gz"
    if target.exists():
        return target
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as compressed, \
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{source.name}/{path.relative_to(source).as_posix()}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(buffer.getvalue())
    partial.replace(target)  # atomic: parallel synths never see half a file
    return target


class SageMakerJobState(sfn.CustomState):
    """A ``CustomState`` that also hands its IAM statements to whichever state machine it ends up in, as
    CDK's own task states do (CustomState alone grants nothing)."""

    def __init__(self, scope: Construct, construct_id: str, *, state_json: dict[str, Any],
                 policy_statements: list[iam.PolicyStatement]) -> None:
        super().__init__(scope, construct_id, state_json=state_json)
        self._policy_statements = policy_statements

    def bind_to_graph(self, graph: sfn.StateGraph) -> None:
        super().bind_to_graph(graph)
        for statement in self._policy_statements:
            graph.register_policy_statement(statement)


class TrainingStage(sfn.StateMachineFragment):
    """Prepare -> (single training job | tuning job), each ``.sync`` -> report (waiting for Debugger rules)."""

    def __init__(self, scope: Construct, construct_id: str, *, training: Training) -> None:
        super().__init__(scope, construct_id)
        settings = training.settings
        failed = sfn.Fail(self, "TrainingFailed", comment="Training stopped: the cause says why",
                          error_path="$.trainingError.Error", cause_path="$.trainingError.Cause")

        prepare = tasks.LambdaInvoke(
            self, "PrepareTraining",
            comment="Builds and checks the job request; a bad input fails here, before any job starts",
            lambda_function=training.prepare.function,
            payload=sfn.TaskInput.from_object({
                "input": sfn.JsonPath.object_at("$.input"),
                "channels": sfn.JsonPath.object_at("$.ingest.channels"),
                "execution": sfn.JsonPath.execution_name,
                "startedAt": sfn.JsonPath.string_at("$$.Execution.StartTime"),
            }),
            payload_response_only=True,
            result_path="$.trainingRequest",
            task_timeout=sfn.Timeout.duration(Duration.minutes(1)),
        )
        prepare.add_catch(failed, errors=["States.ALL"], result_path="$.trainingError")

        partition, region, account = Aws.PARTITION, Aws.REGION, Aws.ACCOUNT_ID
        prefix = name_prefix(settings.project, settings.stage)
        job_arn = f"arn:{partition}:sagemaker:{region}:{account}:training-job/{prefix}-*"
        tuning_arn = f"arn:{partition}:sagemaker:{region}:{account}:hyper-parameter-tuning-job/{prefix}-*"
        pass_role = iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[training.role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        )

        def events_rule(name: str) -> iam.PolicyStatement:
            # The managed rule through which Step Functions learns that a .sync job has finished.
            return iam.PolicyStatement(
                actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                resources=[f"arn:{partition}:events:{region}:{account}:rule/{name}"],
            )

        def job_state(construct_id: str, comment: str, *, resource: str, fields: tuple[str, ...], status: str,
                      statements: list[iam.PolicyStatement]) -> SageMakerJobState:
            state = SageMakerJobState(self, construct_id, state_json={
                "Type": "Task",
                "Comment": comment,
                "Resource": f"arn:{partition}:states:::sagemaker:{resource}.sync",
                "Parameters": {f"{field}.$": f"$.trainingRequest.request.{field}" for field in fields},
                "TimeoutSecondsPath": "$.trainingRequest.timeoutSeconds",
                # The full Describe* answer is large and the report step reads it anyway; keep the status.
                # (CustomState drops a null ResultPath, which would replace the whole state.)
                "ResultSelector": {"status.$": f"$.{status}"},
                "ResultPath": "$.trainingJob",
            }, policy_statements=statements)
            state.add_retry(errors=SAGEMAKER_RETRYABLE, interval=Duration.seconds(30), max_attempts=4,
                            backoff_rate=2, jitter_strategy=sfn.JitterType.FULL)
            return state

        train = job_state(
            "TrainModel", "One training job (spot, N instances, checkpoints), waited on until it ends",
            resource="createTrainingJob", status="TrainingJobStatus",
            fields=training_fields(debugger=settings.training_debugger, profiler=settings.training_profiler,
                                   vpc=bool(settings.training_subnet_ids)),
            statements=[
                iam.PolicyStatement(
                    actions=["sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob",
                             "sagemaker:StopTrainingJob", "sagemaker:AddTags", "sagemaker:ListTags"],
                    resources=[job_arn],
                ),
                pass_role,
                events_rule("StepFunctionsGetEventsForSageMakerTrainingJobsRule"),
            ],
        )
        tune = job_state(
            "TuneModel", "A Bayesian tuning job with early stopping; its best job is taken forward",
            resource="createHyperParameterTuningJob", fields=TUNING_FIELDS, status="HyperParameterTuningJobStatus",
            statements=[
                iam.PolicyStatement(
                    actions=["sagemaker:CreateHyperParameterTuningJob", "sagemaker:DescribeHyperParameterTuningJob",
                             "sagemaker:StopHyperParameterTuningJob",
                             "sagemaker:ListTrainingJobsForHyperParameterTuningJob",
                             "sagemaker:AddTags", "sagemaker:ListTags"],
                    resources=[tuning_arn],
                ),
                iam.PolicyStatement(actions=["sagemaker:DescribeTrainingJob"], resources=[job_arn]),
                pass_role,
                events_rule("StepFunctionsGetEventsForSageMakerTuningJobsRule"),
            ],
        )

        def stopper(construct_id: str, action: str, parameter: str, arn: str) -> tasks.CallAwsService:
            stop = tasks.CallAwsService(
                self, construct_id,
                comment="Stops what this execution started (a no-op error when it already ended), then fails",
                service="sagemaker", action=action,
                parameters={parameter: sfn.JsonPath.string_at("$.trainingRequest.jobName")},
                iam_resources=[arn], iam_action=f"sagemaker:{action[0].upper()}{action[1:]}",
                result_path=sfn.JsonPath.DISCARD,
                task_timeout=sfn.Timeout.duration(Duration.minutes(1)),
            )
            stop.add_retry(errors=["SageMaker.ThrottlingException"], interval=Duration.seconds(5), max_attempts=3)
            # The job may have ended on its own or never been created: stopping it then fails, and the
            # execution still fails with the original cause.
            stop.add_catch(failed, errors=["States.ALL"], result_path="$.stopError")
            return stop.next(failed)

        train.add_catch(stopper("StopTrainingJob", "stopTrainingJob", "TrainingJobName", job_arn),
                        errors=["States.ALL"], result_path="$.trainingError")
        tune.add_catch(stopper("StopTuningJob", "stopHyperParameterTuningJob", "HyperParameterTuningJobName",
                               tuning_arn), errors=["States.ALL"], result_path="$.trainingError")

        start_report = sfn.Pass(self, "StartTrainingReport", result=sfn.Result.from_object({"attempt": 0}),
                                result_path="$.training")
        report = tasks.LambdaInvoke(
            self, "RecordTraining",
            comment="Reads the finished job, writes reports/training/<job>.json, returns $.training",
            lambda_function=training.report.function,
            payload=sfn.TaskInput.from_object({
                "mode": sfn.JsonPath.string_at("$.trainingRequest.mode"),
                "jobName": sfn.JsonPath.string_at("$.trainingRequest.jobName"),
                "attempt": sfn.JsonPath.number_at("$.training.attempt"),
            }),
            payload_response_only=True,
            result_path="$.training",
            task_timeout=sfn.Timeout.duration(Duration.minutes(2)),
        )
        report.add_catch(failed, errors=["States.ALL"], result_path="$.trainingError")
        recorded = sfn.Pass(self, "TrainingRecorded")
        wait_for_rules = sfn.Wait(self, "WaitForTrainingRules", time=sfn.WaitTime.duration(RULE_POLL_INTERVAL))
        rules_done = (
            sfn.Choice(self, "TrainingRulesFinished")
            .when(
                sfn.Condition.and_(
                    sfn.Condition.boolean_equals("$.training.rulesPending", True),
                    sfn.Condition.number_less_than("$.training.attempt", RULE_POLL_ATTEMPTS),
                ),
                wait_for_rules.next(report),
            )
            .otherwise(recorded)
        )
        start_report.next(report).next(rules_done)

        choose = (
            sfn.Choice(self, "TrainingOrTuning")
            .when(sfn.Condition.string_equals("$.trainingRequest.mode", "tuning"), tune.next(start_report))
            .otherwise(train.next(start_report))
        )
        prepare.next(choose)
        self._start = prepare
        self._ends = [recorded]

    @property
    def start_state(self) -> sfn.State:
        return self._start

    @property
    def end_states(self) -> list[sfn.INextable]:
        return self._ends


class Training(Construct):
    """The SageMaker execution role (``.role``, also used for CreateModel) and the pipeline's training
    stage (``.stage``)."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, data_bucket: s3.IBucket,
                 data_key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.settings = settings
        stack = Stack.of(self)
        partition, region, account = Aws.PARTITION, Aws.REGION, Aws.ACCOUNT_ID

        self.source = s3_assets.Asset(self, "Source", path=str(build_source_tarball()))
        self.role = self._execution_role(settings, data_bucket, data_key)
        self.source.grant_read(self.role)

        versions = {"framework_version": settings.framework_version, "python_version": settings.python_version}
        deployment = {
            "project": settings.project,
            "stage": settings.stage,
            "region": region,
            "roleArn": self.role.role_arn,
            "bucket": data_bucket.bucket_name,
            "kmsKeyArn": data_key.key_arn,
            "sourceDir": self.source.s3_object_url,
            "images": {
                "gpu": image_for_stack_region(self, "training", "gpu", **versions),
                "cpu": image_for_stack_region(self, "training", "cpu", **versions),
            },
            "debuggerImage": debugger_image_for_stack_region(self, **versions),
            "debugger": settings.training_debugger,
            "profiler": settings.training_profiler,
            "subnets": list(settings.training_subnet_ids),
            "securityGroups": list(settings.training_security_group_ids),
            "instanceType": settings.training_instance_type,
            "instanceCount": settings.training_instance_count,
            "useSpot": settings.training_use_spot,
            "maxRuntimeSeconds": settings.training_max_runtime_seconds,
            "maxWaitSeconds": settings.training_max_wait_seconds,
            "volumeSizeGb": settings.training_volume_size_gb,
            "networkIsolation": settings.training_network_isolation,
            "epochs": settings.training_epochs,
            "hyperparameters": dict(settings.training_hyperparameters),
            "tuning": {
                "enabled": settings.tuning_enabled,
                "maxJobs": settings.tuning_max_jobs,
                "maxParallelJobs": settings.tuning_max_parallel_jobs,
                "learningRate": list(settings.tuning_learning_rate_range),
                "batchSizes": list(settings.tuning_batch_sizes),
                "epochs": list(settings.tuning_epochs_range),
            },
        }
        self.prepare = PythonFunction(
            self, "Prepare",
            settings=settings,
            handler="lambdas.training.prepare.handler",
            service="training",
            description="Builds and checks the SageMaker training or tuning request for one execution",
            environment={DEPLOYMENT_ENV: stack.to_json_string(deployment)},
            timeout_seconds=30,
            memory_size=256,
        )

        self.report = PythonFunction(
            self, "Report",
            settings=settings,
            handler="lambdas.training.report.handler",
            service="training",
            description="Records a finished training job's metrics and Debugger findings",
            environment={"DATA_BUCKET": data_bucket.bucket_name},
            timeout_seconds=90,
            memory_size=512,
        )
        prefix = name_prefix(settings.project, settings.stage)
        self.report.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeTrainingJob"],
            resources=[f"arn:{partition}:sagemaker:{region}:{account}:training-job/{prefix}-*"],
        ))
        self.report.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeHyperParameterTuningJob"],
            resources=[f"arn:{partition}:sagemaker:{region}:{account}:hyper-parameter-tuning-job/{prefix}-*"],
        ))
        data_bucket.grant_put(self.report.role, f"{TRAINING_REPORT_PREFIX}*")
        # output.tar.gz (the trainer's metrics file) sits beside model.tar.gz.
        data_bucket.grant_read(self.report.role, f"{MODEL_PREFIX}*")

        self.stage = TrainingStage(self, "Stage", training=self)

    def _execution_role(self, settings: Settings, bucket: s3.IBucket, key: kms.IKey) -> iam.Role:
        partition, region, account = Aws.PARTITION, Aws.REGION, Aws.ACCOUNT_ID
        role = iam.Role(
            self, "ExecutionRole",
            assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
            description=f"{settings.project}: SageMaker training jobs, tuning trials and models",
        )
        readable = [RAW_PREFIX, MANIFEST_PREFIX, MODEL_PREFIX, CHECKPOINT_PREFIX, TRAINING_REPORT_PREFIX]
        writable = [MODEL_PREFIX, CHECKPOINT_PREFIX, TRAINING_REPORT_PREFIX]
        role.add_to_policy(iam.PolicyStatement(
            sid="ReadChannelsCheckpointsAndRuleInputs",
            actions=["s3:GetObject"],
            resources=[bucket.arn_for_objects(f"{prefix}*") for prefix in readable],
        ))
        role.add_to_policy(iam.PolicyStatement(
            sid="WriteModelsCheckpointsAndDebugOutput",
            actions=["s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"],
            resources=[bucket.arn_for_objects(f"{prefix}*") for prefix in writable],
        ))
        role.add_to_policy(iam.PolicyStatement(
            sid="ListOwnPrefixes",
            actions=["s3:ListBucket"],
            resources=[bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in readable]}},
        ))
        key.grant_encrypt_decrypt(role)
        # Encrypting the training volumes with the data key makes SageMaker create grants for the instances.
        role.add_to_policy(iam.PolicyStatement(
            sid="GrantVolumeEncryption",
            actions=["kms:CreateGrant"],
            resources=[key.key_arn],
            conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}},
        ))
        role.add_to_policy(iam.PolicyStatement(
            sid="JobLogs",
            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=[
                f"arn:{partition}:logs:{region}:{account}:log-group:/aws/sagemaker/TrainingJobs:*",
                # Debugger and profiler rules run as processing jobs.
                f"arn:{partition}:logs:{region}:{account}:log-group:/aws/sagemaker/ProcessingJobs:*",
            ],
        ))
        role.add_to_policy(iam.PolicyStatement(
            sid="JobMetrics",
            actions=["cloudwatch:PutMetricData"],
            resources=["*"],
            conditions={"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*", "aws/sagemaker/*"]}},
        ))
        role.add_to_policy(iam.PolicyStatement(
            sid="PullFrameworkAndRuleImages",
            actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            resources=[f"arn:{partition}:ecr:{region}:*:repository/{repository}"
                       for repository in ("pytorch-training", "pytorch-inference", "sagemaker-debugger-rules")],
        ))
        role.add_to_policy(iam.PolicyStatement(
            sid="EcrLogin", actions=["ecr:GetAuthorizationToken"], resources=["*"],
        ))
        # The seed attached Cost Explorer read access to this role (training cost per run); these are the
        # Get* actions that reads cost and usage needs. None of them takes a resource narrower than "*".
        role.add_to_policy(iam.PolicyStatement(
            sid="CostExplorerRead",
            actions=["ce:GetCostAndUsage", "ce:GetCostForecast", "ce:GetDimensionValues", "ce:GetTags"],
            resources=["*"],
        ))
        if settings.training_subnet_ids:
            role.add_to_policy(iam.PolicyStatement(
                sid="TrainInVpc",
                actions=["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission",
                         "ec2:DeleteNetworkInterface", "ec2:DeleteNetworkInterfacePermission",
                         "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                         "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"],
                resources=["*"],
            ))
        NagSuppressions.add_resource_suppressions(role, [{
            "id": "AwsSolutions-IAM5",
            "reason": "Object wildcards are limited to this role's prefixes (raw/, manifests/, models/, "
                      "checkpoints/, reports/training/) and the CDK asset holding the trainer's source; log "
                      "groups end in ':*' for their streams; ECR repositories take any account because the "
                      "framework and Debugger images live in AWS-owned accounts that differ by region; "
                      "ecr:GetAuthorizationToken, cloudwatch:PutMetricData (limited by namespace), the Cost "
                      "Explorer Get* actions and the VPC network-interface actions accept no resource narrower "
                      "than '*'; kms:ReEncrypt*/GenerateDataKey* come from the key grant.",
        }], apply_to_children=True)
        return role
