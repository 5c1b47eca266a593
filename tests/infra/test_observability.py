"""The platform as deployed: tags on every taggable resource, the dashboard, alarms to an encrypted topic,
outputs for the CLI, and a dev stage that cleans up while production keeps its data."""

from __future__ import annotations

import json

import pytest
from aws_cdk.assertions import Match, Template

from invmon.aws import OUTPUTS
from tests.infra.conftest import nag_findings, synth_stack

# Resources CloudFormation cannot tag, or that CDK creates without tags by design.
UNTAGGABLE = {
    "AWS::IAM::Policy", "AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy", "AWS::Lambda::Permission",
    "AWS::Lambda::EventSourceMapping", "AWS::CloudWatch::Dashboard", "AWS::SNS::TopicPolicy",
    "AWS::SNS::Subscription", "AWS::KMS::Alias", "AWS::ApplicationAutoScaling::ScalingPolicy",
    "AWS::Events::Rule", "AWS::CloudWatch::Alarm", "AWS::Scheduler::Schedule", "Custom::S3BucketNotifications",
    "Custom::S3AutoDeleteObjects", "AWS::Lambda::LayerVersionPermission", "Custom::CDKBucketDeployment",
    # The review stage's parts that CloudFormation gives no Tags property.
    "AWS::CloudFront::OriginAccessControl", "AWS::Cognito::UserPoolDomain", "AWS::Cognito::UserPoolClient",
    "AWS::Cognito::ManagedLoginBranding", "AWS::Cognito::UserPoolGroup", "AWS::ApiGatewayV2::Integration",
    "AWS::ApiGatewayV2::Route", "AWS::ApiGatewayV2::Authorizer", "AWS::Lambda::LayerVersion",
}


def test_every_taggable_resource_carries_project_stage_and_component(template):
    missing = []
    for logical_id, resource in template.to_json()["Resources"].items():
        if resource["Type"] in UNTAGGABLE or resource["Type"].startswith("Custom::"):
            continue
        # A user pool's tags are its UserPoolTags.
        tags = resource.get("Properties", {}).get("Tags", resource.get("Properties", {}).get("UserPoolTags"))
        if tags is None:
            missing.append(f"{logical_id} ({resource['Type']}): no tags")
            continue
        keys = {t["Key"] for t in tags} if isinstance(tags, list) else set(tags)
        for key in ("project", "stage", "component"):
            if key not in keys:
                missing.append(f"{logical_id} ({resource['Type']}): no {key}")
    assert missing == []


def test_dashboard_shows_pipeline_training_endpoint_counts_and_dlq(template):
    (dashboard,) = template.find_resources("AWS::CloudWatch::Dashboard").values()
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for title in ("Pipeline executions", "Training jobs", "Endpoint invocations and errors",
                  "Endpoint model latency", "Photos counted, by status", "Count dead-letter queue depth"):
        assert title in body, title
    for status in ("match", "mismatch", "uncounted-low-confidence", "rejected", "counted"):
        assert f"Photos-{status}" in body


def test_alarms_on_pipeline_failure_endpoint_errors_and_dead_letters_notify_the_topic(template):
    alarms = template.find_resources("AWS::CloudWatch::Alarm")
    metrics = {alarm["Properties"].get("MetricName") for alarm in alarms.values()}
    assert {"ExecutionsFailed", "Invocation5XXErrors", "ApproximateNumberOfMessagesVisible"} <= metrics
    (topic_id,) = template.find_resources("AWS::SNS::Topic")
    for logical_id, alarm in alarms.items():
        assert {"Ref": topic_id} in alarm["Properties"]["AlarmActions"], logical_id
    template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})


def test_alarm_email_subscribes_to_the_topic():
    template = Template.from_stack(synth_stack({"alarmEmail": "ops@example.com"}))
    template.has_resource_properties("AWS::SNS::Subscription", {"Protocol": "email", "Endpoint": "ops@example.com"})


def test_stack_outputs_name_everything_the_cli_reads(template):
    outputs = template.to_json()["Outputs"]
    assert set(OUTPUTS.values()) <= set(outputs)


def test_tables_keep_point_in_time_recovery(template):
    tables = template.find_resources("AWS::DynamoDB::Table")
    assert tables
    for logical_id, table in tables.items():
        spec = table["Properties"]["PointInTimeRecoverySpecification"]
        assert spec["PointInTimeRecoveryEnabled"] is True, logical_id


@pytest.mark.parametrize(("stage", "auto_delete"), [("dev", True), ("prod", False)])
def test_dev_buckets_empty_themselves_on_destroy_and_production_keeps_them(stage, auto_delete):
    stack = synth_stack({"stage": stage})
    template = Template.from_stack(stack)
    assert bool(template.find_resources("Custom::S3AutoDeleteObjects")) is auto_delete
    assert nag_findings(stack, "error") == []


def test_dashboard_graphs_the_training_jobs_own_instance_utilisation(template):
    # SageMaker publishes these for every training job (no Debugger needed): namespace /aws/sagemaker/TrainingJobs,
    # dimension Host = "<job>/algo-<n>" (docs.aws.amazon.com/sagemaker/latest/dg/monitoring-cloudwatch.html).
    (dashboard,) = template.find_resources("AWS::CloudWatch::Dashboard").values()
    body = json.loads("".join(p if isinstance(p, str) else "0" for p in dashboard["Properties"]["DashboardBody"]
                              ["Fn::Join"][1]))
    (widget,) = [w for w in body["widgets"] if w["properties"].get("title", "").startswith("Training job instances")]
    expressions = [m[0]["expression"] for m in widget["properties"]["metrics"]]
    for metric in ("CPUUtilization", "MemoryUtilization", "GPUUtilization"):
        assert f"SEARCH('{{\"/aws/sagemaker/TrainingJobs\",Host}} MetricName=\"{metric}\" Host=invmon-dev', " \
               "'Average', 60)" in expressions
