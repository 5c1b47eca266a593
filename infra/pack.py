"""The pack stage: each split of the ingested run written as tar shards, the channels training reads.

    PlanShards (Lambda)     $.ingest -> reports/pack/plans/<run>.json (one item per shard: split, index, ids in
                            id order, packPhotosPerShard each); the plan at $.pack
    PackShards (Distributed Map over the plan's JSON array, at most packMaxConcurrency shards at once; child
                results exported to reports/pack/map-results/)
        PackShard (Lambda)  GetObject photos + metadata from raw/, PutObject shards/<run>/<split>/<split>-NNNNNN.tar
                            unless it already holds the same bytes; every photo left out comes back with its reason
    FinishPack (Lambda)     map results -> reports/pack/<run>.json; $.pack = {runId, channels, shards, photos,
                            reportKey}; fails the stage above ingestToleratedFailurePercent of failed photos

The Map tolerates any number of failed shards: the finish step counts each photo of a failed shard as failed
and applies the one tolerance of the pipeline, per photo. A Map that fails as a whole (its reader or writer)
is caught and still goes to the finish step, which reports every planned photo with the Map's error and fails.

As in infra/ingest.py, the states register every grant the hosting state machine needs, and
:meth:`Pack.add_nag_evidence` suppresses exactly the wildcards they grant.
"""

from __future__ import annotations

from aws_cdk import Duration, FeatureFlags
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.config import Settings
from infra.function import PythonFunction
from infra.maps import RESULT_WRITER_V2_FLAG, JsonReader, ResultWriter
from infra.nag import distributed_map_children, suppress, wildcard_suppression
from infra.pipeline import StageFragment
from infra.storage import MANIFEST_PREFIX, RAW_PREFIX, SHARD_PREFIX
from lambdas.pack.layout import MAP_RESULTS_PREFIX, PLAN_PREFIX, REPORT_PREFIX

# Photos fetched at once inside one packer; with packMaxConcurrency packers, the stage holds at most that many
# times this GETs against raw/. Lambda allows 1,024 threads per execution environment (Lambda developer guide,
# "Lambda quotas"); the shared S3 client pools 64 connections (lambdas/ingest/aws.py).
PACK_THREADS = 32
# One shard of 1,000 photos takes seconds; the timeout leaves room for S3's slow moments and the SDK's retries,
# well inside Lambda's 15 minutes.
PACKER_TIMEOUT_SECONDS = 5 * 60


