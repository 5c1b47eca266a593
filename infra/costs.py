"""The weekly cost report: a Lambda on an EventBridge Scheduler schedule, also callable on demand."""

from __future__ import annotations

import json

from aws_cdk import Duration, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_scheduler as scheduler
from aws_cdk import aws_sqs as sqs
from cdk_nag import NagSuppressions
from constructs import Construct

from infra.config import Settings
from infra.function import PythonFunction
from infra.nag import suppress, wildcard_suppression
from infra.storage import REPORT_PREFIX
from lambdas.training.request import name_prefix

# What the cost report asks Cost Explorer (lambdas/costs/report.py cost_query): daily cost per service.
COST_EXPLORER_ACTIONS = ["ce:GetCostAndUsage"]


class Costs(Construct):
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
        # The training stage names every job (and tuning trial) with this prefix.
        job_prefix = name_prefix(settings.project, settings.stage)
        stack = Stack.of(self)
        self.report = PythonFunction(
            self,
            "Report",
            settings=settings,
            handler="lambdas.costs.report.handler",
            service="costs",
            description="Cost Explorer report by service for the project tag, with training spot savings",
            environment={"PROJECT": settings.project, "DATA_BUCKET": data_bucket.bucket_name,
                         "TRAINING_JOB_PREFIX": job_prefix},
            timeout_seconds=120,
            memory_size=256,
        )
        role = self.report.role
        own_jobs = stack.format_arn(service="sagemaker", resource="training-job", resource_name=f"{job_prefix}-*")
        data_bucket.grant_put(role, f"{REPORT_PREFIX}costs/*")
        data_key.grant_encrypt(role)
        # The account's billing is readable through this one role, holding only the Cost Explorer action the
        # report makes (GetCostAndUsage). The report Lambda assumes it for its query rather than being it: being
        # it would hand whoever else may assume it (the Studio user, a person running notebooks) the Lambda's
        # writes to the bucket and its SageMaker reads too, and would put lambda.amazonaws.com in its trust
        # policy. No SageMaker role (training code, endpoints) holds a ce: action.
        self.analysis_role = iam.Role(
            self,
            "AnalysisRole",
            assumed_by=iam.ArnPrincipal(role.role_arn),
            description=f"{settings.project}: reads Cost Explorer (GetCostAndUsage) for the cost report and "
            "notebooks; nothing else",
            max_session_duration=Duration.hours(1),
        )
        self.analysis_role.add_to_policy(
            iam.PolicyStatement(sid="CostExplorerRead", actions=COST_EXPLORER_ACTIONS, resources=["*"])
        )
        self.analysis_role.grant_assume_role(role)
        suppress(
            self.analysis_role,
            wildcard_suppression(
                self.analysis_role, "ce:GetCostAndUsage supports no resource-level permissions: '*' is the only "
                "resource AWS accepts for it; the role holds nothing else.", resources=["*"],
            ),
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(sid="ListTrainingJobs", actions=["sagemaker:ListTrainingJobs"], resources=["*"])
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="DescribeOwnTrainingJobs",
                actions=["sagemaker:DescribeTrainingJob"],
                resources=[own_jobs],
            )
        )
        self.report.function.add_environment("COST_ANALYSIS_ROLE_ARN", self.analysis_role.role_arn)
        suppress(
            role,
            wildcard_suppression(
                self.report, "sagemaker:ListTrainingJobs supports no resource-level permissions: '*' is the only "
                "resource AWS accepts for it (the same '*' also covers X-Ray, suppressed by PythonFunction).",
                resources=["*"],
            ),
            wildcard_suppression(
                self.report, "DescribeTrainingJob is limited to this deployment's job-name prefix (jobs are named "
                "per execution) and the report is written only under reports/costs/ (one file per run).",
                resources=[own_jobs, data_bucket.arn_for_objects(f"{REPORT_PREFIX}costs/*")],
            ),
            wildcard_suppression(
                self.report, "CDK's put grant on the KMS-encrypted bucket expands to s3:Abort* and the data key's "
                "GenerateDataKey*/ReEncrypt*, held to reports/costs/ and the one data key.",
                actions=["s3:Abort*", "kms:GenerateDataKey*", "kms:ReEncrypt*"],
            ),
        )
        # The L1 schedule with an own role: the L2 target's grant would also allow invoking every version (":*").
        invoker = iam.Role(
            self,
            "ScheduleRole",
            assumed_by=iam.ServicePrincipal(
                "scheduler.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": stack.account}}
            ),
        )
        invoker.add_to_principal_policy(
            iam.PolicyStatement(actions=["lambda:InvokeFunction"], resources=[self.report.function.function_arn])
        )
        # A schedule whose invocation still fails after its retries drops the event unless it has a dead-letter
        # queue; with one, the missed report is visible (and the reason is in the message attributes). Scheduler
        # sends to it with the schedule's role, which the send grant lets use the data key.
        self.dlq = sqs.Queue(self, "ScheduleDeadLetters", encryption=sqs.QueueEncryption.KMS,
                             encryption_master_key=data_key, enforce_ssl=True, retention_period=Duration.days(14))
        NagSuppressions.add_resource_suppressions(
            self.dlq, [{"id": "AwsSolutions-SQS3", "reason": "This queue is the cost-report schedule's dead-letter "
                        "queue."}])
        self.dlq.grant_send_messages(invoker)
        suppress(invoker, wildcard_suppression(
            invoker, "Sending to the KMS-encrypted dead-letter queue: CDK's send grant expands to the data key's "
            "GenerateDataKey*/ReEncrypt*, on the one data key only.",
            actions=["kms:GenerateDataKey*", "kms:ReEncrypt*"]))
        self.schedule = scheduler.CfnSchedule(
            self,
            "Weekly",
            description=f"{settings.project}: writes the cost report to s3://<data bucket>/{REPORT_PREFIX}costs/",
            schedule_expression=settings.cost_report_schedule,
            schedule_expression_timezone="Etc/UTC",
            flexible_time_window=scheduler.CfnSchedule.FlexibleTimeWindowProperty(mode="OFF"),
            state="ENABLED",
            target=scheduler.CfnSchedule.TargetProperty(
                arn=self.report.function.function_arn,
                role_arn=invoker.role_arn,
                input=json.dumps({"days": 7}),
                retry_policy=scheduler.CfnSchedule.RetryPolicyProperty(
                    maximum_retry_attempts=2, maximum_event_age_in_seconds=6 * 3600
                ),
                dead_letter_config=scheduler.CfnSchedule.DeadLetterConfigProperty(arn=self.dlq.queue_arn),
            ),
        )
