"""Counting path: incoming photo -> S3 notification -> SQS (with a DLQ) -> count Lambda -> endpoint -> table.

Also the counts table (design in ``lambdas/count/records.py``), the idempotency table that makes duplicate
deliveries count once, events on mismatches and low-confidence counts (default event bus, source
``<project>.count``), and bulk counting: a small state machine that counts every photo under a prefix with
SageMaker Batch Transform and loads the results into the same table through the same record code.
"""

from __future__ import annotations

from aws_cdk import Aws, Duration, RemovalPolicy, Stack, Tags
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda_event_sources as sources
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_notifications as s3n
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from infra.config import Settings
from infra.execution_roles import DLC_ACCOUNT, container_statements, execution_role, log_group_arn, volume_grant
from infra.function import PythonFunction, log_group
from infra.nag import IAM4, STATE_MACHINE_REASON, flatten, suppress, wildcard_suppression
from infra.storage import MODEL_PREFIX, REPORT_PREFIX, grant_read_prefix, lease_table

# The count path's time budget, sized together (lambdas/count/handler.py reads the ENDPOINT_* values):
#
#   one endpoint call, worst case  = attempts x (connect + read timeout) + backoff
#                                  = 2 x (3 s + 20 s) + ~1 s                              = 47 s
#   one record, worst case         = that call + 5 s (S3 read, consignment lookups, table writes, event) = 52 s
#   Lambda timeout                 = 120 s: the handler starts a record only while at least 52 s remain, so
#                                    two fully stalled records still leave it returning in time, reporting
#                                    the records it did not start as batch item failures (never a timeout
#                                    that returns all ten, counted or not)
#   a healthy batch                = 10 records x well under 1 s (model latency is milliseconds on CPU) +
#                                    a 5 s batching window: far inside 120 s
#   SQS visibility timeout         = 6 x 120 s = 720 s: AWS's advice is at least six times the function timeout
#                                    ("Creating and configuring an Amazon SQS event source mapping",
#                                    docs.aws.amazon.com/lambda/latest/dg/services-sqs-configure.html)
#
# The 20 s read timeout is a third of what a container may take ("A customer's model containers must respond
# to requests within 60 seconds", InvokeEndpoint API reference; a serverless endpoint's /invocations timeout
# is also 1 minute): this model answers in milliseconds, and a request still silent after 20 s is a stalled
# or cold container that the second attempt (or SQS's next delivery) reaches warm.
ENDPOINT_CONNECT_TIMEOUT_SECONDS = 3
ENDPOINT_READ_TIMEOUT_SECONDS = 20
ENDPOINT_MAX_ATTEMPTS = 2
RECORD_OVERHEAD_SECONDS = 5
RECORD_BUDGET_SECONDS = (ENDPOINT_MAX_ATTEMPTS * (ENDPOINT_CONNECT_TIMEOUT_SECONDS + ENDPOINT_READ_TIMEOUT_SECONDS)
                         + (ENDPOINT_MAX_ATTEMPTS - 1) + RECORD_OVERHEAD_SECONDS)
