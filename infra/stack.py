"""The invmon stack: one stack composed of per-domain constructs, wired where the parts meet."""

from __future__ import annotations

from aws_cdk import CfnOutput, Stack, Tags
from constructs import Construct

from infra import budget
from infra.config import Settings
from infra.costs import Costs
from infra.count import Count
from infra.deploy import Deploy
from infra.execution_input import ExecutionInputCheck
from infra.ingest import Ingest
from infra.nag import STATE_MACHINE_REASON, suppress, wildcard_suppression
from infra.observability import Observability
from infra.pack import Pack
from infra.pipeline import Pipeline, Stage
from infra.review import Review
from infra.storage import Storage
from infra.studio import Studio
from infra.training import Training


class InvmonStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.settings = settings
        Tags.of(self).add("project", settings.project)
        Tags.of(self).add("stage", settings.stage)

        self.storage = Storage(self, "Storage", settings=settings)
        data = {"settings": settings, "data_bucket": self.storage.data, "data_key": self.storage.key}
        self.ingest = Ingest(self, "Ingest", **data)
        self.pack = Pack(self, "Pack", **data)
        self.training = Training(self, "Training", **data)
        # Each SageMaker workload has its own execution role: training (infra/training.py), the endpoint's model
        # (infra/deploy.py) and bulk counting's transform model (infra/count.py).
        self.deploy = Deploy(self, "Deploy", **data)
        self.count = Count(self, "Count", **data, endpoint_name=self.deploy.endpoint_name)
        self.costs = Costs(self, "Costs", **data)
        self.review = Review(self, "Review", **data, counts_table=self.count.table)

        self.execution_input = ExecutionInputCheck(
            self, "ExecutionInput", settings=settings, ingest_environment=self.ingest.environment,
            training_environment=self.training.deployment_environment)

        budget.check(settings)
        self.pipeline = Pipeline(
            self,
            "Pipeline",
            settings=settings,
            stages=[
                Stage("ingest", self.ingest.stage),
                Stage("pack", self.pack.stage),
                Stage("training", self.training.stage),
                Stage("deploy", self.deploy.stage),
            ],
            input_check=self.execution_input.function,
            # The sum of the stages' budgets (infra/budget.py): no job of the pipeline outlives its execution.
            timeout_hours=-(-budget.execution_timeout_seconds(settings) // 3600),
        )
        # Each stage suppresses the wildcards it grants the pipeline's role; '*' (tracing, log delivery) is
        # the pipeline's own.
        for domain in (self.execution_input, self.ingest, self.pack, self.training, self.deploy):
            domain.add_nag_evidence(self.pipeline.state_machine)
        suppress(self.pipeline.state_machine,
                 wildcard_suppression(self.pipeline.state_machine, STATE_MACHINE_REASON, resources=["*"]))

        functions = [
            self.execution_input.function,
            self.ingest.select.function, self.ingest.worker.function, self.ingest.split.function,
            *self.pack.functions,
            self.training.prepare.function, self.training.report.function,
            self.deploy.gate.function, self.deploy.release.function, self.deploy.finish.function,
            self.count.function, self.costs.report.function, self.review.handler.function,
        ]
        self.observability = Observability(
            self,
            "Observability",
            settings=settings,
            state_machine=self.pipeline.state_machine,
            endpoint_name=self.deploy.endpoint_name,
            count_dlq=self.count.dlq,
            count_function=self.count.function,
            functions=functions,
            domain_alarms=[self.deploy.rollback_alarm, self.count.oldest_upload_alarm, self.review.oldest_alarm],
        )
        self.observability.dashboard.add_widgets(*self.review.widgets())

        self.studio = None
        if settings.studio_domain:
            self.studio = Studio(self, "Studio", **data, counts_table=self.count.table,
                                 state_machine=self.pipeline.state_machine,
                                 cost_analysis_role=self.costs.analysis_role)
            Tags.of(self.studio).add("component", "studio")
            CfnOutput(self, "StudioDomainId", value=self.studio.domain.attr_domain_id,
                      description="SageMaker Studio domain; open it as user profile "
                                  f"{self.studio.user.user_profile_name}")

        for component, construct in (
            ("storage", self.storage), ("ingest", self.ingest), ("pack", self.pack), ("training", self.training),
            ("deploy", self.deploy), ("count", self.count), ("costs", self.costs),
            ("pipeline", self.pipeline), ("pipeline", self.execution_input), ("observability", self.observability),
            ("review", self.review),
        ):
            Tags.of(construct).add("component", component)

        outputs = {
            "DataBucketName": (self.storage.data.bucket_name, "Bucket holding the dataset, models and reports"),
            "IncomingPrefix": (settings.incoming_prefix, "Upload photos under this prefix of the data bucket"),
            "StateMachineArn": (self.pipeline.state_machine.state_machine_arn,
                                "Start it with {} to ingest, train and deploy"),
            "CountsTableName": (self.count.table.table_name, "One record per counted photo version"),
            "CountDeadLetterQueueUrl": (self.count.dlq.queue_url, "Uploads that could not be counted (invmon dlq)"),
            "EndpointName": (self.deploy.endpoint_name, "The counting endpoint (exists after the first deploy)"),
            "DashboardUrl": (self.observability.dashboard_url, "CloudWatch dashboard"),
            "CostReportFunctionName": (self.costs.report.function.function_name,
                                       "Invoke for a cost report now (invmon costs --refresh)"),
            "AlarmTopicArn": (self.observability.topic.topic_arn, "Subscribe to be told about failures"),
            "CostAnalysisRoleArn": (self.costs.analysis_role.role_arn,
                                    "The one role that reads Cost Explorer (the cost report assumes it)"),
        }
        for name, (value, description) in outputs.items():
            CfnOutput(self, name, value=value, description=description)
