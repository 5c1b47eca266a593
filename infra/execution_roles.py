"""SageMaker execution roles, one per workload (training, inference, batch transform), and the grants every
SageMaker container needs. Each workload's construct builds its own role with these helpers and adds only what
that workload reads or writes: the container that decodes strangers' photos holds no write on models/.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

# AWS Deep Learning Containers' registry in the commercial regions (the PyTorch training and inference images).
DLC_ACCOUNT = "763104351884"
# The namespaces SageMaker containers and the SageMaker agent publish metrics under.
SAGEMAKER_METRIC_NAMESPACES = ["/aws/sagemaker/*", "aws/sagemaker/*"]


def sagemaker_principal() -> iam.ServicePrincipal:
    """sagemaker.amazonaws.com, only on behalf of this account's SageMaker resources in this region.

    AWS's confused-deputy guidance for SageMaker: put aws:SourceAccount and aws:SourceArn on the role's trust
    policy, with '*' for the parts of the ARN not known in advance (here the resource type and name: SageMaker
    assumes the role for jobs, models and endpoints whose names are made per execution)
    (docs.aws.amazon.com/sagemaker/latest/dg/security-confused-deputy-prevention.html).
    """
    return iam.ServicePrincipal("sagemaker.amazonaws.com", conditions={
        "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
        "ArnLike": {"aws:SourceArn": f"arn:{Aws.PARTITION}:sagemaker:{Aws.REGION}:{Aws.ACCOUNT_ID}:*"},
    })


def execution_role(scope: Construct, construct_id: str, *, description: str) -> iam.Role:
    return iam.Role(scope, construct_id, assumed_by=sagemaker_principal(), description=description)


def log_group_arn(group: str) -> str:
    """The streams (':*') of one of SageMaker's own log groups, e.g. ``/aws/sagemaker/TrainingJobs``."""
    return f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:{group}:*"


def container_statements(*, repositories: Sequence[str], log_groups: Sequence[str]) -> list[iam.PolicyStatement]:
    """What any SageMaker container needs: pull its images, write its own log streams (the groups are
    pre-created with a key and retention by infra/function.py, so no CreateLogGroup), and publish metrics
    under SageMaker's namespaces only."""
    return [
        iam.PolicyStatement(
            actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            resources=list(repositories),
        ),
        iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]),
        iam.PolicyStatement(
            actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=[log_group_arn(group) for group in log_groups],
        ),
        iam.PolicyStatement(
            actions=["cloudwatch:PutMetricData"], resources=["*"],
            conditions={"StringLike": {"cloudwatch:namespace": SAGEMAKER_METRIC_NAMESPACES}},
        ),
    ]


def volume_grant(key: kms.IKey) -> iam.PolicyStatement:
    """Encrypting an instance volume with ``key`` makes SageMaker create a grant for the instance; the grant
    may be created only for an AWS resource, never handed to a principal."""
    return iam.PolicyStatement(
        actions=["kms:CreateGrant"], resources=[key.key_arn],
        conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}},
    )
