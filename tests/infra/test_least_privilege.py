"""Least privilege across the whole synthesized stack (issue #23): each SageMaker workload's role, the model
requests the deploy Lambda sends, log-group keys, KMS grants, service principals and bucket listing.

Uses the session's one synthesized stack (tests/infra/conftest.py) plus one real-time synth; no other cost.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from infra.storage import BUCKET_WIDE_LISTING
from lambdas.deploy import plan
from tests.infra.conftest import synth_stack


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statements_of_role(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """Every statement of the IAM policies attached to ``role`` and of its inline policies."""
    found = [s for policy in template["Resources"][role]["Properties"].get("Policies", [])
             for s in policy["PolicyDocument"]["Statement"]]
    for policy in resources(template, "AWS::IAM::Policy").values():
        if {"Ref": role} in policy["Properties"].get("Roles", []):
            found += policy["Properties"]["PolicyDocument"]["Statement"]
    return found


def all_identity_statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, policy in resources(template, "AWS::IAM::Policy").items():
        found += [(name, s) for s in policy["Properties"]["PolicyDocument"]["Statement"]]
    for name, role in resources(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            found += [(name, s) for s in policy["PolicyDocument"]["Statement"]]
    return found


def role_named_in(variables: dict[str, Any], name: str) -> str:
    """The logical id of the role whose ARN an environment variable carries (directly or inside JSON)."""
    text = json.dumps(variables[name])
    roles = [part.split('"')[0] for part in text.split('{"Fn::GetAtt": ["')[1:] if '"Arn"' in part]
    (role,) = [r for r in roles if "Role" in r]
    return role


def environment(template: dict[str, Any], handler: str) -> dict[str, Any]:
    (function,) = [f for f in resources(template, "AWS::Lambda::Function").values()
                   if f["Properties"].get("Handler") == handler]
    return function["Properties"]["Environment"]["Variables"]


def writes_models(statements: list[dict[str, Any]]) -> bool:
    return any(
        any(a.startswith(("s3:Put", "s3:Delete", "s3:*")) or a == "*" for a in listed(s["Action"]))
        and "models/" in json.dumps(s.get("Resource"))
        for s in statements if s["Effect"] == "Allow"
    )


@pytest.fixture(scope="module")
def cfn(template) -> dict[str, Any]:
    return template.to_json()


@pytest.fixture(scope="module")
def prod_realtime() -> dict[str, Any]:
    """The one extra synth of this module (~1 min on a shared core): production with a real-time endpoint."""
    from aws_cdk.assertions import Template

    return Template.from_stack(synth_stack({"stage": "prod", "endpointMode": "realtime"})).to_json()


def test_no_role_named_by_create_model_can_write_models(cfn):
    serving = role_named_in(environment(cfn, "lambdas.deploy.release.handler"), "DEPLOY_SETTINGS")
    transform = role_named_in(environment(cfn, "lambdas.count.bulk.plan_handler"), "TRANSFORM_ROLE_ARN")
    assert serving != transform
    for role in (serving, transform):
        assert not writes_models(statements_of_role(cfn, role)), role
    training = role_named_in(environment(cfn, "lambdas.training.prepare.handler"), "TRAINING_DEPLOYMENT")
    assert writes_models(statements_of_role(cfn, training))  # the one role that writes models/ ...
    # ... is never passed to SageMaker by the release or bulk planner (their PassRole names their own role).
    for handler, role in (("lambdas.deploy.release.handler", serving), ("lambdas.count.bulk.plan_handler", transform)):
        function_role = next(f["Properties"]["Role"]["Fn::GetAtt"][0]
                             for f in resources(cfn, "AWS::Lambda::Function").values()
                             if f["Properties"].get("Handler") == handler)
        passed = [s for s in statements_of_role(cfn, function_role) if "iam:PassRole" in listed(s["Action"])]
        assert passed and all(json.dumps(s["Resource"]) == json.dumps({"Fn::GetAtt": [role, "Arn"]}) for s in passed)


def test_the_inference_role_reads_models_only_and_holds_no_bucket_listing(cfn):
    serving = role_named_in(environment(cfn, "lambdas.deploy.release.handler"), "DEPLOY_SETTINGS")
    statements = statements_of_role(cfn, serving)
    reads = [s for s in statements if any(a.startswith("s3:") for a in listed(s["Action"]))]
    assert reads and all(listed(s["Action"]) == ["s3:GetObject"] and "/models/*" in json.dumps(s["Resource"])
                         for s in reads)
    metrics = [s for s in statements if "cloudwatch:PutMetricData" in listed(s["Action"])]
    assert metrics and all("cloudwatch:namespace" in json.dumps(s.get("Condition")) for s in metrics)


def test_sagemaker_roles_trust_only_this_accounts_sagemaker_resources(cfn):
    sagemaker_roles = {name: role for name, role in resources(cfn, "AWS::IAM::Role").items()
                       if "sagemaker.amazonaws.com" in json.dumps(role["Properties"]["AssumeRolePolicyDocument"])}
    workload_roles = {n for n in sagemaker_roles if "Studio" not in n}
    assert len(workload_roles) == 3, sorted(workload_roles)  # training, inference, transform
    for name in workload_roles:
        for statement in sagemaker_roles[name]["Properties"]["AssumeRolePolicyDocument"]["Statement"]:
            condition = statement["Condition"]
            assert "aws:SourceAccount" in condition["StringEquals"], name
            assert "aws:SourceArn" in condition["ArnLike"], name


def test_the_deploy_lambdas_model_request_is_isolated_and_its_realtime_config_encrypted(prod_realtime):
    raw = environment(prod_realtime, "lambdas.deploy.release.handler")["DEPLOY_SETTINGS"]
    text = raw if isinstance(raw, str) else "".join(p if isinstance(p, str) else '"ref"'
                                                    for p in raw["Fn::Join"][1])
    settings = plan.EndpointSettings(**json.loads(text.replace('""ref""', '"ref"')))
    request = plan.model_request(settings, "m", "s3://b/models/j/output/model.tar.gz", "eu-west-1")
    assert request["EnableNetworkIsolation"] is True
    assert plan.endpoint_config_request(settings, "c", "m")["KmsKeyId"]


def test_every_log_group_has_a_customer_managed_key(cfn):
    groups = resources(cfn, "AWS::Logs::LogGroup")
    names = {json.dumps(g["Properties"].get("LogGroupName")) for g in groups.values()}
    assert {'"/aws/sagemaker/TrainingJobs"', '"/aws/sagemaker/TransformJobs"',
            '"/aws/sagemaker/Endpoints/invmon-dev-counter"'} <= names
    assert [n for n, g in groups.items() if "KmsKeyId" not in g["Properties"]] == []
    assert [n for n, g in groups.items() if "RetentionInDays" not in g["Properties"]] == []


def test_the_logs_key_serves_cloudwatch_logs_only_for_this_accounts_log_groups(cfn):
    (key,) = [k for n, k in resources(cfn, "AWS::KMS::Key").items() if n.startswith("LogsKey")]
    (logs,) = [s for s in key["Properties"]["KeyPolicy"]["Statement"]
               if "logs." in json.dumps(s.get("Principal"))]
    assert "kms:EncryptionContext:aws:logs:arn" in logs["Condition"]["ArnLike"]


def test_every_create_grant_is_for_an_aws_resource(cfn):
    unconditioned = [
        name for name, s in all_identity_statements(cfn)
        if any(a in ("kms:CreateGrant", "kms:*", "*") for a in listed(s["Action"]))
        and s.get("Condition", {}).get("Bool", {}).get("kms:GrantIsForAWSResource") != "true"
    ]
    assert unconditioned == []


def test_service_principals_in_key_policies_carry_source_conditions(cfn):
    for name, key in resources(cfn, "AWS::KMS::Key").items():
        for statement in key["Properties"]["KeyPolicy"]["Statement"]:
            service = json.dumps(statement.get("Principal", {}).get("Service", ""))
            if "cloudwatch.amazonaws.com" in service or "s3.amazonaws.com" in service:
                condition = json.dumps(statement.get("Condition"))
                assert "aws:SourceAccount" in condition and "aws:SourceArn" in condition, name


def test_the_alarm_topic_has_its_own_key(cfn):
    (topic,) = resources(cfn, "AWS::SNS::Topic").values()
    key = topic["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0]
    assert "AlarmKey" in key


def test_no_bucket_wide_listing_of_the_data_bucket_without_a_prefix_condition_or_a_written_reason(cfn):
    (bucket,) = [n for n, b in resources(cfn, "AWS::S3::Bucket").items() if n.startswith("StorageData")]
    bucket_arn = json.dumps({"Fn::GetAtt": [bucket, "Arn"]})
    offenders = []
    for name, statement in all_identity_statements(cfn):
        if not any(a.startswith("s3:List") or a in ("s3:*", "*") for a in listed(statement["Action"])):
            continue
        if bucket_arn not in [json.dumps(r) for r in listed(statement["Resource"])]:
            continue
        if "s3:prefix" in json.dumps(statement.get("Condition")):
            continue
        if statement.get("Sid") in BUCKET_WIDE_LISTING:
            continue
        offenders.append((name, statement))
    assert offenders == []


def test_production_keeps_the_counts_table_from_deletion(prod_realtime):
    tables = [t for n, t in resources(prod_realtime, "AWS::DynamoDB::Table").items() if n.startswith("CountCounts")]
    assert tables and all(t["Properties"]["DeletionProtectionEnabled"] is True for t in tables)


def test_the_cost_report_schedule_has_a_dead_letter_queue(cfn):
    (schedule,) = resources(cfn, "AWS::Scheduler::Schedule").values()
    assert schedule["Properties"]["Target"]["DeadLetterConfig"]["Arn"]