class PackStage(StageFragment):
    """Plan -> pack (Distributed Map, one shard per child) -> finish, leaving the stage contract at ``$.pack``."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, data_bucket: s3.IBucket,
                 data_key: kms.IKey, plan_function, packer_function, finish_function) -> None:
        super().__init__(scope, construct_id)
        plan = tasks.LambdaInvoke(
            self, "PlanShards",
            comment="Cuts each split of $.ingest into shards of packPhotosPerShard photos; writes the plan",
            lambda_function=plan_function,
            input_path="$.ingest",
            payload_response_only=True,
            result_path="$.pack",
        )
        pack_shard = tasks.LambdaInvoke(
            self, "PackShard",
            comment="Packs one shard; a photo that cannot be read comes back as a failure, not an error",
            lambda_function=packer_function,
            payload_response_only=True,
        )
        # Only what a retry can cure: the packer is idempotent, so a retried shard rewrites nothing it wrote.
        pack_shard.add_retry(
            errors=["TransientPackError", "Lambda.TooManyRequestsException", "Sandbox.Timedout", "States.Timeout"],
            interval=Duration.seconds(5), max_attempts=4, backoff_rate=2.0, jitter_strategy=sfn.JitterType.FULL,
        )
        if not FeatureFlags.of(self).is_enabled(RESULT_WRITER_V2_FLAG):
            raise ValueError(f"the pack stage needs the CDK context flag {RESULT_WRITER_V2_FLAG}=true (cdk.json "
                             "sets it; build test apps with infra.config.default_context())")
        pack = sfn.DistributedMap(
            self, "PackShards",
            comment="One child execution per shard of the plan",
            item_reader=JsonReader(key_arn=data_key.key_arn, granted_prefix=PLAN_PREFIX, bucket=data_bucket,
                                    key=sfn.JsonPath.string_at("$.pack.planKey")),
            max_concurrency=settings.pack_max_concurrency,
            # Every shard runs whatever others do; the finish step applies the tolerance per photo.
            tolerated_failure_percentage=100,
            # Standard children: a shard with its retries can outlast the 5 minutes an express child gets.
            map_execution_type=sfn.StateMachineType.STANDARD,
            result_writer_v2=ResultWriter(key_arn=data_key.key_arn, bucket=data_bucket, prefix=MAP_RESULTS_PREFIX),
            result_path="$.pack.packed",
        )
        pack.item_processor(pack_shard)
        finish = tasks.LambdaInvoke(
            self, "FinishPack",
            comment="Reads the map results, writes the pack report, sets $.pack with the shard channels",
            lambda_function=finish_function,
            # InputPath, not a payload path: with payloadResponseOnly CDK would render "Parameters" as a bare
            # string, which is not valid ASL.
            input_path="$.pack",
            payload_response_only=True,
            result_path="$.pack",
        )
        pack.add_catch(finish, errors=["States.ALL"], result_path="$.pack.packError")
        plan.next(pack).next(finish)
        self._bound(plan, [finish])
        self.plan_state, self.pack_state, self.finish_state = plan, pack, finish


class Pack(Construct):
    """The three pack functions, their least-privilege grants, and the stage for the pipeline."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, data_bucket: s3.IBucket,
                 data_key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.data_bucket = data_bucket
        environment = {
            "DATA_BUCKET": data_bucket.bucket_name,
            "PACK_PHOTOS_PER_SHARD": str(settings.pack_photos_per_shard),
            "PACK_THREADS": str(PACK_THREADS),
            "INGEST_TOLERATED_FAILURE_PERCENT": str(settings.ingest_tolerated_failure_percent),
            "SHARD_RETENTION_DAYS": str(settings.shard_retention_days),
        }
        self.plan = PythonFunction(
            self, "Plan", settings=settings, handler="lambdas.pack.plan.handler", service="pack-plan",
            description=f"{settings.project} pack: cuts each split into shards and writes the plan",
            environment=environment,
            # Reads every record of a whole-dataset run (~500k, three .jsonl files) and writes one plan.
            timeout_seconds=5 * 60, memory_size=2048,
        )
        self.packer = PythonFunction(
            self, "Packer", settings=settings, handler="lambdas.pack.packer.handler", service="pack-shard",
            description=f"{settings.project} pack: packs one shard of photos from raw/ into shards/",
            environment=environment,
            timeout_seconds=PACKER_TIMEOUT_SECONDS, memory_size=settings.packer_memory_mb,
        )
        self.finish = PythonFunction(
            self, "Finish", settings=settings, handler="lambdas.pack.finish.handler", service="pack-finish",
            description=f"{settings.project} pack: writes the pack report and the training channels",
            environment=environment,
            # Reads every shard's result and the plan of a whole-dataset run.
            timeout_seconds=5 * 60, memory_size=2048,
        )

        def objects(*prefixes: str) -> list[str]:
            return [data_bucket.arn_for_objects(f"{prefix}*") for prefix in prefixes]

        # plan: read the run's split records, write the plan.
        self.plan.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject"], resources=objects(MANIFEST_PREFIX)))
        self.plan.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:PutObject"], resources=objects(PLAN_PREFIX)))
        # packer: read raw/, read (HeadObject) and write shards/. ListBucket on the bucket, because S3 answers a
        # missing key with 404 only to a caller that holds it, otherwise with 403 (S3 API reference, GetObject,
        # "Permissions"): without it a missing photo would read as access denied, and a shard not yet written
        # as an error to retry.
        self.packer.role.add_to_principal_policy(iam.PolicyStatement(
            sid="ListBucketSoAMissingObjectIs404", actions=["s3:ListBucket"], resources=[data_bucket.bucket_arn]))
        self.packer.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject"], resources=objects(RAW_PREFIX, SHARD_PREFIX)))
        # DeleteObject: a planned shard with no readable photo is removed, so a plan's prefix holds only the
        # shards its run reports (lambdas/pack/packer.py).
        self.packer.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:PutObject", "s3:DeleteObject"], resources=objects(SHARD_PREFIX)))
        # finish: read the plan and the map results, write the report (all under reports/pack/).
        self.finish.role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject", "s3:PutObject"], resources=objects(REPORT_PREFIX)))
        for function in (self.plan, self.packer, self.finish):
            data_key.grant_encrypt_decrypt(function.role)
        kms_reason = ("kms:GenerateDataKey*/ReEncrypt* come from CDK's encrypt/decrypt grant and are allowed on "
                      "the one data key only (reads and uploads in the KMS-encrypted bucket).")
        for function, resources, why in (
            (self.plan, objects(MANIFEST_PREFIX, PLAN_PREFIX),
             "The plan step reads the run's split records under manifests/ and writes the run's plan under "
             "reports/pack/plans/ (keys named per run, so the grant is the prefix)."),
            (self.packer, objects(RAW_PREFIX, SHARD_PREFIX),
             "The packer reads the run's photos and metadata under raw/ (keys come from the dataset) and writes "
             "shards under shards/ (keys named per plan digest, split and index)."),
            (self.finish, objects(REPORT_PREFIX),
             "The finish step reads the plan and the Distributed Map results and writes the report, all per run "
             "under reports/pack/."),
        ):
            suppress(
                function.role,
                wildcard_suppression(function, why, resources=resources),
                wildcard_suppression(function, kms_reason, actions=["kms:GenerateDataKey*", "kms:ReEncrypt*"]),
            )

        self.stage = PackStage(self, "Stage", settings=settings, data_bucket=data_bucket, data_key=data_key,
                               plan_function=self.plan.function, packer_function=self.packer.function,
                               finish_function=self.finish.function)

    @property
    def functions(self) -> list:
        return [self.plan.function, self.packer.function, self.finish.function]

    def add_nag_evidence(self, state_machine: sfn.StateMachine) -> None:
        """cdk-nag suppressions, each limited to the wildcards this stage grants the hosting state machine."""
        suppress(
            state_machine,
            wildcard_suppression(
                state_machine,
                "The pack stage's Distributed Map reads the run's plan under reports/pack/plans/ and writes child "
                "results under reports/pack/map-results/ (objects named per run, so the grant is the prefix).",
                resources=[self.data_bucket.arn_for_objects(f"{PLAN_PREFIX}*"),
                           self.data_bucket.arn_for_objects(f"{MAP_RESULTS_PREFIX}/*")],
            ),
            wildcard_suppression(
                state_machine,
                "LambdaInvoke grants the function ARN plus ':*' so that the plan, pack and finish tasks may call a "
                "version or alias of those three functions, and nothing else.",
                resources=[f"{function.function_arn}:*" for function in self.functions],
            ),
            distributed_map_children(state_machine),
        )
