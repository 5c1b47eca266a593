"""The counting path as synthesized: bucket -> queue (DLQ) -> Lambda, the tables, bulk counting, cdk-nag."""

from __future__ import annotations

import json
import re

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks

from infra import count as count_infra
from infra.config import ConfigError, default_context, load_settings, settings_from_context
from infra.count import MAX_RECEIVE_COUNT, Count
from infra.storage import Storage


def build(**overrides):
    app = cdk.App(context=default_context() | overrides)
    cdk.Aspects.of(app).add(AwsSolutionsChecks())
    settings = settings_from_context(app.node.try_get_context)
    stack = cdk.Stack(app, "CountTest", env=cdk.Environment(account="123456789012", region="eu-west-1"))
    storage = Storage(stack, "Storage", settings=settings)
    count = Count(stack, "Count", settings=settings, data_bucket=storage.data, data_key=storage.key,
                  endpoint_name="invmon-dev-counter")
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
        "VisibilityTimeout": 720,
        "KmsMasterKeyId": Match.any_value(),
    })
    function = template.find_resources("AWS::Lambda::Function", {
        "Properties": {"Handler": "lambdas.count.handler.handler"}})
    assert len(function) == 1
    # AWS: "set the source queue's visibility timeout to at least six times the configuration timeout on your
    # function" (docs.aws.amazon.com/lambda/latest/dg/services-sqs-configure.html).
    assert next(iter(function.values()))["Properties"]["Timeout"] * 6 <= 720


def test_the_lambda_budget_covers_two_stalled_records_with_the_clients_limits(built):
    _, _, template = built
    (function,) = template.find_resources("AWS::Lambda::Function", {
        "Properties": {"Handler": "lambdas.count.handler.handler"}}).values()
    timeout = function["Properties"]["Timeout"]
    variables = function["Properties"]["Environment"]["Variables"]
    attempts = int(variables["ENDPOINT_MAX_ATTEMPTS"])
    call = attempts * (float(variables["ENDPOINT_CONNECT_TIMEOUT"]) + float(variables["ENDPOINT_READ_TIMEOUT"]))
    record = call + (attempts - 1) + float(variables["RECORD_OVERHEAD_SECONDS"])
    assert record == count_infra.RECORD_BUDGET_SECONDS
    assert 2 * record < timeout
    # Each call stays inside what SageMaker lets a container take (60 s), retries included.
    assert call < 60
    # The handler's own defaults are the ones infra sets (a test or a tool running it gets the same budget).
    from lambdas.count import handler

    assert (handler.CONNECT_TIMEOUT_SECONDS, handler.READ_TIMEOUT_SECONDS, handler.MAX_ATTEMPTS,
            handler.RECORD_OVERHEAD_SECONDS) == (count_infra.ENDPOINT_CONNECT_TIMEOUT_SECONDS,
                                                 count_infra.ENDPOINT_READ_TIMEOUT_SECONDS,
                                                 count_infra.ENDPOINT_MAX_ATTEMPTS,
                                                 count_infra.RECORD_OVERHEAD_SECONDS)


@pytest.mark.parametrize(("mode", "limit"), [("serverless", 4_000_000), ("realtime", 6_291_456)])
def test_synth_refuses_a_max_image_size_the_endpoint_mode_cannot_take(mode, limit):
    # Serverless: "The maximum request and response payload size for serverless invocations is 4 MB"
    # (docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints-invoke.html); real-time: InvokeEndpoint's
    # Body is at most 6,291,456 bytes (the API's service model).
    assert load_settings({"endpointMode": mode, "countMaxImageBytes": limit}).count_max_image_bytes == limit
    with pytest.raises(ConfigError, match=rf"countMaxImageBytes: .*\b{limit}\b"):
        load_settings({"endpointMode": mode, "countMaxImageBytes": limit + 1})
    # The old default (5 MiB) on the default serverless endpoint is exactly what lost photos.
    with pytest.raises(ConfigError, match="countMaxImageBytes"):
        load_settings({"countMaxImageBytes": 5 * 1024 * 1024})


@pytest.mark.parametrize(("value", "parsed"), [("model", "model"), ("0.7", 0.7), (0.25, 0.25), ("MODEL", "model")])
def test_the_confidence_threshold_is_the_models_operating_point_or_a_probability(value, parsed):
    assert load_settings({"countConfidenceThreshold": value}).count_confidence_threshold == parsed


