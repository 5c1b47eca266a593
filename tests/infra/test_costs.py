"""The cost report's infrastructure: a weekly schedule, a function limited to what the report needs."""

from __future__ import annotations

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
