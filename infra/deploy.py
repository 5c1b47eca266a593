"""Deploy stage: gate, release, wait for InService, finish. The endpoint keeps serving while a model rolls out.

State contract: reads ``$.training`` and ``$.input.deploy`` (optional, e.g. ``{"force": true}``), writes
``$.deploy`` = ``{"decision", "reasons", "modelName", "endpointName"}``. The endpoint's name is stable
(``<project>-<stage>-counter``), so the count Lambda never changes when a new model goes live.

Flow: the gate Lambda decides deploy or skip (and records why in ``reports/deploy/<execution>.json``); the
release Lambda creates the model and endpoint config and starts CreateEndpoint or a blue/green UpdateEndpoint
with automatic rollback on the endpoint's 5xx alarm; the state machine polls DescribeEndpoint until the
endpoint is InService on the new config (then the finish Lambda sets up autoscaling and records the model in
service) or fails with the reason (Failed, or rolled back to the old config).
"""

from __future__ import annotations

from aws_cdk import ArnFormat, Aws, Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.config import Settings
from infra.execution_roles import DLC_ACCOUNT, container_statements, execution_role, log_group_arn, volume_grant
from infra.function import PythonFunction, log_group
from infra.nag import suppress, wildcard_suppression
from infra.pipeline import StageFragment
from infra.storage import MODEL_PREFIX, grant_read_prefix
from lambdas.deploy import plan


def endpoint_name(settings: Settings) -> str:
    return f"{settings.project}-{settings.stage}-counter"


def serving_image(scope: Construct, settings: Settings) -> str:
    """The PyTorch inference image for the endpoint's region: CPU for serverless, by instance type otherwise.

    ``infra.images`` resolves it from the SDK's table (a CfnMapping on the deploy region); until that table
    is generated, the Deep Learning Containers registry's own naming stands in.
    """
    instance_type = "ml.c6i.large" if settings.endpoint_mode == "serverless" else settings.endpoint_instance_type
    device = "gpu" if instance_type.split(".")[1].startswith(("g", "p")) else "cpu"
    try:
        from infra.images import image_for_stack_region

        return image_for_stack_region(scope, "inference", device, framework_version=settings.framework_version,
                                      python_version=settings.python_version)
    except (ImportError, LookupError, OSError):
        stack = Stack.of(scope)
        return (f"{DLC_ACCOUNT}.dkr.ecr.{stack.region}.{stack.url_suffix}/pytorch-inference:"
                f"{settings.framework_version}-{device}-{settings.python_version}")


