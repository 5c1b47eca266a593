"""cdk-nag suppressions on the whole app: each IAM4/IAM5 suppression names the findings it covers and says why,
so a wildcard added later surfaces as an error instead of hiding under an earlier suppression."""

from __future__ import annotations

import re
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import Aspects, CfnResource, Stack
from aws_cdk import aws_iam as iam
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks

from infra.nag import IAM5, flatten, resource_finding
from infra.stack import InvmonStack
from tests.infra.conftest import nag_findings, synth_stack

GRANULAR_RULES = {"AwsSolutions-IAM4", "AwsSolutions-IAM5"}
MIN_REASON = 40


def suppressions(template: Template) -> list[tuple[str, dict[str, Any]]]:
    """Every cdk-nag suppression in the template, per resource, as the synthesized metadata holds it (the
    form cdk-nag reads back: ``applies_to`` in snake case)."""
    document = template.to_json()
    found = [("<stack>", rule) for rule in document.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])]
    for logical_id, resource in document["Resources"].items():
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", []):
            found.append((logical_id, rule))
    return found


def test_every_iam4_and_iam5_suppression_lists_the_findings_it_covers(template):
    blanket = [(where, rule["id"]) for where, rule in suppressions(template)
               if rule["id"] in GRANULAR_RULES and not rule.get("applies_to")]
    assert blanket == []


def test_suppressions_exist_where_wildcards_are_granted(template):
    # Guards the test above against passing on an app that suppresses nothing at all.
    granular = [rule for _, rule in suppressions(template) if rule["id"] in GRANULAR_RULES]
    assert len(granular) > 20
    assert {"AwsSolutions-IAM4", "AwsSolutions-IAM5"} <= {rule["id"] for rule in granular}


def test_every_suppression_gives_a_specific_reason(template):
    short = [(where, rule["id"], rule["reason"]) for where, rule in suppressions(template)
             if len(rule["reason"]) < MIN_REASON]
    assert short == []


def test_no_suppression_covers_a_bare_wildcard_action_or_an_unanchored_pattern(template):
    for where, rule in suppressions(template):
        for entry in rule.get("applies_to", []):
            if isinstance(entry, dict):
                assert entry["regex"].startswith("/^") and entry["regex"].endswith("$/"), (where, entry)
                pattern = re.compile(entry["regex"][1:-1])
                assert not pattern.match("Action::*") and not pattern.match("Action::s3:*"), (where, entry)
            else:
                assert entry not in {"Action::*", "Resource::arn:*"}, (where, entry)


def test_lambda_roles_suppress_only_x_ray_wildcard_by_default(template):
    # A function that grants nothing else (training's prepare step) keeps exactly PythonFunction's suppression.
    prepare = [rule for where, rule in suppressions(template)
               if where.startswith("TrainingPrepareRole") and rule["id"] == IAM5]
    assert prepare and all(rule["applies_to"] == ["Resource::*"] for rule in prepare)
    assert all("X-Ray" in rule["reason"] for rule in prepare)


@pytest.fixture(scope="module")
def widened() -> tuple[InvmonStack, list[str]]:
    """The app with wildcards that no suppression was written for, added after every construct stated its
    evidence: on a Lambda role, on the SageMaker role and on the pipeline's role."""
    stack = synth_stack()
    bucket = stack.storage.data
    endpoints = stack.format_arn(service="sagemaker", resource="endpoint", resource_name="*")
    added = [
        (stack.count.count.role, iam.PolicyStatement(actions=["s3:Get*"],
                                                     resources=[bucket.arn_for_objects("models/*")])),
        (stack.training.role, iam.PolicyStatement(actions=["s3:GetObject"], resources=[bucket.arn_for_objects("*")])),
        (stack.pipeline.state_machine.role, iam.PolicyStatement(actions=["sagemaker:DescribeEndpoint"],
                                                                resources=[endpoints])),
    ]
    for role, statement in added:
        role.add_to_principal_policy(statement)
    expected = ["Action::s3:Get*", resource_finding(stack, bucket.arn_for_objects("models/*")),
                resource_finding(stack, bucket.arn_for_objects("*")), resource_finding(stack, endpoints)]
    return stack, expected


