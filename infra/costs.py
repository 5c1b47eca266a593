"""The weekly cost report: a Lambda on an EventBridge Scheduler schedule, also callable on demand."""

from __future__ import annotations

import json

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_scheduler as scheduler
from constructs import Construct

from infra.config import Settings
from infra.function import PythonFunction
from infra.nag import suppress, wildcard_suppression
from infra.storage import REPORT_PREFIX
from lambdas.training.request import name_prefix


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
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CostExplorerRead",
                actions=["ce:GetCostAndUsage"],
                resources=["*"],
            )
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
        suppress(
            role,
            wildcard_suppression(
                self.report, "ce:GetCostAndUsage and sagemaker:ListTrainingJobs support no resource-level "
                "permissions: '*' is the only resource AWS accepts for them (the same '*' also covers X-Ray, "
                "suppressed by PythonFunction).", resources=["*"],
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
            ),
        )
