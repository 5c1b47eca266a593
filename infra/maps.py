"""Distributed Map item readers and result writers whose grants stop at one prefix of the data bucket.

CDK's own reader grants GetObject on the whole bucket when the object's key comes from the state, and neither
CDK's reader nor its writer grants the KMS key the data bucket is encrypted with. These grant the state machine
one prefix and the data key (Decrypt to read; GenerateDataKey too to write, since multipart uploads of large
result files need both).
"""

from __future__ import annotations

from typing import Any

from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_stepfunctions as sfn

# ResultWriterV2 (the writer with a prefix of our choosing) is behind this CDK feature flag; cdk.json sets it.
RESULT_WRITER_V2_FLAG = "@aws-cdk/aws-stepfunctions:useDistributedMapResultWriterV2"


def _read_grants(bucket: s3.IBucket, prefix: str, key_arn: str) -> list[iam.PolicyStatement]:
    return [
        iam.PolicyStatement(actions=["s3:GetObject"], resources=[bucket.arn_for_objects(f"{prefix}*")]),
        iam.PolicyStatement(actions=["kms:Decrypt"], resources=[key_arn]),
    ]


class CsvReader(sfn.S3CsvItemReader):
    """Reads a CSV under ``granted_prefix``."""

    def __init__(self, *, key_arn: str, granted_prefix: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key_arn, self._granted_prefix = key_arn, granted_prefix

    def provide_policy_statements(self) -> list[iam.PolicyStatement]:
        return _read_grants(self.bucket, self._granted_prefix, self._key_arn)


class JsonReader(sfn.S3JsonItemReader):
    """Reads a JSON array under ``granted_prefix``."""

    def __init__(self, *, key_arn: str, granted_prefix: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key_arn, self._granted_prefix = key_arn, granted_prefix

    def provide_policy_statements(self) -> list[iam.PolicyStatement]:
        return _read_grants(self.bucket, self._granted_prefix, self._key_arn)


class ResultWriter(sfn.ResultWriterV2):
    """Exports the child executions' results under the writer's own ``prefix`` and nowhere else."""

    def __init__(self, *, key_arn: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key_arn = key_arn

    def provide_policy_statements(self) -> list[iam.PolicyStatement]:
        return [
            iam.PolicyStatement(
                actions=["s3:PutObject", "s3:GetObject", "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload"],
                resources=[self.bucket.arn_for_objects(f"{self.prefix}/*")],
            ),
            iam.PolicyStatement(actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=[self._key_arn]),
        ]
