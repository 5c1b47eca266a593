"""The cost report's infrastructure: a weekly schedule, a function limited to what the report needs."""

from __future__ import annotations

import json

import aws_cdk as cdk
import pytest
from aws_cdk import Aspects
from aws_cdk.assertions import Match, Template
from cdk_nag import AwsSolutionsChecks

from infra.config import default_context, load_settings
from infra.costs import Costs
from infra.storage import Storage
from tests.infra.conftest import nag_findings


@pytest.fixture(scope="module")
def costs_stack() -> cdk.Stack:
    app = cdk.App(context=default_context())
    stack = cdk.Stack(app, "CostsTest")
    settings = load_settings()
    storage = Storage(stack, "Storage", settings=settings)
    Costs(stack, "Costs", settings=settings, data_bucket=storage.data, data_key=storage.key)
    Aspects.of(app).add(AwsSolutionsChecks())
    app.synth()
    return stack


def test_report_runs_weekly_by_default_with_retries(costs_stack):
    Template.from_stack(costs_stack).has_resource_properties(
        "AWS::Scheduler::Schedule",
        {
            "ScheduleExpression": "rate(7 days)",
            "State": "ENABLED",
            "Target": Match.object_like(
                {
                    "Input": Match.serialized_json({"days": 7}),
                    "RetryPolicy": Match.object_like({"MaximumRetryAttempts": 2}),
                }
            ),
        },
    )


def test_report_function_may_read_costs_and_write_only_its_report_prefix(costs_stack):
    policies = Template.from_stack(costs_stack).find_resources("AWS::IAM::Policy")
    statements = [s for p in policies.values() for s in p["Properties"]["PolicyDocument"]["Statement"]]
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert "ce:GetCostAndUsage" in actions
    assert not any(a.endswith(":*") or a == "*" for a in actions)
    writes = [s for s in statements if "s3:PutObject" in s["Action"]]
    assert len(writes) == 1
    assert writes[0]["Resource"]["Fn::Join"][1][-1] == "/reports/costs/*"


def test_schedule_role_invokes_only_the_report_function(costs_stack):
    policies = Template.from_stack(costs_stack).find_resources("AWS::IAM::Policy")
    invokes = [
        s
        for p in policies.values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if s["Action"] == "lambda:InvokeFunction"
    ]
    assert len(invokes) == 1
    (function_id,) = Template.from_stack(costs_stack).find_resources(
        "AWS::Lambda::Function", {"Properties": {"Handler": "lambdas.costs.report.handler"}}
    )
    assert invokes[0]["Resource"] == {"Fn::GetAtt": [function_id, "Arn"]}


def test_costs_construct_passes_cdk_nag(costs_stack):
    assert nag_findings(costs_stack, "error") == []
    assert nag_findings(costs_stack, "warning") == []


def test_schedule_comes_from_settings():
    app = cdk.App(context=default_context())
    stack = cdk.Stack(app, "CostsDaily")
    settings = load_settings({"costReportSchedule": "cron(0 6 * * ? *)"})
    storage = Storage(stack, "Storage", settings=settings)
    Costs(stack, "Costs", settings=settings, data_bucket=storage.data, data_key=storage.key)
    Template.from_stack(stack).has_resource_properties(
        "AWS::Scheduler::Schedule", {"ScheduleExpression": "cron(0 6 * * ? *)"}
    )


def role_actions(template: Template) -> dict[str, set[str]]:
    """Every action each role of the template may take: inline policies and attached AWS::IAM::Policy."""
    document = template.to_json()["Resources"]
    found: dict[str, set[str]] = {logical_id: set() for logical_id, r in document.items()
                                  if r["Type"] == "AWS::IAM::Role"}

    def add(role: str, policy: dict) -> None:
        for statement in policy["Statement"]:
            action = statement.get("Action", [])
            found[role].update([action] if isinstance(action, str) else action)

    for logical_id, resource in document.items():
        if resource["Type"] == "AWS::IAM::Role":
            for policy in resource["Properties"].get("Policies", []):
                add(logical_id, policy["PolicyDocument"])
            # A managed policy (AWS's or ours) could carry billing access too: none may be attached at all
            # to a role that should not read costs, so list them as actions to be seen.
            found[logical_id].update(f"managed:{json.dumps(arn)}"
                                     for arn in resource["Properties"].get("ManagedPolicyArns", []))
        elif resource["Type"] == "AWS::IAM::Policy":
            for role in resource["Properties"].get("Roles", []):
                add(role["Ref"], resource["Properties"]["PolicyDocument"])
    return found


def trusted_services(role: dict) -> set[str]:
    services = set()
    for statement in role["Properties"]["AssumeRolePolicyDocument"]["Statement"]:
        service = statement.get("Principal", {}).get("Service", [])
        services.update([service] if isinstance(service, str) else service)
    return services


def test_no_role_that_sagemaker_assumes_holds_a_cost_explorer_action(template):
    roles = template.find_resources("AWS::IAM::Role")
    sagemaker_roles = [r for r, role in roles.items() if "sagemaker.amazonaws.com" in trusted_services(role)]
    assert sagemaker_roles, "the training/endpoint execution role trusts sagemaker.amazonaws.com"
    actions = role_actions(template)
    assert {r: sorted(a for a in actions[r] if a.startswith("ce:")) for r in sagemaker_roles} == \
        {r: [] for r in sagemaker_roles}


def test_exactly_one_role_reads_costs_and_the_cost_report_lambda_assumes_it(template):
    holders = {r: sorted(a for a in acts if a.lower().startswith("ce:"))
               for r, acts in role_actions(template).items() if any(a.lower().startswith("ce:") for a in acts)}
    ((analysis, analysis_actions),) = holders.items()
    # Only the action the report makes (lambdas/costs/report.py calls get_cost_and_usage).
    assert analysis_actions == ["ce:GetCostAndUsage"]
    assert role_actions(template)[analysis] == {"ce:GetCostAndUsage"}
    (function,) = template.find_resources(
        "AWS::Lambda::Function", {"Properties": {"Handler": "lambdas.costs.report.handler"}}).values()
    assert function["Properties"]["Environment"]["Variables"]["COST_ANALYSIS_ROLE_ARN"] == \
        {"Fn::GetAtt": [analysis, "Arn"]}
    function_role = function["Properties"]["Role"]["Fn::GetAtt"][0]
    # The function's role may assume it, and the role trusts that function role (no service principal).
    assert role_actions(template)[function_role] >= {"sts:AssumeRole"}
    trust = template.find_resources("AWS::IAM::Role")[analysis]["Properties"]["AssumeRolePolicyDocument"]
    principals = json.dumps([s["Principal"] for s in trust["Statement"]])
    assert function_role in principals and "Service" not in principals
