"""The optional SageMaker Studio domain: off by default; with -c studioDomain=true a domain, one user profile
whose role reads data and reports, starts the pipeline, reads counts and may assume the cost-analysis role, and
nothing wider; cdk-nag and cfn-lint clean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aws_cdk.assertions import Template

from infra.studio import READABLE_PREFIXES, STUDIO_APP_ACTIONS, STUDIO_INSTANCE_TYPES
from tests.infra.conftest import nag_findings, synth_stack
from tests.infra.test_costs import role_actions, trusted_services
from tests.infra.test_synth import CDK, _cdk_synth

# Everything the user role may do besides running Studio's own apps (STUDIO_APP_ACTIONS) and writing their logs.
USER_ACTIONS = {
    "s3:GetObject", "s3:ListBucket", "kms:Decrypt", "kms:DescribeKey", "sts:AssumeRole",
    "states:ListExecutions", "states:DescribeExecution", "states:GetExecutionHistory",
    "dynamodb:BatchGetItem", "dynamodb:GetRecords", "dynamodb:GetShardIterator", "dynamodb:Query",
    "dynamodb:GetItem", "dynamodb:Scan", "dynamodb:ConditionCheckItem", "dynamodb:DescribeTable",
    "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams",
}


@pytest.fixture(scope="module")
def studio_stack():
    return synth_stack({"studioDomain": True})


@pytest.fixture(scope="module")
def studio(studio_stack) -> Template:
    return Template.from_stack(studio_stack)


def user_role_id(studio: Template) -> str:
    (profile,) = studio.find_resources("AWS::SageMaker::UserProfile").values()
    return profile["Properties"]["UserSettings"]["ExecutionRole"]["Fn::GetAtt"][0]


def statements_of(template: Template, role: str) -> list[dict]:
    return [statement for policy in template.find_resources("AWS::IAM::Policy").values()
            if {"Ref": role} in policy["Properties"]["Roles"]
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]]


def test_no_domain_by_default(template):
    assert template.find_resources("AWS::SageMaker::Domain") == {}
    assert template.find_resources("AWS::SageMaker::UserProfile") == {}
    assert template.find_resources("AWS::EC2::VPC") == {}


def test_the_domain_uses_iam_auth_public_access_by_default_a_vpc_and_its_own_kms_key(studio):
    (domain,) = studio.find_resources("AWS::SageMaker::Domain").values()
    properties = domain["Properties"]
    assert properties["AuthMode"] == "IAM"
    assert properties["AppNetworkAccessType"] == "PublicInternetOnly"
    assert properties["KmsKeyId"]["Fn::GetAtt"][1] == "Arn"
    (key_id,) = [k for k in studio.find_resources("AWS::KMS::Key") if k == properties["KmsKeyId"]["Fn::GetAtt"][0]]
    assert studio.find_resources("AWS::KMS::Key")[key_id]["Properties"]["EnableKeyRotation"] is True
    (vpc_id,) = studio.find_resources("AWS::EC2::VPC")
    assert properties["VpcId"] == {"Ref": vpc_id} and len(properties["SubnetIds"]) == 2
    # No NAT gateway, no internet gateway: the subnets only host the home directories' mount targets.
    assert studio.find_resources("AWS::EC2::NatGateway") == {}
    assert studio.find_resources("AWS::EC2::InternetGateway") == {}
    (profile,) = studio.find_resources("AWS::SageMaker::UserProfile").values()
    assert profile["Properties"]["DomainId"] == {"Fn::GetAtt": [next(iter(studio.find_resources(
        "AWS::SageMaker::Domain"))), "DomainId"]}


def test_vpc_only_access_adds_the_endpoints_the_notebooks_need():
    template = Template.from_stack(synth_stack({"studioDomain": True, "studioNetworkAccess": "VpcOnly"}))
    (domain,) = template.find_resources("AWS::SageMaker::Domain").values()
    assert domain["Properties"]["AppNetworkAccessType"] == "VpcOnly"
    endpoints = json.dumps(template.find_resources("AWS::EC2::VPCEndpoint"))
    for service in ("sagemaker.api", "sagemaker.runtime", "sts", "states", "logs", ".s3", ".dynamodb"):
        assert service in endpoints, service


def test_the_user_role_reads_data_follows_the_pipeline_reads_counts_and_nothing_wider(studio):
    role = user_role_id(studio)
    assert trusted_services(studio.find_resources("AWS::IAM::Role")[role]) == {"sagemaker.amazonaws.com"}
    actions = role_actions(studio)[role]
    assert actions - set(STUDIO_APP_ACTIONS) - {"sagemaker:CreateApp"} == USER_ACTIONS
    statements = statements_of(studio, role)
    (reads,) = [s for s in statements if s.get("Sid") == "ReadDataAndReports"]
    assert sorted(part["Fn::Join"][1][-1] for part in reads["Resource"]) == sorted(
        f"/{prefix}*" for prefix in READABLE_PREFIXES)
    # Starting the pipeline trains and deploys: the user may not unless the stack grants it (#23 item 3).
    assert "states:StartExecution" not in actions
    (assume,) = [s for s in statements if s["Action"] == "sts:AssumeRole"]
    analysis = assume["Resource"]["Fn::GetAtt"][0]
    assert role_actions(studio)[analysis] == {"ce:GetCostAndUsage"}
    trust = json.dumps(studio.find_resources("AWS::IAM::Role")[analysis]["Properties"]["AssumeRolePolicyDocument"])
    assert role in trust
    # Studio's own actions are held to this one domain.
    (apps,) = [s for s in statements if s.get("Sid") == "RunStudioAppsInThisDomain"]
    assert all("DomainId" in json.dumps(resource) for resource in apps["Resource"])
    # CreateApp only on the small instance types (and Studio's own "system" apps), in this domain.
    (create,) = [s for s in statements if "sagemaker:CreateApp" in s["Action"]]
    assert create["Condition"] == {"ForAllValues:StringLike": {"sagemaker:InstanceTypes": STUDIO_INSTANCE_TYPES}}
    assert "DomainId" in json.dumps(create["Resource"])


def test_the_user_starts_the_pipeline_only_where_the_stack_grants_it():
    granted = Template.from_stack(synth_stack({"studioDomain": True, "studioCanStartPipeline": True}))
    statements = statements_of(granted, user_role_id(granted))
    (start,) = [s for s in statements if "states:StartExecution" in s["Action"]]
    assert start["Action"] == "states:StartExecution"
    (machine,) = [m for m in granted.find_resources("AWS::StepFunctions::StateMachine")
                  if {"Ref": m} == start["Resource"]]
    assert machine.startswith("PipelineStateMachine")  # the pipeline, not the bulk-count machine


def test_still_no_role_that_sagemaker_assumes_reads_costs_with_the_domain_on(studio):
    sagemaker_roles = [r for r, role in studio.find_resources("AWS::IAM::Role").items()
                       if "sagemaker.amazonaws.com" in trusted_services(role)]
    assert len(sagemaker_roles) == 4  # training, inference, batch transform, and the Studio user's
    actions = role_actions(studio)
    assert not [a for r in sagemaker_roles for a in actions[r] if a.lower().startswith("ce:")]


@pytest.mark.parametrize("access", ["PublicInternetOnly", "VpcOnly"])
def test_the_domain_adds_no_unsuppressed_nag_finding(access, studio_stack):
    stack = studio_stack if access == "PublicInternetOnly" else \
        synth_stack({"studioDomain": True, "studioNetworkAccess": access})
    assert nag_findings(stack, "error") == []
    assert nag_findings(stack, "warning") == []


def test_studio_resources_carry_the_cost_allocation_tags(studio):
    for kind in ("AWS::SageMaker::Domain", "AWS::SageMaker::UserProfile", "AWS::EC2::VPC"):
        for resource in studio.find_resources(kind).values():
            tags = {t["Key"]: t["Value"] for t in resource["Properties"]["Tags"]}
            assert tags["component"] == "studio" and tags["project"] == "invmon", kind


@pytest.mark.skipif(not CDK.exists(), reason="the CDK CLI is not installed: run `make setup`")
def test_cdk_synth_with_the_domain_passes_cfn_lint(tmp_path: Path):
    result = _cdk_synth(tmp_path, "studioDomain=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (template,) = tmp_path.glob("*.template.json")
    types = {r["Type"] for r in json.loads(template.read_text())["Resources"].values()}
    assert {"AWS::SageMaker::Domain", "AWS::SageMaker::UserProfile"} <= types
    cfn_lint = shutil.which("cfn-lint", path=str(Path(sys.executable).parent))
    lint = subprocess.run([cfn_lint, "--format", "parseable", str(template)], capture_output=True, text=True,
                          check=False)
    assert lint.returncode & 2 == 0, lint.stdout
