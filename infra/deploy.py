"""Deploy stage: gate, release, wait for InService, finish. The endpoint keeps serving while a model rolls out.

State contract: reads ``$.training`` and ``$.input.deploy`` (optional, e.g. ``{"force": true}``), writes
``$.deploy`` = ``{"decision", "reasons", "modelName", "endpointName"}``. The endpoint's name is stable
(``<project>-<stage>-counter``), so the count Lambda never changes when a new model goes live.

Flow: the gate Lambda decides deploy or skip (and records why in ``reports/deploy/<execution>.json``); the
release Lambda creates the model and endpoint config and starts CreateEndpoint or a blue/green UpdateEndpoint
with automatic rollback on the endpoint's 5xx alarm; the state machine polls DescribeEndpoint until the
endpoint is InService on the new config (then the smoke Lambda sends one known photo and checks the answer against
the serving contract, and only then does the finish Lambda set up autoscaling and record the model in service; a
failed check puts the previous endpoint config back) or fails with the reason (Failed, or rolled back to the old
config).
"""

from __future__ import annotations

import math

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
from infra.storage import MODEL_PREFIX, grant_read_prefix, lease_table
from lambdas.deploy import lock, plan, smoke

# --- the deploy stage's budget: every wait in it is bounded, and the sum is the lock's lease and the stage's share
# of the execution timeout (infra/stack.py).
ENDPOINT_POLL = Duration.seconds(30)
# Creating or updating an endpoint takes minutes; an hour (plus the blue/green bake) is the most the stage waits
# for InService before it fails with the endpoint's last status.
ENDPOINT_ROLLOUT_SECONDS = 3600
# DescribeEndpoint's own retries (5 attempts from 10 s, doubling) at most once per rollout, and its call time.
DESCRIBE_RETRY_SECONDS = 10 + 20 + 40 + 80 + 160
DESCRIBE_CALL_SECONDS = 5
# The release step waits out an endpoint that is mid-change (EndpointBusy): 10 retries from 2 minutes, x1.5.
BUSY_INTERVAL, BUSY_ATTEMPTS, BUSY_BACKOFF = Duration.minutes(2), 10, 1.5
LAMBDA_SECONDS = 60  # the gate, release, finish and lock functions' timeout
# A second deploy waits for the lock this long (retrying), then fails with "another deploy is in progress".
LOCK_INTERVAL, LOCK_ATTEMPTS, LOCK_BACKOFF, LOCK_MAX_DELAY = Duration.seconds(60), 6, 2.0, Duration.minutes(10)


def _retry_seconds(interval: int, attempts: int, backoff: float, max_delay: int | None = None) -> int:
    delays = [interval * backoff ** n for n in range(attempts)]
    return int(sum(min(d, max_delay) if max_delay else d for d in delays))


def endpoint_checks(settings: Settings) -> int:
    """How many times the stage describes the endpoint before it gives up waiting for InService."""
    return math.ceil((ENDPOINT_ROLLOUT_SECONDS + settings.deploy_bake_seconds) / ENDPOINT_POLL.to_seconds())


def lock_lease_seconds(settings: Settings) -> int:
    """The longest the deploy stage holds the lock: gate, release with its EndpointBusy retries, the endpoint
    wait loop, finish and release of the lock."""
    busy = _retry_seconds(int(BUSY_INTERVAL.to_seconds()), BUSY_ATTEMPTS, BUSY_BACKOFF)
    waiting = endpoint_checks(settings) * (int(ENDPOINT_POLL.to_seconds()) + DESCRIBE_CALL_SECONDS)
    return 4 * LAMBDA_SECONDS + busy + waiting + DESCRIBE_RETRY_SECONDS + smoke_check_seconds()


def smoke_check_seconds() -> int:
    """The smoke check after InService: the smoke Lambda, then (on failure) the rollback's UpdateEndpoint call with
    its retries."""
    return smoke.LAMBDA_TIMEOUT_SECONDS + DESCRIBE_RETRY_SECONDS + DESCRIBE_CALL_SECONDS


def lock_wait_seconds() -> int:
    return _retry_seconds(int(LOCK_INTERVAL.to_seconds()), LOCK_ATTEMPTS, LOCK_BACKOFF,
                          int(LOCK_MAX_DELAY.to_seconds())) + (LOCK_ATTEMPTS + 1) * LAMBDA_SECONDS