COUNT_TIMEOUT_SECONDS = 120
BATCH_SIZE = 10
MAX_BATCHING_WINDOW = Duration.seconds(5)
VISIBILITY_TIMEOUT = Duration.seconds(6 * COUNT_TIMEOUT_SECONDS)
MAX_RECEIVE_COUNT = 5
# Uploads wait in the queue as long as SQS allows: 14 days, its maximum MessageRetentionPeriod (1,209,600 s;
# Amazon SQS developer guide, "Amazon SQS message quotas"), so a long weekend of counting that has stopped loses
# nothing. The default of 4 days would not survive a stoppage noticed after a long weekend.
UPLOAD_RETENTION = Duration.days(14)
# A healthy upload is counted within seconds; one whose deliveries all fail reaches the DLQ after at most
# MAX_RECEIVE_COUNT x VISIBILITY_TIMEOUT (1 hour). An oldest upload older than twice that means counting has
# stopped: the alarm fires days before the retention period runs out.
OLDEST_UPLOAD_ALARM = Duration.seconds(2 * MAX_RECEIVE_COUNT * int(VISIBILITY_TIMEOUT.to_seconds()))
assert 2 * RECORD_BUDGET_SECONDS < COUNT_TIMEOUT_SECONDS, "two stalled records must fit in one invocation"
BULK_PREFIX = f"{REPORT_PREFIX}bulk/"
# SageMaker writes every transform job's logs into this one group per region.
TRANSFORM_LOG_GROUP = "/aws/sagemaker/TransformJobs"
# What CDK's table grant (the table is encrypted with the data key) and bucket put grant allow, as cdk-nag names
# them; reads are granted by infra.storage.grant_read_prefix, which uses no wildcard action.
READ_GRANT_ACTIONS = ("kms:GenerateDataKey*", "kms:ReEncrypt*")
READ_PUT_GRANT_ACTIONS = (*READ_GRANT_ACTIONS, "s3:Abort*")
READ_GRANT_REASON = ("CDK's table grant on a table encrypted with the data key expands to the key's "
                     "GenerateDataKey*/ReEncrypt*, on the one data key only.")
READ_PUT_GRANT_REASON = (READ_GRANT_REASON + " s3:Abort* (aborting its own multipart uploads) comes from the put "
                         "grant under reports/bulk/.")


def endpoint_concurrency(settings: Settings) -> int:
    """How many requests the endpoint takes at once: its serverless concurrency, or a few per instance."""
    if settings.endpoint_mode == "serverless":
        wanted = settings.endpoint_serverless_max_concurrency
    else:
        wanted = 4 * settings.endpoint_max_instances
    return min(1000, max(2, wanted))  # the bounds SQS event sources accept


