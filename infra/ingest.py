"""The ingest stage: select an ABID subset, copy it server-side into raw/, split it into training channels.

    SelectDataset (Lambda)  $.input.dataset -> manifests/<run>/selection.csv, plan at $.ingest
    CopyImages (Distributed Map over the selection CSV, batches of ingestBatchSize, at most
                ingestMaxConcurrency batches at once, ingestToleratedFailurePercent of batches may fail;
                child results exported to reports/ingest/map-results/)
        CopyBatch (Lambda)   CopyObject image + metadata into raw/, one record or failure per image
    SplitDataset (Lambda)   map results -> records.jsonl, train/validation/test ManifestFile channels, the
                            report reports/ingest/<run>.json; $.ingest = the stage contract

The states register every grant the hosting state machine needs (Lambda invoke, child executions, GetObject
on manifests/, result files under reports/ingest/map-results/, the data key's Decrypt/GenerateDataKey), so
hosting the stage needs no extra call; :meth:`Ingest.add_nag_evidence` adds cdk-nag suppressions scoped to
exactly those findings, for a host that suppresses nothing broadly itself.

A map failure (more batches failed than tolerated) is caught and still goes to the split step, which
writes the report with every selected image and the map's error, then fails the stage.
"""

from __future__ import annotations

from aws_cdk import Aws, Duration, FeatureFlags
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.config import Settings
from infra.function import PythonFunction
from infra.maps import RESULT_WRITER_V2_FLAG, CsvReader, ResultWriter
from infra.nag import distributed_map_children, suppress, wildcard_suppression
from infra.pipeline import StageFragment
from infra.storage import MANIFEST_PREFIX, RAW_PREFIX, REPORT_PREFIX
from lambdas.ingest.worker import ITEM_FROM_PLAN

INGEST_REPORT_PREFIX = f"{REPORT_PREFIX}ingest/"
MAP_RESULTS_PREFIX = f"{INGEST_REPORT_PREFIX}map-results"
# Copy workers run this many S3 requests at once inside one batch; with MaxConcurrency batches in flight,
# the stage holds at most ingestMaxConcurrency x this many requests against S3.
WORKER_THREADS = 16


def _source_arn(bucket: str, path: str = "") -> str:
    return f"arn:{Aws.PARTITION}:s3:::{bucket}{path}"


