"""The counting path as synthesized: bucket -> queue (DLQ) -> Lambda, the tables, bulk counting, cdk-nag."""

from __future__ import annotations

import json

import aws_cdk as cdk
import pytest
from aws_cdk import aws_iam as iam
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks

from infra.config import default_context, settings_from_context
from infra.count import MAX_RECEIVE_COUNT, Count
from infra.storage import Storage


def build(**overrides):
    app = cdk.App(context=default_context() | overrides)
    cdk.Aspects.of(app).add(AwsSolutionsChecks())
    settings = settings_from_context(app.node.try_get_context)
    stack = cdk.Stack(app, "CountTest", env=cdk.Environment(account="123456789012", region="eu-west-1"))
    storage = Storage(stack, "Storage", settings=settings)
    role = iam.Role(stack, "SageMakerRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"))
    count = Count(stack, "Count", settings=settings, data_bucket=storage.data, data_key=storage.key,
                  endpoint_name="invmon-dev-counter", sagemaker_role=role)
    return stack, count, Template.from_stack(stack)


@pytest.fixture(scope="module")
def built():
    return build()


def logical_id(stack: cdk.Stack, construct) -> str:
    return stack.get_logical_id(construct.node.default_child)


def test_bucket_notifies_the_queue_of_uploads_under_the_incoming_prefix(built):
    stack, count, template = built
    template.has_resource_properties("Custom::S3BucketNotifications", {
        "NotificationConfiguration": {"QueueConfigurations": [{
            "Events": ["s3:ObjectCreated:*"],
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "incoming/"}]}},
            "QueueArn": {"Fn::GetAtt": [logical_id(stack, count.queue), "Arn"]},
        }]},
    })
    # S3 may send to the queue (queue policy) and use the queue's key (key policy), for this bucket only.
    template.has_resource_properties("AWS::SQS::QueuePolicy", {
        "PolicyDocument": {"Statement": Match.array_with([Match.object_like({
            "Action": Match.array_with(["sqs:SendMessage"]),
            "Principal": {"Service": "s3.amazonaws.com"},
        })])},
    })
    key = template.find_resources("AWS::KMS::Key")[logical_id(stack, count.queue_key)]
    assert any(s.get("Principal") == {"Service": "s3.amazonaws.com"} and "aws:SourceArn" in json.dumps(s)
               for s in key["Properties"]["KeyPolicy"]["Statement"])


def test_queue_has_a_dead_letter_queue_and_outlasts_the_function(built):
    stack, count, template = built
    template.has_resource_properties("AWS::SQS::Queue", {
        "RedrivePolicy": {
            "deadLetterTargetArn": {"Fn::GetAtt": [logical_id(stack, count.dlq), "Arn"]},
            "maxReceiveCount": MAX_RECEIVE_COUNT,
        },
        "VisibilityTimeout": 360,
        "KmsMasterKeyId": Match.any_value(),
    })
    function = template.find_resources("AWS::Lambda::Function", {
        "Properties": {"Handler": "lambdas.count.handler.handler"}})
    assert len(function) == 1
    assert next(iter(function.values()))["Properties"]["Timeout"] * 6 <= 360


def test_lambda_consumes_the_queue_reporting_partial_batch_failures(built):
    stack, count, template = built
    template.has_resource_properties("AWS::Lambda::EventSourceMapping", {
        "EventSourceArn": {"Fn::GetAtt": [logical_id(stack, count.queue), "Arn"]},
        "FunctionName": {"Ref": logical_id(stack, count.function)},
        "FunctionResponseTypes": ["ReportBatchItemFailures"],
        "BatchSize": 10,
        "ScalingConfig": {"MaximumConcurrency": 5},  # endpointServerlessMaxConcurrency
    })
    env = template.find_resources("AWS::Lambda::Function", {
        "Properties": {"Handler": "lambdas.count.handler.handler"}})
    variables = next(iter(env.values()))["Properties"]["Environment"]["Variables"]
    assert variables["ENDPOINT_NAME"] == "invmon-dev-counter"
    assert variables["CONFIDENCE_THRESHOLD"] == "0.5"
    assert variables["INCOMING_PREFIX"] == "incoming/"
    assert {"COUNTS_TABLE", "IDEMPOTENCY_TABLE", "EVENT_BUS_NAME", "MAX_IMAGE_BYTES"} <= set(variables)


def test_tables_have_point_in_time_recovery_and_the_customer_key(built):
    stack, count, template = built
    tables = template.find_resources("AWS::DynamoDB::Table")
    assert len(tables) == 2
    for table in tables.values():
        props = table["Properties"]
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
        assert props["SSESpecification"]["SSEEnabled"] is True
        assert props["SSESpecification"]["SSEType"] == "KMS"
        assert "KMSMasterKeyId" in props["SSESpecification"]
    counts = tables[logical_id(stack, count.table)]["Properties"]
    assert counts["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"},
                                   {"AttributeName": "sk", "KeyType": "RANGE"}]
    assert counts["GlobalSecondaryIndexes"][0]["IndexName"] == "byStatus"
    idempotency = tables[logical_id(stack, count.idempotency_table)]["Properties"]
    assert idempotency["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}


def test_count_role_is_least_privilege(built):
    stack, count, template = built
    role_id = stack.get_logical_id(count.count.role.node.default_child)
    policies = [p for p in template.find_resources("AWS::IAM::Policy").values()
                if {"Ref": role_id} in p["Properties"]["Roles"]]
    statements = [s for p in policies for s in p["Properties"]["PolicyDocument"]["Statement"]]
    text = json.dumps(statements)
    assert "sagemaker:InvokeEndpoint" in text and "endpoint/invmon-dev-counter" in text
    assert '"events:source": "invmon.count"' in text
    assert "/incoming/*" in text
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert not any(a.endswith(":*") for a in actions)
        if any(a.startswith("s3:GetObject") for a in actions):
            assert "incoming/*" in json.dumps(statement["Resource"])


def test_bulk_state_machine_runs_a_transform_and_loads_page_by_page(built):
    _, _, template = built
    machine = template.find_resources("AWS::StepFunctions::StateMachine")
    assert len(machine) == 1
    parts = next(iter(machine.values()))["Properties"]["DefinitionString"]["Fn::Join"][1]
    states = json.loads("".join(p if isinstance(p, str) else "X" for p in parts))["States"]
    assert states["Batch transform"]["Resource"].endswith(":states:::sagemaker:createTransformJob.sync")
    assert states["Batch transform"]["Catch"][0]["ErrorEquals"] == ["States.ALL"]
    assert states["More results?"]["Choices"][0]["Variable"] == "$.page.done"
    assert states["Next page"]["Next"] == "Load results"
    handlers = {f["Properties"]["Handler"] for f in template.find_resources("AWS::Lambda::Function").values()}
    assert {"lambdas.count.bulk.plan_handler", "lambdas.count.bulk.load_handler"} <= handlers


def test_cdk_nag_reports_no_unsuppressed_errors(built):
    stack, _, _ = built
    errors = Annotations.from_stack(stack).find_error("*", Match.string_like_regexp("AwsSolutions-.*"))
    assert errors == [], [(e.id, e.entry.data.splitlines()[0]) for e in errors]