class DeployStage(StageFragment):
    def __init__(self, scope: Construct, construct_id: str, *, gate: PythonFunction, release: PythonFunction,
                 finish: PythonFunction, endpoint: str, endpoint_arn: str) -> None:
        super().__init__(scope, construct_id)
        decide = tasks.LambdaInvoke(
            self,
            "Decide deploy",
            comment="Compare the new model with the model in service; record the decision and reasons",
            lambda_function=gate.function,
            payload=sfn.TaskInput.from_object({
                "training.$": "$.training",
                # The whole input (always an object) rather than $.input.deploy, which may be absent.
                "input.$": "$.input",
                "execution.$": "$.execution",
            }),
            result_selector={"decision.$": "$.Payload.decision", "reasons.$": "$.Payload.reasons",
                             "modelName.$": "$.Payload.modelName", "endpointName.$": "$.Payload.endpointName"},
            result_path="$.deploy",
        )
        start = tasks.LambdaInvoke(
            self,
            "Release model",
            comment="CreateModel, CreateEndpointConfig, then CreateEndpoint or a blue/green UpdateEndpoint",
            lambda_function=release.function,
            payload=sfn.TaskInput.from_object({"deploy.$": "$.deploy", "training.$": "$.training"}),
            result_selector={"action.$": "$.Payload.action", "modelName.$": "$.Payload.modelName",
                             "endpointConfigName.$": "$.Payload.endpointConfigName"},
            result_path="$.deploy.release",
        )
        # An endpoint mid-change (a previous rollout, a SageMaker maintenance update) is waited out.
        start.add_retry(errors=["EndpointBusy"], interval=Duration.minutes(2), max_attempts=10, backoff_rate=1.5)
        wait = sfn.Wait(self, "Wait for endpoint", time=sfn.WaitTime.duration(Duration.seconds(30)))
        describe = tasks.CallAwsService(
            self,
            "Describe endpoint",
            service="sagemaker",
            action="describeEndpoint",
            parameters={"EndpointName": endpoint},
            iam_resources=[endpoint_arn],
            iam_action="sagemaker:DescribeEndpoint",
            result_path="$.deploy.endpoint",
        )
        describe.add_retry(errors=["SageMaker.SageMakerException", "States.Timeout"], max_attempts=5,
                           interval=Duration.seconds(10), backoff_rate=2)
        done = tasks.LambdaInvoke(
            self,
            "Finish deploy",
            comment="Autoscaling for real-time endpoints; record the model in service for the next gate",
            lambda_function=finish.function,
            payload=sfn.TaskInput.from_object({
                "deploy.$": "$.deploy", "release.$": "$.deploy.release", "training.$": "$.training",
                "execution.$": "$.execution",
            }),
            result_selector={"decision.$": "$.Payload.decision", "reasons.$": "$.Payload.reasons",
                             "modelName.$": "$.Payload.modelName", "endpointName.$": "$.Payload.endpointName"},
            result_path="$.deploy",
        )
        skipped = sfn.Pass(self, "Deploy skipped", comment="$.deploy already holds the gate's decision")
        finished = sfn.Pass(self, "Deploy finished")
        # DescribeEndpoint returns FailureReason only for Failed (or InService after a failed update); for
        # OutOfService or UpdateRollbackFailed the path is absent, and reading an absent path is States.Runtime,
        # which no Catch catches (SageMaker API reference, DescribeEndpoint / EndpointMetadata). So the cause is
        # built from the status, which is always returned, and takes FailureReason only where it is present.
        described = "$.deploy.endpoint"
        failed = sfn.Fail(self, "Endpoint failed", error="EndpointFailed", cause_path="$.deploy.failure.cause")
        with_reason = sfn.Pass(
            self,
            "Endpoint failure with reason",
            parameters={"status.$": f"{described}.EndpointStatus", "reason.$": f"{described}.FailureReason",
                        "cause.$": f"States.Format('Endpoint {{}} is {{}}: {{}}', {described}.EndpointName, "
                                   f"{described}.EndpointStatus, {described}.FailureReason)"},
            result_path="$.deploy.failure",
        )
        without_reason = sfn.Pass(
            self,
            "Endpoint failure without reason",
            parameters={"status.$": f"{described}.EndpointStatus",
                        "cause.$": f"States.Format('Endpoint {{}} is {{}}: SageMaker gives no FailureReason for "
                                   f"this status, see the endpoint events', {described}.EndpointName, "
                                   f"{described}.EndpointStatus)"},
            result_path="$.deploy.failure",
        )
        record_failure = (
            sfn.Choice(self, "Failure reason given?")
            .when(sfn.Condition.is_present(f"{described}.FailureReason"), with_reason.next(failed))
            .otherwise(without_reason.next(failed))
        )
        rolled_back = sfn.Fail(
            self,
            "Deploy rolled back",
            error="DeploymentRolledBack",
            cause="The endpoint is InService on its previous config: the blue/green update was rolled back "
            "(an alarm fired or the new fleet did not become healthy); see the endpoint's events",
        )
        status = "$.deploy.endpoint.EndpointStatus"
        check = (
            sfn.Choice(self, "Endpoint ready?")
            .when(
                sfn.Condition.and_(
                    sfn.Condition.string_equals(status, "InService"),
                    sfn.Condition.string_equals_json_path(
                        "$.deploy.endpoint.EndpointConfigName", "$.deploy.release.endpointConfigName"
                    ),
                ),
                done.next(finished),
            )
            .when(sfn.Condition.string_equals(status, "InService"), rolled_back)
            .when(
                sfn.Condition.or_(*[sfn.Condition.string_equals(status, s)
                                    for s in ("Failed", "OutOfService", "UpdateRollbackFailed")]),
                record_failure,
            )
            .otherwise(wait)
        )
        wait.next(describe).next(check)
        decide.next(
            sfn.Choice(self, "Deploy?")
            .when(sfn.Condition.string_equals("$.deploy.decision", "deploy"), start.next(wait))
            .otherwise(skipped)
        )
        self._bound(decide, [skipped, finished])