@pytest.mark.parametrize("value", ["auto", "1.5", -0.1, True, ""])
def test_synth_refuses_a_confidence_threshold_that_is_neither(value):
    with pytest.raises(ConfigError, match=re.escape('countConfidenceThreshold: expected "model" or a number')):
        load_settings({"countConfidenceThreshold": value})


def test_the_count_functions_get_the_consignment_error_rate_knob(built):
    _, _, template = built
    functions = [f for f in template.find_resources("AWS::Lambda::Function").values()
                 if "CONFIDENCE_THRESHOLD" in f["Properties"].get("Environment", {}).get("Variables", {})]
    # The event-driven counter and the bulk loader (both write records with discrepancyProbability).
    assert len(functions) >= 2
    assert {f["Properties"]["Environment"]["Variables"]["CONSIGNMENT_ERROR_RATE"] for f in functions} == {"0.05"}


@pytest.mark.parametrize("value", [0.0, 0.6, "five", True])
def test_synth_refuses_a_consignment_error_rate_outside_its_range(value):
    assert load_settings({"consignmentErrorRate": 0.2}).consignment_error_rate == 0.2
    with pytest.raises(ConfigError, match="consignmentErrorRate"):
        load_settings({"consignmentErrorRate": value})


def test_lambda_consumes_the_queue_reporting_partial_batch_failures(built):
    stack, count, template = built
    template.has_resource_properties("AWS::Lambda::EventSourceMapping", {
        "EventSourceArn": {"Fn::GetAtt": [logical_id(stack, count.queue), "Arn"]},
        "FunctionName": {"Ref": logical_id(stack, count.function)},
        "FunctionResponseTypes": ["ReportBatchItemFailures"],
        "BatchSize": 10,
        "MaximumBatchingWindowInSeconds": 5,
        "ScalingConfig": {"MaximumConcurrency": 5},  # endpointServerlessMaxConcurrency
    })
    env = template.find_resources("AWS::Lambda::Function", {
        "Properties": {"Handler": "lambdas.count.handler.handler"}})
    variables = next(iter(env.values()))["Properties"]["Environment"]["Variables"]
    assert variables["ENDPOINT_NAME"] == "invmon-dev-counter"
    assert variables["CONFIDENCE_THRESHOLD"] == "model"
    assert variables["MAX_IMAGE_BYTES"] == "4000000"
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


def test_dashboard_graphs_count_failures_by_cause_as_the_handler_names_them(template):
    from infra.observability import COUNT_FAILURE_CAUSES
    from lambdas.count.handler import FAILURE_CAUSES

    assert COUNT_FAILURE_CAUSES == FAILURE_CAUSES  # infra must not import Lambda code, so it keeps a copy
    (dashboard,) = template.find_resources("AWS::CloudWatch::Dashboard").values()
    parts = dashboard["Properties"]["DashboardBody"]["Fn::Join"][1]
    body = "".join(part for part in parts if isinstance(part, str))
    assert "Count records failed, by cause" in body
    for cause in FAILURE_CAUSES:
        assert f'"CountFailures","cause","{cause}","service","count"' in body, cause


def test_uploads_are_kept_for_sqss_maximum_and_their_age_alarms_long_before(built):
    # SQS keeps a message at most 14 days (MessageRetentionPeriod 1,209,600 s, "Amazon SQS message quotas"); the
    # default 4 days would not survive a stoppage found after a long weekend.
    stack, count, template = built
    queue = template.find_resources("AWS::SQS::Queue")[logical_id(stack, count.queue)]
    assert queue["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    alarm = template.find_resources("AWS::CloudWatch::Alarm")[logical_id(stack, count.oldest_upload_alarm)]
    properties = alarm["Properties"]
    assert properties["MetricName"] == "ApproximateAgeOfOldestMessage"
    assert properties["Dimensions"][0]["Value"] == {"Fn::GetAtt": [logical_id(stack, count.queue), "QueueName"]}
    # Above the retry path's longest (5 receives x 720 s), far below the retention.
    assert MAX_RECEIVE_COUNT * 720 < properties["Threshold"] <= 24 * 3600