class Count(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        data_bucket: s3.IBucket,
        data_key: kms.IKey,
        endpoint_name: str,
        bulk: bool = True,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        removal = RemovalPolicy.RETAIN if settings.is_production else RemovalPolicy.DESTROY
        self.endpoint_name = endpoint_name
        endpoint_arn = stack.format_arn(service="sagemaker", resource="endpoint", resource_name=endpoint_name)

        self.table = dynamodb.Table(
            self,
            "Counts",
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=data_key,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            # A production table outlives a mistaken `cdk destroy` or a delete in the console.
            deletion_protection=settings.is_production,
            removal_policy=removal,
        )
        self.table.add_global_secondary_index(
            index_name="byStatus",
            partition_key=dynamodb.Attribute(name="status", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="countedAt", type=dynamodb.AttributeType.STRING),
        )
        # The review queue (lambdas/review/queue.py): sparse, only records waiting for a person carry its keys.
        self.table.add_global_secondary_index(
            index_name="reviewQueue",
            partition_key=dynamodb.Attribute(name="reviewQueue", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="reviewRank", type=dynamodb.AttributeType.STRING),
        )
        # Powertools' idempotency records: short-lived (TTL), so kept apart from the counts.
        self.idempotency_table = lease_table(self, "Idempotency", key_attribute="id", ttl_attribute="expiration",
                                             data_key=data_key)

        # The queues have a key of their own: S3 must be allowed to use it for this bucket, and that
        # statement on the data key would make the key depend on the bucket that depends on the key.
        self.queue_key = kms.Key(
            self,
            "QueueKey",
            description=f"{settings.project}: encrypts the upload notifications queue and its DLQ",
            enable_key_rotation=True,
            removal_policy=removal,
        )
        self.queue_key.add_to_resource_policy(iam.PolicyStatement(
            principals=[iam.ServicePrincipal("s3.amazonaws.com")],
            actions=["kms:GenerateDataKey*", "kms:Decrypt"],
            resources=["*"],
            conditions={"ArnLike": {"aws:SourceArn": data_bucket.bucket_arn},
                        "StringEquals": {"aws:SourceAccount": stack.account}},
        ))
        self.dlq = sqs.Queue(
            self,
            "DeadLetters",
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self.queue_key,
            enforce_ssl=True,
            retention_period=Duration.days(14),
        )
        self.queue = sqs.Queue(
            self,
            "Uploads",
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self.queue_key,
            data_key_reuse=Duration.hours(1),
            enforce_ssl=True,
            visibility_timeout=VISIBILITY_TIMEOUT,
            retention_period=UPLOAD_RETENTION,
            dead_letter_queue=sqs.DeadLetterQueue(queue=self.dlq, max_receive_count=MAX_RECEIVE_COUNT),
        )
        # No AwsSolutions-SQS3 suppression: cdk-nag already recognises the uploads queue's dead-letter queue.
        self.oldest_upload_alarm = cloudwatch.Alarm(
            self,
            "OldestUpload",
            alarm_description=f"An upload has waited over {OLDEST_UPLOAD_ALARM.to_hours():g} h to be counted: "
            f"counting has stopped; uploads expire after {UPLOAD_RETENTION.to_days():g} days",
            metric=self.queue.metric_approximate_age_of_oldest_message(period=Duration.minutes(5),
                                                                      statistic="Maximum"),
            threshold=OLDEST_UPLOAD_ALARM.to_seconds(),
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        data_bucket.add_event_notification(
            s3.EventType.OBJECT_CREATED,
            s3n.SqsDestination(self.queue),
            s3.NotificationKeyFilter(prefix=settings.incoming_prefix),
        )

        self.event_bus = events.EventBus.from_event_bus_name(self, "DefaultBus", "default")
        self.event_source = f"{settings.project}.count"
        self.count = PythonFunction(
            self,
            "Function",
            settings=settings,
            handler="lambdas.count.handler.handler",
            service="count",
            description="Counts each photo uploaded under the incoming prefix and stores the result",
            environment={
                "DATA_BUCKET": data_bucket.bucket_name,
                "COUNTS_TABLE": self.table.table_name,
                "IDEMPOTENCY_TABLE": self.idempotency_table.table_name,
                "ENDPOINT_NAME": endpoint_name,
                "CONFIDENCE_THRESHOLD": str(settings.count_confidence_threshold),
                "MAX_IMAGE_BYTES": str(settings.count_max_image_bytes),
            "CONSIGNMENT_ERROR_RATE": str(settings.consignment_error_rate),
                "INCOMING_PREFIX": settings.incoming_prefix,
                "EVENT_BUS_NAME": self.event_bus.event_bus_name,
                "EVENT_SOURCE": self.event_source,
                "ENDPOINT_CONNECT_TIMEOUT": str(ENDPOINT_CONNECT_TIMEOUT_SECONDS),
                "ENDPOINT_READ_TIMEOUT": str(ENDPOINT_READ_TIMEOUT_SECONDS),
                "ENDPOINT_MAX_ATTEMPTS": str(ENDPOINT_MAX_ATTEMPTS),
                "RECORD_OVERHEAD_SECONDS": str(RECORD_OVERHEAD_SECONDS),
                "REVIEW_STATUSES": ",".join(settings.review_statuses),
                "REVIEW_AUDIT_RATE": str(settings.review_audit_rate),
                "REVIEW_MAX_PER_DAY": str(settings.review_max_per_day),
            },
            timeout_seconds=COUNT_TIMEOUT_SECONDS,
            # The object is held in memory once (at most countMaxImageBytes) and sent as the request body.
            memory_size=512,
        )
        self.function = self.count.function
        self.function.add_event_source(sources.SqsEventSource(
            self.queue,
            batch_size=BATCH_SIZE,
            max_batching_window=MAX_BATCHING_WINDOW,
            report_batch_item_failures=True,
            # Each invocation sends one photo at a time, so this caps the requests in flight at the endpoint:
            # a burst of uploads waits in the queue instead of being throttled towards the DLQ.
            max_concurrency=endpoint_concurrency(settings),
        ))
        role = self.count.role
        grant_read_prefix(data_bucket, data_key, role, f"{settings.incoming_prefix}*", missing_is_404=True)
        self.table.grant_read_write_data(role)
        self.idempotency_table.grant_read_write_data(role)
        role.add_to_principal_policy(iam.PolicyStatement(actions=["sagemaker:InvokeEndpoint"],
                                                         resources=[endpoint_arn]))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["events:PutEvents"],
            resources=[self.event_bus.event_bus_arn],
            conditions={"StringEquals": {"events:source": self.event_source}},
        ))
        suppress(
            role,
            wildcard_suppression(
                self.count, "Photos arrive under any key below the incoming prefix, so the read grant is that "
                "prefix; the table grant covers the counts table's own indexes ('<table>/index/*').",
                resources=[data_bucket.arn_for_objects(f"{settings.incoming_prefix}*"),
                           f"{self.table.table_arn}/index/*"],
            ),
            wildcard_suppression(self.count, READ_GRANT_REASON, actions=READ_GRANT_ACTIONS),
        )

        self._bucket_notification_suppressions(stack)
        self._hold_s3_to_this_bucket(stack, data_bucket)
        if bulk:
            self.bulk = BulkCount(self, "Bulk", settings=settings, data_bucket=data_bucket, data_key=data_key,
                                  table=self.table, endpoint_arn=endpoint_arn, endpoint_name=endpoint_name)

    def _hold_s3_to_this_bucket(self, stack: Stack, data_bucket: s3.IBucket) -> None:
        """CDK's S3 notification destination and queue grant add s3.amazonaws.com statements to the queue key
        with no condition, or aws:SourceArn only. Every S3 statement of the key gets both aws:SourceAccount and
        aws:SourceArn (this bucket), the confused-deputy conditions AWS advises for service principals."""
        key = self.queue_key.node.default_child
        document = stack.resolve(key.key_policy)  # type: ignore[union-attr]
        for statement in document["Statement"]:
            if statement.get("Principal") == {"Service": "s3.amazonaws.com"}:
                condition = statement.setdefault("Condition", {})
                condition.setdefault("StringEquals", {})["aws:SourceAccount"] = stack.resolve(stack.account)
                condition.setdefault("ArnLike", {})["aws:SourceArn"] = stack.resolve(data_bucket.bucket_arn)
        key.add_property_override("KeyPolicy", document)  # type: ignore[union-attr]

    @staticmethod
    def _bucket_notification_suppressions(stack: Stack) -> None:
        # add_event_notification uses CDK's own singleton Lambda that puts the bucket's notification
        # configuration (CloudFormation cannot, without a dependency cycle between bucket and queue policy).
        handler = next((c for c in stack.node.children
                        if c.node.id.startswith("BucketNotificationsHandler")), None)
        if handler is None:
            return
        Tags.of(handler).add("component", "count")
        # Its own policy is held to the data bucket (no IAM5 finding), so only the managed policy is suppressed.
        basic_execution = f"arn:{stack.partition}:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
        NagSuppressions.add_resource_suppressions(
            handler,
            [NagPackSuppression(
                id=IAM4,
                reason="CDK's bucket-notifications handler attaches AWSLambdaBasicExecutionRole for its own "
                "logs; the function and its role are generated by CDK, not by this project.",
                applies_to=[f"Policy::{flatten(stack.resolve(basic_execution))}"],
            )],
            apply_to_children=True,
        )