class Deploy(Construct):
    """Gate, release and finish Lambdas, the endpoint's rollback alarm, and ``.stage`` for the pipeline."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        data_bucket: s3.IBucket,
        data_key: kms.IKey,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.endpoint_name = endpoint_name(settings)
        self.inference_role = self._inference_role(settings, data_bucket, data_key)
        self.endpoint_arn = self._sagemaker_arn("endpoint", self.endpoint_name)
        rollback_alarm_name = f"{self.endpoint_name}-invocation-5xx"
        self.rollback_alarm = cloudwatch.Alarm(
            self,
            "Endpoint5xx",
            alarm_name=rollback_alarm_name,
            alarm_description="Server errors from the counting endpoint; rolls back a blue/green update",
            metric=cloudwatch.Metric(
                namespace="AWS/SageMaker",
                metric_name="Invocation5XXErrors",
                dimensions_map={"EndpointName": self.endpoint_name, "VariantName": plan.VARIANT},
                statistic="Sum",
                period=Duration.minutes(1),
            ),
            threshold=1,
            evaluation_periods=2,
            datapoints_to_alarm=2,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        endpoint_settings = plan.EndpointSettings(
            endpoint_name=self.endpoint_name,
            mode=settings.endpoint_mode,
            serverless_memory_mb=settings.endpoint_serverless_memory_mb,
            serverless_max_concurrency=settings.endpoint_serverless_max_concurrency,
            instance_type=settings.endpoint_instance_type,
            min_instances=settings.endpoint_min_instances,
            max_instances=settings.endpoint_max_instances,
            target_invocations_per_instance=settings.endpoint_target_invocations_per_instance,
            min_improvement=settings.deploy_min_improvement,
            image_uri=serving_image(self, settings),
            role_arn=self.inference_role.role_arn,
            kms_key_arn=data_key.key_arn,
            # The literal name: a Ref would be a token inside the JSON setting.
            rollback_alarms=[rollback_alarm_name],
            bake_seconds=settings.deploy_bake_seconds,
        )
        environment = {"DATA_BUCKET": data_bucket.bucket_name, "DEPLOY_SETTINGS": endpoint_settings.to_json()}

        def function(name: str, handler: str, description: str) -> PythonFunction:
            return PythonFunction(self, name, settings=settings, handler=handler, service=f"deploy-{name.lower()}",
                                  description=description, environment=environment, timeout_seconds=60,
                                  memory_size=256)

        self.gate = function("Gate", "lambdas.deploy.gate.handler", "Decides whether a new model goes live")
        self.release = function("Release", "lambdas.deploy.release.handler",
                                "Creates the model and endpoint config, starts the endpoint rollout")
        self.finish = function("Finish", "lambdas.deploy.finish.handler",
                               "Autoscaling and the in-service record once the endpoint is InService")

        in_service = plan.in_service_key(self.endpoint_name)
        grant_read_prefix(data_bucket, data_key, self.gate.role, in_service, missing_is_404=True)
        data_bucket.grant_put(self.gate.role, f"{plan.REPORT_PREFIX}*")
        data_bucket.grant_put(self.finish.role, in_service)
        for fn in (self.gate, self.finish):
            data_key.grant_encrypt_decrypt(fn.role)
        self.gate.role.add_to_principal_policy(
            iam.PolicyStatement(actions=["sagemaker:DescribeEndpoint"], resources=[self.endpoint_arn])
        )
        owned = [
            self.endpoint_arn,
            self._sagemaker_arn("endpoint-config", f"{self.endpoint_name}-*"),
            self._sagemaker_arn("model", f"{self.endpoint_name}-*"),
        ]
        self.release.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateModel", "sagemaker:CreateEndpointConfig", "sagemaker:CreateEndpoint",
                     "sagemaker:UpdateEndpoint", "sagemaker:DescribeEndpoint", "sagemaker:DescribeEndpointConfig",
                     "sagemaker:AddTags"],
            resources=owned,
        ))
        # Reading the config in service: any of ours, including one made before this naming scheme.
        self.release.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeEndpointConfig"],
            resources=[self._sagemaker_arn("endpoint-config", "*")],
        ))
        self.release.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"],
            resources=[self.inference_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        ))
        # CreateEndpoint/UpdateEndpoint on a config with KmsKeyId: the caller's role must be allowed to use the
        # key for the instance volumes ("The KMS key policy must grant permission to the IAM role that you specify
        # in your CreateEndpoint, UpdateEndpoint requests", CreateEndpointConfig API reference, KmsKeyId).
        self.release.role.add_to_principal_policy(volume_grant(data_key))
        self.release.role.add_to_principal_policy(iam.PolicyStatement(actions=["kms:DescribeKey"],
                                                                      resources=[data_key.key_arn]))
        # Application Auto Scaling names a scalable target by a generated id, so writes are held to this account's
        # and region's scalable targets (the resource type its Register/PutScalingPolicy/Deregister actions take,
        # Service Authorization Reference, Application Auto Scaling); its Describe* accept only '*' and only read.
        scalable_targets = stack.format_arn(service="application-autoscaling", resource="scalable-target",
                                            resource_name="*")
        self.release.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["application-autoscaling:DeregisterScalableTarget"], resources=[scalable_targets]))
        self.finish.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["application-autoscaling:RegisterScalableTarget", "application-autoscaling:PutScalingPolicy"],
            resources=[scalable_targets]))
        self.finish.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["application-autoscaling:DescribeScalableTargets",
                     "application-autoscaling:DescribeScalingPolicies"], resources=["*"]))
        # What Application Auto Scaling checks that its caller may do to the variant it is given.
        self.finish.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeEndpoint", "sagemaker:UpdateEndpointWeightsAndCapacities"],
            resources=[self.endpoint_arn],
        ))
        alarms = stack.format_arn(service="cloudwatch", resource="alarm",
                                  resource_name=f"TargetTracking-endpoint/{self.endpoint_name}/*",
                                  arn_format=ArnFormat.COLON_RESOURCE_NAME)
        self.finish.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["cloudwatch:PutMetricAlarm", "cloudwatch:DescribeAlarms", "cloudwatch:DeleteAlarms"],
            resources=[alarms],
        ))
        self.finish.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:CreateServiceLinkedRole"],
            resources=[stack.format_arn(
                service="iam", region="", resource="role",
                resource_name="aws-service-role/sagemaker.application-autoscaling.amazonaws.com/"
                "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint")],
            conditions={"StringLike": {"iam:AWSServiceName": "sagemaker.application-autoscaling.amazonaws.com"}},
        ))
        bucket_grants = ("CDK's bucket put grant and the data key's encrypt/decrypt grant expand to these action "
                         "families (Abort*, and the key's GenerateDataKey*/ReEncrypt*), held to the in-service "
                         "record and the deploy reports of this endpoint and the one data key.")
        suppress(
            self.gate.role,
            wildcard_suppression(
                self.gate, "The gate writes one decision report per execution, so its put grant is the "
                "reports/deploy/ prefix.", resources=[data_bucket.arn_for_objects(f"{plan.REPORT_PREFIX}*")],
            ),
            wildcard_suppression(self.gate, bucket_grants, actions=["s3:Abort*", "kms:GenerateDataKey*",
                                                                    "kms:ReEncrypt*"]),
        )
        suppress(
            self.release.role,
            wildcard_suppression(
                self.release, "Models and endpoint configs are named <endpoint>-<execution>, so they are granted "
                "by that prefix; DescribeEndpointConfig on any config reads the one in service, which may "
                "predate this naming.", resources=[
                    self._sagemaker_arn("endpoint-config", f"{self.endpoint_name}-*"),
                    self._sagemaker_arn("model", f"{self.endpoint_name}-*"),
                    self._sagemaker_arn("endpoint-config", "*"),
                ],
            ),
            wildcard_suppression(
                self.release, "Application Auto Scaling names scalable targets by a generated id: "
                "DeregisterScalableTarget is held to this account's and region's scalable targets.",
                resources=[scalable_targets],
            ),
        )
        suppress(
            self.finish.role,
            wildcard_suppression(
                self.finish, "Application Auto Scaling's Describe* accept no resource narrower than '*' and only "
                "read (the same '*' also covers X-Ray, suppressed by PythonFunction); Register/PutScalingPolicy are "
                "held to this account's and region's scalable targets, whose ids are generated.",
                resources=["*", scalable_targets],
            ),
            wildcard_suppression(
                self.finish, "Target tracking names its alarms TargetTracking-endpoint/<endpoint>/..., so the "
                "alarm grant is this endpoint's prefix.", resources=[alarms],
            ),
            wildcard_suppression(self.finish, bucket_grants,
                                 actions=["s3:Abort*", "kms:GenerateDataKey*", "kms:ReEncrypt*"]),
        )

        self.stage = DeployStage(self, "Stage", gate=self.gate, release=self.release, finish=self.finish,
                                 endpoint=self.endpoint_name, endpoint_arn=self.endpoint_arn)

    def add_nag_evidence(self, state_machine: sfn.StateMachine) -> None:
        """cdk-nag suppressions for the wildcards this stage grants the state machine that hosts it."""
        suppress(state_machine, wildcard_suppression(
            state_machine, "LambdaInvoke grants the function ARN plus ':*' so that the gate, release and finish "
            "tasks may call a version or alias of those three functions, and nothing else.",
            resources=[f"{fn.function.function_arn}:*" for fn in (self.gate, self.release, self.finish)],
        ))

    def _inference_role(self, settings: Settings, data_bucket: s3.IBucket, data_key: kms.IKey) -> iam.Role:
        """The role CreateModel names: the endpoint's container decodes every untrusted upload, so it may read
        model artifacts, decrypt them, pull the inference image and write its own log group; it writes nothing
        in S3 and reads nothing else."""
        role = execution_role(self, "InferenceRole",
                              description=f"{settings.project}: the counting endpoint's model (read models/ only)")
        models = data_bucket.arn_for_objects(f"{MODEL_PREFIX}*")
        group = f"/aws/sagemaker/Endpoints/{self.endpoint_name}"
        # Pre-created so that it has the logs key and a retention (SageMaker would make it without either).
        self.endpoint_logs = log_group(self, settings, "EndpointLogs", name=group)
        repository = f"arn:{Aws.PARTITION}:ecr:{Aws.REGION}:{DLC_ACCOUNT}:repository/pytorch-inference"
        for statement in [
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[models]),
            iam.PolicyStatement(actions=["kms:Decrypt"], resources=[data_key.key_arn]),
            volume_grant(data_key),
            *container_statements(repositories=[repository], log_groups=[group]),
        ]:
            role.add_to_policy(statement)
        suppress(
            role,
            wildcard_suppression(
                role, "The endpoint loads model.tar.gz from the models/ prefix (one artifact per training job) and "
                "writes the streams (':*') of its own log group only.", resources=[models, log_group_arn(group)],
            ),
            wildcard_suppression(
                role, "ecr:GetAuthorizationToken and cloudwatch:PutMetricData (held to SageMaker's namespaces by a "
                "condition) accept no resource narrower than '*'.", resources=["*"],
            ),
        )
        return role

    def _sagemaker_arn(self, resource: str, name: str) -> str:
        return Stack.of(self).format_arn(service="sagemaker", resource=resource, resource_name=name)