def stage_budget_seconds(settings: Settings) -> int:
    """The longest the deploy stage can run: waiting for the lock, then holding it."""
    return lock_wait_seconds() + lock_lease_seconds(settings)


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
                 finish: PythonFunction, endpoint: str, endpoint_arn: str, max_checks: int = 150,
                 smoke_function: PythonFunction, endpoint_config_arn: str) -> None:
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
                             "endpointConfigName.$": "$.Payload.endpointConfigName",
                             # what a failed smoke check rolls back to (null on a first deploy)
                             "previousEndpointConfigName.$": "$.Payload.previousEndpointConfigName"},
            result_path="$.deploy.release",
        )
        # An endpoint mid-change (a previous rollout, a SageMaker maintenance update) is waited out.
        start.add_retry(errors=["EndpointBusy"], interval=Duration.minutes(2), max_attempts=10, backoff_rate=1.5)
        wait = sfn.Wait(self, "Wait for endpoint", time=sfn.WaitTime.duration(ENDPOINT_POLL))
        # The wait loop is bounded: each pass counts, and after max_checks the stage fails with the last status.
        start_checks = sfn.Pass(self, "Start endpoint checks", result=sfn.Result.from_object({"n": 0}),
                                result_path="$.deploy.checks")
        count_check = sfn.Pass(self, "Count endpoint check",
                               parameters={"n.$": "States.MathAdd($.deploy.checks.n, 1)"},
                               result_path="$.deploy.checks")
        poll = int(ENDPOINT_POLL.to_seconds())
        waited_too_long = sfn.Pass(
            self,
            "Endpoint wait exhausted",
            parameters={"cause.$": f"States.Format('Endpoint {{}} did not become InService on config {{}} within "
                                   f"{max_checks} checks {poll} s apart; its status is {{}}', "
                                   "$.deploy.endpoint.EndpointName, $.deploy.release.endpointConfigName, "
                                   "$.deploy.endpoint.EndpointStatus)"},
            result_path="$.deploy.failure",
        ).next(sfn.Fail(self, "Endpoint wait timed out", error="EndpointTimeout",
                        cause_path="$.deploy.failure.cause"))
        keep_waiting = (
            sfn.Choice(self, "Keep waiting for endpoint?")
            .when(sfn.Condition.number_greater_than_equals("$.deploy.checks.n", max_checks), waited_too_long)
            .otherwise(wait)
        )

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
                self._smoke_check(smoke_function, endpoint, endpoint_arn, endpoint_config_arn,
                                  passed=done.next(finished)),
            )
            .when(sfn.Condition.string_equals(status, "InService"), rolled_back)
            .when(
                sfn.Condition.or_(*[sfn.Condition.string_equals(status, s)
                                    for s in ("Failed", "OutOfService", "UpdateRollbackFailed")]),
                record_failure,
            )
            .otherwise(count_check.next(keep_waiting))
        )
        wait.next(describe).next(check)
        decide.next(
            sfn.Choice(self, "Deploy?")
            .when(sfn.Condition.string_equals("$.deploy.decision", "deploy"), start.next(start_checks).next(wait))
            .otherwise(skipped)
        )
        self._bound(decide, [skipped, finished])

    def _smoke_check(self, smoke_function: PythonFunction, endpoint: str, endpoint_arn: str,
                     endpoint_config_arn: str, *, passed: sfn.IChainable) -> sfn.IChainable:
        """After InService on the new config: one known photo to the endpoint (lambdas/deploy/smoke.py). A good
        answer goes on to ``passed`` (Finish deploy, which records the model in service). A bad one, or a smoke
        Lambda that cannot run, fails the stage with the cause, after an update puts the previous endpoint config
        back (the in-service record, written only by Finish deploy, still names the old model); a first deploy has
        nothing to roll back to, and its cause says so."""
        smoke_task = tasks.LambdaInvoke(
            self,
            "Smoke test endpoint",
            comment="One known photo to the new endpoint; the answer read as the count Lambda reads answers",
            lambda_function=smoke_function.function,
            payload=sfn.TaskInput.from_object({"endpointName": endpoint}),
            result_selector={"passed.$": "$.Payload.passed", "cause.$": "$.Payload.cause",
                             "count.$": "$.Payload.count", "status.$": "$.Payload.status"},
            result_path="$.deploy.smoke",
            task_timeout=sfn.Timeout.duration(Duration.seconds(smoke.LAMBDA_TIMEOUT_SECONDS)),
        )
        could_not_run = sfn.Pass(
            self,
            "Smoke check could not run",
            parameters={"passed": False,
                        "cause.$": f"States.Format('smoke check of endpoint {endpoint} could not run: {{}}', "
                                   "$.deploy.smokeError.Error)"},
            result_path="$.deploy.smoke",
        )
        smoke_task.add_catch(could_not_run, errors=["States.ALL"], result_path="$.deploy.smokeError")

        def fail(name: str, cause: str, *args: str) -> sfn.IChainable:
            return sfn.Pass(
                self, f"{name} cause",
                parameters={"cause.$": f"States.Format('{{}}; {cause}', $.deploy.smoke.cause, {', '.join(args)})"},
                result_path="$.deploy.failure",
            ).next(sfn.Fail(self, name, error="SmokeCheckFailed", cause_path="$.deploy.failure.cause"))

        previous, released = "$.deploy.release.previousEndpointConfigName", "$.deploy.release.endpointConfigName"
        roll_back = tasks.CallAwsService(
            self,
            "Roll back endpoint",
            comment="UpdateEndpoint back to the config the endpoint served before this deploy",
            service="sagemaker",
            action="updateEndpoint",
            parameters={"EndpointName": endpoint, "EndpointConfigName": sfn.JsonPath.string_at(previous)},
            iam_resources=[endpoint_arn, endpoint_config_arn],
            iam_action="sagemaker:UpdateEndpoint",
            result_path=sfn.JsonPath.DISCARD,
        )
        roll_back.add_retry(errors=["SageMaker.SageMakerException", "States.Timeout"], max_attempts=5,
                            interval=Duration.seconds(10), backoff_rate=2)
        roll_back.add_catch(fail("Smoke check failed, rollback failed",
                                 "rolling back to endpoint config {} failed too ({}): the endpoint serves config {}, "
                                 "put the previous config back by hand", previous, "$.deploy.rollbackError.Error",
                                 released),
                            errors=["States.ALL"], result_path="$.deploy.rollbackError")
        roll_back.next(fail("Smoke check failed, rolled back",
                            "the endpoint is rolled back to its previous config {} (UpdateEndpoint started) and the "
                            "model in service is unchanged; the new config {} is left unused", previous, released))
        first_deploy = fail("Smoke check failed on first deploy",
                            "this was the first deploy of the endpoint, so there is no previous config to roll back "
                            "to: the endpoint stays on config {} and no model is recorded in service", released)
        verdict = (
            sfn.Choice(self, "Smoke check passed?")
            .when(sfn.Condition.boolean_equals("$.deploy.smoke.passed", True), passed)
            .when(sfn.Condition.and_(sfn.Condition.string_equals("$.deploy.release.action", "update"),
                                     sfn.Condition.is_string(previous)), roll_back)
            .otherwise(first_deploy)
        )
        could_not_run.next(verdict)
        return smoke_task.next(verdict)


