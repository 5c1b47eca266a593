"""What a platform team watches: one dashboard, and alarms on the things that need a person.

Alarms go to one SNS topic (encrypted, TLS only); ``alarmEmail`` in the settings subscribes an address to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import Settings
from lambdas.training.request import name_prefix

# The count Lambda's statuses (lambdas/count/records.py STATUSES); infra must not import Lambda code.
COUNT_STATUSES = ("match", "mismatch", "uncounted-low-confidence", "rejected", "counted")
# Why a count record failed (lambdas/count/handler.py FAILURE_CAUSES), the CountFailures metric's "cause".
COUNT_FAILURE_CAUSES = ("out-of-time", "endpoint-timeout", "endpoint-throttled", "endpoint-error", "bad-prediction",
                        "bad-message", "aws-error", "unexpected")
FIVE_MINUTES = Duration.minutes(5)
# What SageMaker publishes for every training job's instances, Debugger or not (docs.aws.amazon.com/sagemaker/
# latest/dg/monitoring-cloudwatch.html, "Training Job ... Instance Metrics"): namespace /aws/sagemaker/TrainingJobs,
# dimension Host = "<training-job-name>/algo-<instance-number>", in percent (CPU and GPU summed over cores/GPUs).
TRAINING_INSTANCE_NAMESPACE = "/aws/sagemaker/TrainingJobs"
TRAINING_INSTANCE_METRICS = ("CPUUtilization", "MemoryUtilization", "GPUUtilization", "GPUMemoryUtilization")


def _endpoint_metric(endpoint_name: str, name: str, statistic: str) -> cloudwatch.Metric:
    return cloudwatch.Metric(
        namespace="AWS/SageMaker",
        metric_name=name,
        dimensions_map={"EndpointName": endpoint_name, "VariantName": "AllTraffic"},
        statistic=statistic,
        period=FIVE_MINUTES,
    )


def _search(namespace: str, metric_name: str, statistic: str, label: str) -> cloudwatch.MathExpression:
    """Every series of a metric whatever its dimensions (the training report adds the job's mode)."""
    return cloudwatch.MathExpression(
        expression=f"SEARCH('{{{namespace},mode,service}} MetricName=\"{metric_name}\"', '{statistic}', 86400)",
        label=label,
        period=Duration.days(1),
    )


def training_instance_search(job_prefix: str, metric_name: str) -> cloudwatch.MathExpression:
    """One series per instance of this deployment's training jobs. Job names are made per execution, so the Host
    value is matched by partial match on the job-name prefix (CloudWatch search splits it into its words, all
    of which must appear) rather than named."""
    return cloudwatch.MathExpression(
        expression=(f"SEARCH('{{\"{TRAINING_INSTANCE_NAMESPACE}\",Host}} MetricName=\"{metric_name}\" "
                    f"Host={job_prefix}', 'Average', 60)"),
        label=metric_name,
        period=Duration.minutes(1),
    )


class Observability(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        state_machine: sfn.IStateMachine,
        endpoint_name: str,
        count_dlq: sqs.IQueue,
        count_function: lambda_.IFunction,
        functions: Sequence[lambda_.IFunction],
        domain_alarms: Sequence[cloudwatch.Alarm] = (),
    ) -> None:
        """``domain_alarms`` are alarms the domains own (the endpoint's rollback alarm): they
        get the same notification and a place on the dashboard instead of a second alarm on the same metric."""
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        # The topic has a key of its own: CloudWatch must be allowed to use it, and that statement on the data key
        # would let CloudWatch use the key of the bucket, the table and the training volumes too.
        self.key = kms.Key(
            self,
            "AlarmKey",
            description=f"{settings.project}: encrypts the alarm topic",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN if settings.is_production else RemovalPolicy.DESTROY,
        )
        self.topic = sns.Topic(
            self,
            "Alarms",
            display_name=f"{settings.project} {settings.stage} alarms",
            master_key=self.key,
            enforce_ssl=True,
        )
        # CloudWatch publishes to the topic with the key, for this account's alarms only (aws:SourceAccount and
        # aws:SourceArn on the service principal: the confused-deputy conditions CloudWatch sets on its calls).
        self.key.add_to_resource_policy(iam.PolicyStatement(
            sid="CloudWatchAlarmsOfThisAccount",
            principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
            actions=["kms:Decrypt", "kms:GenerateDataKey*"],
            resources=["*"],
            conditions={
                "StringEquals": {"aws:SourceAccount": stack.account},
                "ArnLike": {"aws:SourceArn": stack.format_arn(
                    service="cloudwatch", resource="alarm", resource_name="*",
                    arn_format=ArnFormat.COLON_RESOURCE_NAME)},
            },
        ))
        if settings.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(settings.alarm_email))
        notify = actions.SnsAction(self.topic)

        pipeline_failed = state_machine.metric_failed(period=FIVE_MINUTES, statistic="Sum")
        endpoint_5xx = _endpoint_metric(endpoint_name, "Invocation5XXErrors", "Sum")
        model_latency = _endpoint_metric(endpoint_name, "ModelLatency", "p95")
        dlq_depth = count_dlq.metric_approximate_number_of_messages_visible(period=FIVE_MINUTES, statistic="Maximum")

        self.alarms = [
            cloudwatch.Alarm(
                self,
                "PipelineFailed",
                alarm_description="A pipeline execution failed: its cause names the stage (Step Functions console)",
                metric=pipeline_failed,
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            cloudwatch.Alarm(
                self,
                "CountDeadLetters",
                alarm_description="Photos could not be counted after retries and wait in the dead-letter queue",
                metric=dlq_depth,
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            *domain_alarms,
        ]
        for alarm in self.alarms:
            alarm.add_alarm_action(notify)

        counts = [
            cloudwatch.Metric(
                namespace=settings.project,
                metric_name=f"Photos-{status}",
                dimensions_map={"service": "count"},
                statistic="Sum",
                period=Duration.hours(1),
                label=status,
            )
            for status in COUNT_STATUSES
        ]
        failures = [
            cloudwatch.Metric(
                namespace=settings.project,
                metric_name="CountFailures",
                dimensions_map={"service": "count", "cause": cause},
                statistic="Sum",
                period=FIVE_MINUTES,
                label=cause,
            )
            for cause in COUNT_FAILURE_CAUSES
        ]
        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=f"{settings.project}-{settings.stage}",
            default_interval=Duration.days(7),
            widgets=[
                [
                    cloudwatch.GraphWidget(
                        title="Pipeline executions",
                        left=[
                            state_machine.metric_started(period=Duration.hours(1), label="started"),
                            state_machine.metric_succeeded(period=Duration.hours(1), label="succeeded"),
                            state_machine.metric_failed(period=Duration.hours(1), label="failed"),
                        ],
                        width=8,
                    ),
                    cloudwatch.GraphWidget(
                        title="Pipeline duration (ms)",
                        left=[state_machine.metric_time(period=Duration.hours(1), statistic="Maximum")],
                        width=8,
                    ),
                    cloudwatch.GraphWidget(
                        title="Training jobs: validation accuracy and billable seconds",
                        left=[_search(settings.project, "valid_accuracy", "Maximum", "validation accuracy")],
                        right=[_search(settings.project, "TrainingBillableSeconds", "Sum", "billable seconds")],
                        width=8,
                    ),
                ],
                [
                    cloudwatch.GraphWidget(
                        title="Endpoint invocations and errors",
                        left=[
                            _endpoint_metric(endpoint_name, "Invocations", "Sum"),
                            _endpoint_metric(endpoint_name, "Invocation4XXErrors", "Sum"),
                            endpoint_5xx,
                        ],
                        width=8,
                    ),
                    cloudwatch.GraphWidget(
                        title="Endpoint model latency p50 / p95 (µs)",
                        left=[_endpoint_metric(endpoint_name, "ModelLatency", "p50"), model_latency],
                        width=8,
                    ),
                    cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=8),
                ],
                [
                    cloudwatch.GraphWidget(title="Photos counted, by status", left=counts, stacked=True, width=8),
                    cloudwatch.GraphWidget(title="Count dead-letter queue depth", left=[dlq_depth], width=8),
                    cloudwatch.GraphWidget(
                        title="Count Lambda errors and duration",
                        left=[count_function.metric_errors(period=FIVE_MINUTES)],
                        right=[count_function.metric_duration(period=FIVE_MINUTES, statistic="p95")],
                        width=8,
                    ),
                ],
                [
                    cloudwatch.GraphWidget(
                        title="Count records failed, by cause (each retried, then the dead-letter queue)",
                        left=failures,
                        stacked=True,
                        width=24,
                        legend_position=cloudwatch.LegendPosition.RIGHT,
                    )
                ],
                [
                    cloudwatch.GraphWidget(
                        title="Training job instances: CPU, memory, GPU utilisation (%)",
                        left=[training_instance_search(name_prefix(settings.project, settings.stage), metric)
                              for metric in TRAINING_INSTANCE_METRICS],
                        width=24,
                        legend_position=cloudwatch.LegendPosition.RIGHT,
                    )
                ],
                [
                    cloudwatch.GraphWidget(
                        title="Lambda errors (all functions)",
                        left=[function.metric_errors(period=FIVE_MINUTES) for function in functions],
                        width=24,
                        legend_position=cloudwatch.LegendPosition.RIGHT,
                    )
                ],
            ],
        )
        stack = Stack.of(self)
        self.dashboard_url = (
            f"https://{stack.region}.console.aws.amazon.com/cloudwatch/home?region={stack.region}"
            f"#dashboards:name={settings.project}-{settings.stage}"
        )
