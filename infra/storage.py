"""Buckets: the data bucket (dataset, manifests, models, checkpoints, reports, incoming photos) and its
access-log bucket. Private, KMS-encrypted, TLS only, versioned."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from cdk_nag import NagSuppressions
from constructs import Construct

from infra.config import Settings

# Every prefix of the data bucket has one owner; grants are written against these, never the whole bucket.
RAW_PREFIX = "raw/"
MANIFEST_PREFIX = "manifests/"
MODEL_PREFIX = "models/"
CHECKPOINT_PREFIX = "checkpoints/"
REPORT_PREFIX = "reports/"


class Storage(Construct):
    """The data bucket, its customer-managed key, and the bucket that receives its access logs."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id)
        removal = RemovalPolicy.RETAIN if settings.is_production else RemovalPolicy.DESTROY

        self.key = kms.Key(
            self,
            "DataKey",
            description=f"{settings.project}: encrypts the data bucket, training volumes and the counts table",
            enable_key_rotation=True,
            removal_policy=removal,
        )
        # Access logs cannot go to a KMS-encrypted bucket (the log delivery service cannot use the key),
        # so this bucket uses S3-managed keys.
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(365))],
            removal_policy=removal,
        )
        NagSuppressions.add_resource_suppressions(
            self.access_logs,
            [
                {
                    "id": "AwsSolutions-S1",
                    "reason": "This is the access-log destination itself; logging it into itself would loop.",
                }
            ],
        )
        self.data = s3.Bucket(
            self,
            "Data",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="data/",
            # Old versions of a re-uploaded photo or a retrained model are kept for a while, then dropped.
            lifecycle_rules=[
                s3.LifecycleRule(noncurrent_version_expiration=Duration.days(90)),
                s3.LifecycleRule(abort_incomplete_multipart_upload_after=Duration.days(7)),
            ],
            removal_policy=removal,
        )