class LockedDeployStage(StageFragment):
    """The deploy stage under the endpoint's deploy lock (lambdas/deploy/lock.py): acquire it (a second deploy
    waits, bounded, then fails with "another deploy is in progress"), run the stage's own states in a one-branch
    Parallel, and release the lock on every path: success, a failure of any state inside (caught here, then
    raised again with its own error and cause), or a failure of the release itself (the lease then runs out).

    The gate runs inside, after the lock is held, so it compares with the model in service at deploy time.
    """

    def __init__(self, scope: Construct, construct_id: str, *, inner: sfn.StateMachineFragment,
                 lock_function: PythonFunction) -> None:
        super().__init__(scope, construct_id)

        def lock_task(name: str, action: str, comment: str) -> tasks.LambdaInvoke:
            return tasks.LambdaInvoke(
                self, name, comment=comment, lambda_function=lock_function.function,
                payload=sfn.TaskInput.from_object({"action": action, "owner": sfn.JsonPath.execution_id,
                                                   "execution": sfn.JsonPath.execution_name}),
                result_path=sfn.JsonPath.DISCARD,
                task_timeout=sfn.Timeout.duration(Duration.seconds(LAMBDA_SECONDS)),
            )

        acquire = lock_task("Acquire deploy lock", "acquire", "One deploy of the endpoint at a time; "
                            "another holder's live lease raises DeployLockHeld")
        acquire.add_retry(errors=[lock.DeployLockHeld.__name__], interval=LOCK_INTERVAL, max_attempts=LOCK_ATTEMPTS,
                          backoff_rate=LOCK_BACKOFF, max_delay=LOCK_MAX_DELAY)
        body = sfn.Parallel(self, "Deploy under lock", comment="The deploy stage's states, while the lock is held",
                            output_path="$[0]")
        body.branch(inner)
        released = lock_task("Release deploy lock", "release", "Frees the lock for the next deploy")
        left = sfn.Pass(self, "Deploy lock left to expire", comment="The release failed: the lease runs out")
        released.add_catch(left, errors=["States.ALL"], result_path=sfn.JsonPath.DISCARD)

        failure = "$.deployFailure"
        raise_again = (
            sfn.Choice(self, "Deploy error has a cause?")
            .when(sfn.Condition.is_present(f"{failure}.Cause"),
                  sfn.Fail(self, "Deploy failed", error_path=f"{failure}.Error", cause_path=f"{failure}.Cause"))
            .otherwise(sfn.Fail(self, "Deploy failed without cause", error_path=f"{failure}.Error"))
        )
        release_after_failure = lock_task("Release deploy lock after failure", "release",
                                          "Frees the lock, then fails the stage with the original error")
        release_after_failure.add_catch(raise_again, errors=["States.ALL"], result_path=sfn.JsonPath.DISCARD)
        release_after_failure.next(raise_again)
        body.add_catch(release_after_failure, errors=["States.ALL"], result_path=failure)
        acquire.next(body).next(released)
        self._bound(acquire, [released, left])


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
        self.endpoint_config_arn = self._sagemaker_arn("endpoint-config", f"{self.endpoint_name}-*")
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
        # Reads the answer as the count Lambda does, so it gets the count Lambda's decision settings.
        self.smoke = PythonFunction(
            self, "Smoke", settings=settings, handler="lambdas.deploy.smoke.handler", service="deploy-smoke",
            description="Sends one known photo to the new endpoint and checks the answer against the contract",
            environment={"CONFIDENCE_THRESHOLD": str(settings.count_confidence_threshold),
                         "CONSIGNMENT_ERROR_RATE": str(settings.consignment_error_rate)},
            timeout_seconds=smoke.LAMBDA_TIMEOUT_SECONDS, memory_size=256,
        )
        self.smoke.role.add_to_principal_policy(
            iam.PolicyStatement(actions=["sagemaker:InvokeEndpoint"], resources=[self.endpoint_arn])
        )

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

        # The deploy lock: one item per endpoint with a lease (lambdas/deploy/lock.py). A small table of its own,
        # like the count path's idempotency records, rather than an item in the counts table: the counts table's
        # items are count records (its byStatus index, review queue and scans read them all), its role grants would
        # have to open it to the deploy path, and it is retained in production while a lock is worth nothing after
        # its lease. expiresAt is the TTL attribute, so stale locks are deleted too.
        self.lock_table = lease_table(self, "Locks", key_attribute=lock.KEY, ttl_attribute="expiresAt",
                                      data_key=data_key)
        self.lock = PythonFunction(
            self, "Lock", settings=settings, handler="lambdas.deploy.lock.handler", service="deploy-lock",
            description="Takes and frees the endpoint's deploy lock: one deploy at a time",
            environment={"LOCK_TABLE": self.lock_table.table_name, "ENDPOINT_NAME": self.endpoint_name,
                         "LEASE_SECONDS": str(lock_lease_seconds(settings))},
            timeout_seconds=LAMBDA_SECONDS, memory_size=256,
        )
        self.lock_table.grant(self.lock.role, "dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:DeleteItem")
        data_key.grant(self.lock.role, "kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey")

        self.inner_stage = DeployStage(self, "Stage", gate=self.gate, release=self.release, finish=self.finish,
                                       endpoint=self.endpoint_name, endpoint_arn=self.endpoint_arn,
                                       max_checks=endpoint_checks(settings), smoke_function=self.smoke,
                                       endpoint_config_arn=self.endpoint_config_arn)
        self.stage = LockedDeployStage(self, "Locked", inner=self.inner_stage, lock_function=self.lock)

    def add_nag_evidence(self, state_machine: sfn.StateMachine) -> None:
        """cdk-nag suppressions for the wildcards this stage grants the state machine that hosts it."""
        suppress(state_machine, wildcard_suppression(
            state_machine, "LambdaInvoke grants the function ARN plus ':*' so that the gate, release, finish, "
            "smoke and lock tasks may call a version or alias of those five functions, and nothing else.",
            resources=[f"{fn.function.function_arn}:*"
                       for fn in (self.gate, self.release, self.finish, self.smoke, self.lock)],
        ), wildcard_suppression(
            state_machine, "A failed smoke check rolls the endpoint back with UpdateEndpoint to the config it served "
            "before; the deploy names its configs <endpoint>-<execution>, so the grant is that prefix.",
            resources=[self.endpoint_config_arn],
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
