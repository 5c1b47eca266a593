"""Buckets: the data bucket (dataset, manifests, shards, models, checkpoints, reports, incoming photos) and its
access-log bucket. Private, KMS-encrypted, TLS only, versioned."""

from __future__ import annotations

from aws_cdk import CfnResource, Duration, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.config import Settings

# Every prefix of the data bucket has one owner; grants are written against these, never the whole bucket.
RAW_PREFIX = "raw/"
MANIFEST_PREFIX = "manifests/"
SHARD_PREFIX = "shards/"
MODEL_PREFIX = "models/"
CHECKPOINT_PREFIX = "checkpoints/"
REPORT_PREFIX = "reports/"

# s3:ListBucket without an s3:prefix condition, by statement id, with the reason it is bucket-wide. S3 answers a
# missing key with 404 (NoSuchKey) only to a caller that holds s3:ListBucket on the bucket, otherwise with 403 (S3
# API reference, GetObject, "Permissions"); an s3:prefix condition does not count there, since a GetObject request
# carries no prefix. Every other listing is held to prefixes (tests/infra/test_least_privilege.py checks).
BUCKET_WIDE_LISTING = {
    "ListBucketSoAMissingObjectIs404": (
        "The reader tells a missing object (404: a photo deleted before counting, no model in service yet, a "
        "shard or transform answer not written) from a denied one (403), which S3 allows only to a caller "
        "holding s3:ListBucket on the whole bucket."
    ),
}


def grant_read_prefix(bucket: s3.IBucket, key: kms.IKey, grantee: iam.IGrantable, pattern: str, *,
                      missing_is_404: bool = False) -> None:
    """Read (GetObject, GetObjectVersion) objects matching ``pattern`` and decrypt them. Listing is held to the
    pattern's prefix unless ``missing_is_404`` asks for the bucket-wide ListBucket that S3's 404 needs."""
    grantee.grant_principal.add_to_principal_policy(iam.PolicyStatement(
        actions=["s3:GetObject", "s3:GetObjectVersion"], resources=[bucket.arn_for_objects(pattern)]))
    if missing_is_404:
        grantee.grant_principal.add_to_principal_policy(iam.PolicyStatement(
            sid="ListBucketSoAMissingObjectIs404", actions=["s3:ListBucket"], resources=[bucket.bucket_arn]))
    else:
        grantee.grant_principal.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:ListBucket"], resources=[bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [pattern.split("*")[0] + "*"]}}))
    key.grant_decrypt(grantee)


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
            # A dev stack must go away whole on `cdk destroy`; CloudFormation cannot delete a bucket with objects.
            auto_delete_objects=not settings.is_production,
        )
        # No AwsSolutions-S1 suppression: cdk-nag already recognises a bucket that receives access logs.
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
                *run_data_expiry(settings),
            ],
            removal_policy=removal,
            auto_delete_objects=not settings.is_production,
        )
        if not settings.is_production:
            _tag_auto_delete_provider(Stack.of(self), settings)


def lease_table(scope: Construct, construct_id: str, *, key_attribute: str, ttl_attribute: str,
                data_key: kms.IKey) -> dynamodb.Table:
    """A small table of short-lived items (idempotency records, the deploy lock): one string key, encrypted with the
    data key, items deleted by DynamoDB's TTL once stale, and destroyed with the stack since nothing in it outlives
    its lease."""
    return dynamodb.Table(
        scope,
        construct_id,
        partition_key=dynamodb.Attribute(name=key_attribute, type=dynamodb.AttributeType.STRING),
        billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
        encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
        encryption_key=data_key,
        time_to_live_attribute=ttl_attribute,
        point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
            point_in_time_recovery_enabled=True
        ),
        removal_policy=RemovalPolicy.DESTROY,
    )


def run_data_expiry(settings: Settings) -> list[s3.LifecycleRule]:
    """Each run's shards and lists (shards/, manifests/) expire shardRetentionDays after they were written; a rerun
    that reuses a shard past half that age refreshes it first (lambdas/pack/packer.py). In this versioned bucket
    an expiry leaves a delete marker and makes the data a noncurrent version, which the 90-day rule then removes
    (S3 user guide, "Lifecycle configuration elements": Expiration on a versioning-enabled bucket)."""
    return [
        s3.LifecycleRule(id=f"expire-{prefix.rstrip('/')}", prefix=prefix,
                         expiration=Duration.days(settings.shard_retention_days))
        for prefix in (SHARD_PREFIX, MANIFEST_PREFIX)
    ]


def _tag_auto_delete_provider(stack: Stack, settings: Settings) -> None:
    """The dev stage's auto-delete uses CDK's singleton provider (a Lambda that empties the buckets on delete).
    Raw CloudFormation resources do not receive ``Tags.of``: its role and function get the cost-allocation
    tags here."""
    provider = stack.node.try_find_child("Custom::S3AutoDeleteObjectsCustomResourceProvider")
    if provider is None:
        return
    tags = [{"Key": "component", "Value": "storage"}, {"Key": "project", "Value": settings.project},
            {"Key": "stage", "Value": settings.stage}]
    for child in provider.node.find_all():
        if isinstance(child, CfnResource) and child.cfn_resource_type in ("AWS::IAM::Role", "AWS::Lambda::Function"):
            child.add_property_override("Tags", tags)
