"""The synthesized stack: private, encrypted, TLS-only storage, and no unsuppressed cdk-nag finding."""

from __future__ import annotations

from aws_cdk.assertions import Match

from tests.infra.conftest import nag_findings, synth_stack


def test_cdk_nag_aws_solutions_reports_no_unsuppressed_error(stack):
    assert nag_findings(stack, "error") == []


def test_cdk_nag_aws_solutions_reports_no_unsuppressed_warning(stack):
    assert nag_findings(stack, "warning") == []


def test_every_bucket_blocks_public_access_and_is_encrypted(template):
    buckets = template.find_resources("AWS::S3::Bucket")
    assert len(buckets) >= 2
    for logical_id, bucket in buckets.items():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }, logical_id
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], logical_id


def test_data_bucket_uses_the_customer_managed_key_and_keeps_versions(template):
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {
                        "BucketKeyEnabled": True,
                        "ServerSideEncryptionByDefault": {
                            "SSEAlgorithm": "aws:kms",
                            "KMSMasterKeyID": Match.any_value(),
                        },
                    }
                ]
            },
            "VersioningConfiguration": {"Status": "Enabled"},
            "LoggingConfiguration": Match.object_like({"LogFilePrefix": "data/"}),
        },
    )
    template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})


def test_every_bucket_policy_denies_requests_without_tls(template):
    buckets = template.find_resources("AWS::S3::Bucket")
    policies = template.find_resources("AWS::S3::BucketPolicy")
    protected = set()
    for policy in policies.values():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            if (
                statement["Effect"] == "Deny"
                and statement.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
            ):
                protected.add(policy["Properties"]["Bucket"]["Ref"])
    assert protected == set(buckets)


def test_production_stage_retains_data_and_dev_cleans_up():
    def deletion_policies(stage: str) -> set[str]:
        from aws_cdk.assertions import Template

        buckets = Template.from_stack(synth_stack({"stage": stage})).find_resources("AWS::S3::Bucket")
        return {bucket.get("DeletionPolicy", "Delete") for bucket in buckets.values()}

    assert deletion_policies("prod") == {"Retain"}
    assert deletion_policies("dev") == {"Delete"}