class IngestStage(StageFragment):
    """Select -> copy (Distributed Map) -> split, leaving the stage contract at ``$.ingest``."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        data_bucket: s3.IBucket,
        data_key: kms.IKey,
        select_function,
        worker_function,
        split_function,
    ) -> None:
        super().__init__(scope, construct_id)
        select = tasks.LambdaInvoke(
            self,
            "SelectDataset",
            comment="Validates $.input.dataset and writes the selection; a bad request fails here, unretried",
            lambda_function=select_function,
            payload=sfn.TaskInput.from_object(
                {"input": sfn.JsonPath.object_at("$.input"), "execution": sfn.JsonPath.string_at("$.execution")}
            ),
            payload_response_only=True,
            result_path="$.ingest",
        )

        copy_batch = tasks.LambdaInvoke(
            self,
            "CopyBatch",
            comment="Copies one batch server-side; per-image problems come back as failures, not errors",
            lambda_function=worker_function,
            payload_response_only=True,
        )
        # Only what a retry can cure: the worker is idempotent, so a retried batch skips what it copied.
        copy_batch.add_retry(
            errors=["TransientCopyError", "Lambda.TooManyRequestsException", "Sandbox.Timedout", "States.Timeout"],
            interval=Duration.seconds(5),
            max_attempts=4,
            backoff_rate=2.0,
            jitter_strategy=sfn.JitterType.FULL,
        )

        if not FeatureFlags.of(self).is_enabled(RESULT_WRITER_V2_FLAG):
            # Without the flag CDK silently drops ResultWriterV2, and the split step would find no results.
            raise ValueError(
                f"the ingest stage needs the CDK context flag {RESULT_WRITER_V2_FLAG}"
                "=true (cdk.json sets it; build test apps with infra.config.default_context())"
            )
        copy = sfn.DistributedMap(
            self,
            "CopyImages",
            comment="One child execution per batch of images from the selection CSV",
            item_reader=CsvReader(
                key_arn=data_key.key_arn,
                granted_prefix=MANIFEST_PREFIX,
                bucket=data_bucket,
                key=sfn.JsonPath.string_at("$.ingest.selectionKey"),
                csv_headers=sfn.CsvHeaders.use_first_row(),
            ),
            item_selector={
                "image_id": sfn.JsonPath.string_at("$$.Map.Item.Value.image_id"),
                **{field: sfn.JsonPath.string_at(f"$.ingest.{key}") for field, key in ITEM_FROM_PLAN.items()},
            },
            item_batcher=sfn.ItemBatcher(max_items_per_batch=settings.ingest_batch_size),
            max_concurrency=settings.ingest_max_concurrency,
            tolerated_failure_percentage=settings.ingest_tolerated_failure_percent,
            # Standard children: a batch with its retries can outlast the 5 minutes an express child gets.
            map_execution_type=sfn.StateMachineType.STANDARD,
            result_writer_v2=ResultWriter(key_arn=data_key.key_arn, bucket=data_bucket, prefix=MAP_RESULTS_PREFIX),
            result_path="$.ingest.copy",
        )
        copy.item_processor(copy_batch)

        split = tasks.LambdaInvoke(
            self,
            "SplitDataset",
            comment="Reads the map results, writes records, channels and report; sets $.ingest",
            lambda_function=split_function,
            # InputPath, not a payload path: with payloadResponseOnly CDK would render "Parameters" as a bare
            # string, which is not valid ASL.
            input_path="$.ingest",
            payload_response_only=True,
            result_path="$.ingest",
        )

        # If the map itself fails (more batches failed than tolerated, or a reader/writer error), the split
        # still runs to write the report, marking every selected image with the map's error, then fails.
        copy.add_catch(split, errors=["States.ALL"], result_path="$.ingest.copyError")
        select.next(copy).next(split)
        self._bound(select, [split])
        self.select_state, self.copy_state, self.split_state = select, copy, split


class Ingest(Construct):
    """The three ingest functions, their least-privilege grants, and the stage for the pipeline."""

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
        self.data_bucket = data_bucket
        self.data_key = data_key
        source = settings.source_bucket
        environment = {
            "DATA_BUCKET": data_bucket.bucket_name,
            "SOURCE_BUCKET": source,
            "DATASET_SELECTOR": settings.dataset_selector,
            "SPLIT_VALIDATION_FRACTION": str(settings.split_validation_fraction),
            "SPLIT_TEST_FRACTION": str(settings.split_test_fraction),
            "INGEST_TOLERATED_FAILURE_PERCENT": str(settings.ingest_tolerated_failure_percent),
            "INGEST_WORKER_THREADS": str(WORKER_THREADS),
        }
        # The dataset defaults the execution-input check resolves a request against (infra/execution_input.py).
        self.environment = environment
        self.select = PythonFunction(
            self,
            "Select",
            settings=settings,
            handler="lambdas.ingest.select.handler",
            service="ingest-select",
            description=f"{settings.project} ingest: validates the dataset request and writes the selection",
            environment=environment,
            # count-range pages through ~536k metadata keys of the source bucket (about 540 list calls).
            timeout_seconds=15 * 60,
            memory_size=1024,
        )
        self.worker = PythonFunction(
            self,
            "Worker",
            settings=settings,
            handler="lambdas.ingest.worker.handler",
            service="ingest-copy",
            description=f"{settings.project} ingest: copies one batch of ABID images server-side into raw/",
            environment=environment,
            timeout_seconds=3 * 60,
            memory_size=512,
        )
        self.split = PythonFunction(
            self,
            "Split",
            settings=settings,
            handler="lambdas.ingest.split.handler",
            service="ingest-split",
            description=f"{settings.project} ingest: writes records, training channels and the ingest report",
            environment=environment,
            # Holds every record of a whole-dataset run (~500k) and its three manifests in memory.
            timeout_seconds=15 * 60,
            memory_size=3072,
        )

        def objects(*prefixes: str) -> list[str]:
            return [data_bucket.arn_for_objects(f"{prefix}*") for prefix in prefixes]

        # select: list the source's metadata (count-range), read user lists, write the selection.
        self.select.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:ListBucket"],
            resources=[_source_arn(source)],
            conditions={"StringLike": {"s3:prefix": ["metadata/*"]}},
        ))
        self.select.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject", "s3:PutObject"], resources=objects(MANIFEST_PREFIX)
        ))
        # worker: read the source (ListBucket so that a missing object answers 404, not 403), write raw/.
        self.worker.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:ListBucket"], resources=[_source_arn(source)]
        ))
        self.worker.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject"],
            resources=[_source_arn(source, "/bin-images/*"), _source_arn(source, "/metadata/*")],
        ))
        self.worker.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject", "s3:PutObject"], resources=objects(RAW_PREFIX)
        ))
        # split: read the selection and the map results, write manifests and the report.
        self.split.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject"], resources=objects(MANIFEST_PREFIX, INGEST_REPORT_PREFIX)
        ))
        self.split.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:PutObject"], resources=objects(MANIFEST_PREFIX, INGEST_REPORT_PREFIX)
        ))
        # Objects in the data bucket are encrypted with its key by the bucket default; copies and uploads need
        # to generate data keys, reads need to decrypt.
        for function in (self.select, self.worker, self.split):
            data_key.grant_encrypt_decrypt(function.role)
        kms_reason = ("kms:GenerateDataKey*/ReEncrypt* come from CDK's encrypt/decrypt grant and are allowed on "
                      "the one data key only (uploads and server-side copies into the KMS-encrypted bucket).")
        source_objects = [_source_arn(source, "/bin-images/*"), _source_arn(source, "/metadata/*")]
        for function, resources, why in (
            (self.select, objects(MANIFEST_PREFIX),
             "The selection step reads user lists and writes the run's selection CSV, all under manifests/ "
             "(one object per run, so the grant is the prefix)."),
            (self.worker, [*objects(RAW_PREFIX), *source_objects],
             f"The copy worker writes ABID images and metadata under raw/ (keys come from the dataset) and reads "
             f"only the bin-images/ and metadata/ prefixes of the public {source} bucket."),
            (self.split, objects(MANIFEST_PREFIX, INGEST_REPORT_PREFIX),
             "The split step reads the selection and the Distributed Map results and writes records, channels "
             "and the report, all per run under manifests/ and reports/ingest/."),
        ):
            suppress(
                function.role,
                wildcard_suppression(function, why, resources=resources),
                wildcard_suppression(function, kms_reason, actions=["kms:GenerateDataKey*", "kms:ReEncrypt*"]),
            )

        self.stage = IngestStage(
            self,
            "Stage",
            settings=settings,
            data_bucket=data_bucket,
            data_key=data_key,
            select_function=self.select.function,
            worker_function=self.worker.function,
            split_function=self.split.function,
        )

    def add_nag_evidence(self, state_machine: sfn.StateMachine) -> None:
        """cdk-nag suppressions, each limited to the wildcards this stage grants the hosting state machine
        (its role and the DistributedMapPolicy that CDK adds). Grants need no call."""
        functions = (self.select.function, self.worker.function, self.split.function)
        suppress(
            state_machine,
            wildcard_suppression(
                state_machine,
                "The ingest stage's Distributed Map reads the run's selection under manifests/ and writes child "
                "results under reports/ingest/map-results/ (objects named per run, so the grant is the prefix).",
                resources=[self.data_bucket.arn_for_objects(f"{MANIFEST_PREFIX}*"),
                           self.data_bucket.arn_for_objects(f"{MAP_RESULTS_PREFIX}/*")],
            ),
            wildcard_suppression(
                state_machine,
                "LambdaInvoke grants the function ARN plus ':*' so that the select, copy and split tasks may "
                "call a version or alias of those three functions, and nothing else.",
                resources=[f"{function.function_arn}:*" for function in functions],
            ),
            distributed_map_children(state_machine),
        )