class BulkCount(Construct):
    """Counts every photo under a prefix with Batch Transform, then loads the results into the table.

    Input ``{"prefix": "incoming/2026-11/"}`` (default: the incoming prefix). The plan Lambda screens the
    objects (empty, too large, not JPEG/PNG -> rejected records at once), writes a ManifestFile of the rest
    and names the model serving the endpoint; the transform runs with ``.sync``; the loader reads the
    ``.out`` files page by page. A failed transform still loads what it produced, then fails the execution.
    """

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, data_bucket: s3.IBucket,
                 data_key: kms.IKey, table: dynamodb.ITable, endpoint_arn: str, endpoint_name: str) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.transform_role = self._transform_role(settings, data_bucket, data_key)
        environment = {
            "DATA_BUCKET": data_bucket.bucket_name,
            "COUNTS_TABLE": table.table_name,
            "ENDPOINT_NAME": endpoint_name,
            "CONFIDENCE_THRESHOLD": str(settings.count_confidence_threshold),
            "MAX_IMAGE_BYTES": str(settings.count_max_image_bytes),
            "CONSIGNMENT_ERROR_RATE": str(settings.consignment_error_rate),
            "INCOMING_PREFIX": settings.incoming_prefix,
            "BULK_PREFIX": BULK_PREFIX,
            "TRANSFORM_INSTANCE_TYPE": settings.endpoint_instance_type,
            "KMS_KEY_ID": data_key.key_arn,
            "TRANSFORM_ROLE_ARN": self.transform_role.role_arn,
            "REVIEW_STATUSES": ",".join(settings.review_statuses),
            "REVIEW_AUDIT_RATE": str(settings.review_audit_rate),
            "REVIEW_MAX_PER_DAY": str(settings.review_max_per_day),
        }
        self.plan = PythonFunction(self, "Plan", settings=settings, handler="lambdas.count.bulk.plan_handler",
                                   service="count-bulk-plan", environment=environment, timeout_seconds=300,
                                   description="Screens a prefix and writes the Batch Transform manifest")
        self.load = PythonFunction(self, "Load", settings=settings, handler="lambdas.count.bulk.load_handler",
                                   service="count-bulk-load", environment=environment, timeout_seconds=300,
                                   description="Loads Batch Transform results into the counts table")
        # Bulk counting covers uploads: any prefix under the incoming prefix, nothing else of the bucket.
        grant_read_prefix(data_bucket, data_key, self.plan.role, f"{settings.incoming_prefix}*")
        data_bucket.grant_put(self.plan.role, f"{BULK_PREFIX}*")
        # The loader reads only the job's inputs and .out files, under reports/bulk/<job>/.
        grant_read_prefix(data_bucket, data_key, self.load.role, f"{BULK_PREFIX}*", missing_is_404=True)
        data_bucket.grant_put(self.load.role, f"{BULK_PREFIX}*")
        for fn in (self.plan, self.load):
            table.grant_read_write_data(fn.role)
            data_key.grant_encrypt_decrypt(fn.role)
        self.plan.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeEndpoint", "sagemaker:DescribeEndpointConfig"],
            resources=[endpoint_arn, stack.format_arn(service="sagemaker", resource="endpoint-config",
                                                      resource_name="*")],
        ))
        # The transform job runs a model of its own, made by the planner from the model in service with the
        # transform role (a transform job has no role of its own: it uses its model's).
        models = stack.format_arn(service="sagemaker", resource="model", resource_name=f"{endpoint_name}-*")
        transform_models = stack.format_arn(service="sagemaker", resource="model",
                                            resource_name=f"{endpoint_name}-bulk-*")
        self.plan.role.add_to_principal_policy(iam.PolicyStatement(actions=["sagemaker:DescribeModel"],
                                                                   resources=[models]))
        self.plan.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateModel", "sagemaker:AddTags"], resources=[transform_models]))
        self.plan.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[self.transform_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        ))

        plan = tasks.LambdaInvoke(self, "Plan bulk count", lambda_function=self.plan.function,
                                  payload=sfn.TaskInput.from_object({"input.$": "$", "execution.$":
                                                                     "$$.Execution.Name"}),
                                  result_selector={"job.$": "$.Payload"}, result_path="$.plan")
        transform = sfn.CustomState(self, "Batch transform", state_json={
            "Type": "Task",
            "Resource": f"arn:{stack.partition}:states:::sagemaker:createTransformJob.sync",
            "Parameters": {"TransformJobName.$": "$.plan.job.TransformJobName",
                           "ModelName.$": "$.plan.job.ModelName",
                           "TransformInput.$": "$.plan.job.TransformInput",
                           "TransformOutput.$": "$.plan.job.TransformOutput",
                           "TransformResources.$": "$.plan.job.TransformResources",
                           "BatchStrategy": "SingleRecord",
                           "MaxPayloadInMB": 6,
                           "MaxConcurrentTransforms": 1},
            "ResultPath": "$.transform",
        })
        transform_failed = sfn.Pass(self, "Transform failed", parameters={"failed": True},
                                    result_path="$.transform")
        transform.add_catch(transform_failed, errors=["States.ALL"], result_path="$.transformError")
        load = tasks.LambdaInvoke(self, "Load results", lambda_function=self.load.function,
                                  payload=sfn.TaskInput.from_object({"job.$": "$.plan.job",
                                                                     "cursor.$": "$.cursor"}),
                                  result_selector={"done.$": "$.Payload.done", "next.$": "$.Payload.next",
                                                   "loaded.$": "$.Payload.loaded"},
                                  result_path="$.page")
        start_cursor = sfn.Pass(self, "Start loading", parameters={"index": 0}, result_path="$.cursor")
        next_cursor = sfn.Pass(self, "Next page", input_path="$.page.next", result_path="$.cursor")
        fail = sfn.Fail(self, "Bulk count incomplete", error="TransformFailed",
                        cause="The Batch Transform job failed; the photos it did count are loaded, see the "
                              "plan's report under reports/bulk/ for the rest")
        after_load = (sfn.Choice(self, "More results?")
                      .when(sfn.Condition.boolean_equals("$.page.done", False), next_cursor)
                      .when(sfn.Condition.is_present("$.transformError"), fail)
                      .otherwise(sfn.Succeed(self, "Bulk count done")))
        next_cursor.next(load)
        transform.next(start_cursor)
        transform_failed.next(start_cursor)
        start_cursor.next(load).next(after_load)
        self.log_group = log_group(self, settings)
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            comment=f"{settings.project}: count every photo under a prefix with SageMaker Batch Transform",
            definition_body=sfn.DefinitionBody.from_chainable(plan.next(
                sfn.Choice(self, "Anything to transform?")
                .when(sfn.Condition.number_equals("$.plan.job.Accepted", 0),
                      sfn.Succeed(self, "Only rejects", comment="Every object was rejected before the job"))
                .otherwise(transform)
            )),
            timeout=Duration.hours(12),
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
        )
        role = self.state_machine.role
        transform_jobs = stack.format_arn(service="sagemaker", resource="transform-job",
                                          resource_name=f"{endpoint_name}-bulk-*")
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateTransformJob", "sagemaker:DescribeTransformJob",
                     "sagemaker:StopTransformJob", "sagemaker:AddTags"],
            resources=[transform_jobs],
        ))
        # .sync polls the job through an EventBridge rule that Step Functions manages.
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
            resources=[stack.format_arn(service="events", resource="rule",
                                        resource_name="StepFunctionsGetEventsForSageMakerTransformJobsRule")],
        ))
        incoming = data_bucket.arn_for_objects(f"{settings.incoming_prefix}*")
        bulk = data_bucket.arn_for_objects(f"{BULK_PREFIX}*")
        indexes = f"{table.table_arn}/index/*"
        table_and_bulk = ("The loader and planner write the job's manifest, inputs and reports per job under "
                          "reports/bulk/, and the table grant covers the counts table's own indexes.")
        suppress(
            self.plan.role,
            wildcard_suppression(
                self.plan, "Bulk counting may be pointed at any prefix under the incoming prefix, so the planner "
                "reads (lists, heads, sniffs) objects anywhere below it; DescribeEndpointConfig on any config reads "
                "the one serving the endpoint, whose name the plan learns from DescribeEndpoint; DescribeModel "
                "reads the model in service (named <endpoint>-<execution>) and CreateModel makes the transform's "
                "own, named <endpoint>-bulk-<time>.",
                resources=[incoming, stack.format_arn(service="sagemaker", resource="endpoint-config",
                                                        resource_name="*"), models, transform_models],
            ),
            wildcard_suppression(self.plan, table_and_bulk, resources=[bulk, indexes]),
            wildcard_suppression(self.plan, READ_PUT_GRANT_REASON, actions=READ_PUT_GRANT_ACTIONS),
        )
        suppress(
            self.load.role,
            wildcard_suppression(self.load, table_and_bulk, resources=[bulk, indexes]),
            wildcard_suppression(self.load, READ_PUT_GRANT_REASON, actions=READ_PUT_GRANT_ACTIONS),
        )
        suppress(
            role,
            wildcard_suppression(
                self.state_machine, "Transform jobs are named <endpoint>-bulk-<time>, so the grant is that prefix.",
                resources=[transform_jobs],
            ),
            wildcard_suppression(
                self.state_machine, "LambdaInvoke grants the function ARN plus ':*' so that the plan and load "
                "tasks may call a version or alias of those two functions, and nothing else.",
                resources=[f"{fn.function.function_arn}:*" for fn in (self.plan, self.load)],
            ),
            wildcard_suppression(self.state_machine, STATE_MACHINE_REASON, resources=["*"]),
        )

    def _transform_role(self, settings: Settings, data_bucket: s3.IBucket, data_key: kms.IKey) -> iam.Role:
        """The role the transform job's model names: read the model artifact, the job's manifest and the photos
        under the incoming prefix; write .out files under reports/bulk/<job>/out/; nothing else."""
        role = execution_role(self, "TransformRole",
                              description=f"{settings.project}: Batch Transform for bulk counting (reads uploads, "
                              "writes reports/bulk/*/out/ only)")
        models = data_bucket.arn_for_objects(f"{MODEL_PREFIX}*")
        incoming = data_bucket.arn_for_objects(f"{settings.incoming_prefix}*")
        manifests = data_bucket.arn_for_objects(f"{BULK_PREFIX}*/manifest.json")
        outputs = data_bucket.arn_for_objects(f"{BULK_PREFIX}*/out/*")
        # Pre-created so that it has the logs key and a retention (SageMaker would make it without either).
        self.job_logs = log_group(self, settings, "JobLogs", name=TRANSFORM_LOG_GROUP)
        repository = f"arn:{Aws.PARTITION}:ecr:{Aws.REGION}:{DLC_ACCOUNT}:repository/pytorch-inference"
        for statement in [
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[models, incoming, manifests]),
            iam.PolicyStatement(actions=["s3:PutObject", "s3:AbortMultipartUpload"], resources=[outputs]),
            # The manifest names every object, so listing is needed at most for the incoming prefix.
            iam.PolicyStatement(actions=["s3:ListBucket"], resources=[data_bucket.bucket_arn],
                                conditions={"StringLike": {"s3:prefix": [f"{settings.incoming_prefix}*"]}}),
            iam.PolicyStatement(actions=["kms:Decrypt", "kms:GenerateDataKey"], resources=[data_key.key_arn]),
            volume_grant(data_key),
            *container_statements(repositories=[repository], log_groups=[TRANSFORM_LOG_GROUP]),
        ]:
            role.add_to_policy(statement)
        suppress(
            role,
            wildcard_suppression(
                role, "The transform job loads model.tar.gz from models/, reads the photos of the chosen prefix "
                "(always under the incoming prefix) and its job's manifest, writes .out files under its job's out/ "
                "only, and writes the streams (':*') of SageMaker's transform log group.",
                resources=[models, incoming, manifests, outputs, log_group_arn(TRANSFORM_LOG_GROUP)],
            ),
            wildcard_suppression(
                role, "ecr:GetAuthorizationToken and cloudwatch:PutMetricData (held to SageMaker's namespaces by a "
                "condition) accept no resource narrower than '*'.", resources=["*"],
            ),
        )
        return role