def test_a_wildcard_added_later_is_reported_not_hidden(widened):
    stack, expected = widened
    reported = "\n".join(nag_findings(stack, "error"))
    for finding in expected:
        assert f"{IAM5}[{finding}]" in reported, finding
    # The roles' existing wildcards stay suppressed: only the new ones show.
    assert reported.count(f"{IAM5}[") == len(expected), reported


@pytest.mark.parametrize(
    ("overrides", "environment"),
    [
        pytest.param({"endpointMode": "realtime", "tuningEnabled": True,
                      "trainingSubnetIds": ["subnet-0123456789abcdef0"],
                      "trainingSecurityGroupIds": ["sg-0123456789abcdef0"]}, {}, id="realtime-tuning-vpc"),
        pytest.param({"stage": "prod"}, {"CDK_DEFAULT_ACCOUNT": "123456789012", "CDK_DEFAULT_REGION": "eu-west-1"},
                     id="prod-in-a-concrete-environment"),
    ],
)
def test_other_configurations_report_no_unsuppressed_finding(overrides, environment, monkeypatch):
    # `cdk deploy` passes a concrete account and region: ARNs built with Stack.format_arn then carry them, and
    # the suppressions must follow (they are derived from the same expressions as the grants).
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    stack = synth_stack(overrides)
    assert nag_findings(stack, "error") == []
    assert nag_findings(stack, "warning") == []


def test_flatten_writes_references_as_cdk_nag_does():
    joined = {"Fn::Join": ["", [{"Fn::GetAtt": ["Data1234", "Arn"]}, "/raw/*"]]}
    assert flatten(joined) == "<Data1234.Arn>/raw/*"
    assert flatten({"Fn::Join": [":", ["arn", {"Ref": "AWS::Partition"}, "s3"]]}) == "arn:<AWS::Partition>:s3"
    assert flatten({"Fn::Select": [6, {"Fn::Split": [":", {"Ref": "Machine"}]}]}) == \
        '{"Fn::Select":[6,{"Fn::Split":[":",{"Ref":"Machine"}]}]}'
    assert flatten("arn:${AWS::Partition}:s3:::b/*") == "arn:<AWS::Partition>:s3:::b/*"


def test_resource_finding_follows_a_concrete_region():
    stack = Stack(cdk.App(), "Concrete", env=cdk.Environment(account="123456789012", region="eu-west-1"))
    arn = stack.format_arn(service="sagemaker", resource="model", resource_name="m-*")
    assert resource_finding(stack, arn) == "Resource::arn:<AWS::Partition>:sagemaker:eu-west-1:123456789012:model/m-*"


def test_every_listed_finding_is_one_the_app_really_has():
    """No stale evidence: each appliesTo entry matches a wildcard that cdk-nag found, and suppressed, on one of
    the resources that carry that suppression (a suppression attached to a construct is copied to every
    resource under it), so narrowing a grant also means dropping its evidence."""
    stack = synth_stack()
    Aspects.of(stack.node.root).add(AwsSolutionsChecks(log_ignores=True, reports=False))
    pattern = r"CdkNagSuppression\[(.*?)\]: (AwsSolutions-IAM[45]) was triggered but suppressed"
    suppressed = set()
    for message in Annotations.from_stack(stack).find_info("*", Match.string_like_regexp(pattern)):
        finding, rule = re.match(pattern, message.entry.data).groups()
        suppressed.add((message.id, rule, finding))
    paths = {stack.resolve(child.logical_id): "/" + child.node.path for child in stack.node.find_all()
             if isinstance(child, CfnResource)}
    carriers: dict[tuple[str, str, str], set[str]] = {}
    for logical_id, rule in suppressions(Template.from_stack(stack)):
        for entry in rule.get("applies_to", []):
            carriers.setdefault((rule["id"], rule["reason"], entry), set()).add(paths[logical_id])
    stale = [(rule, entry, sorted(where)) for (rule, _, entry), where in carriers.items()
             if not any((path, rule, entry) in suppressed for path in where)]
    assert stale == []
    assert len(carriers) > 30
