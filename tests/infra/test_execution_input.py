"""The execution-input check in the synthesized stack: the allowances it reads come from the context, its role
can do nothing but log, the stack's own defaults must be within what it allows, and old runs' shards and lists
expire."""

from __future__ import annotations

import json

import pytest
from aws_cdk.assertions import Template

from infra.config import ConfigError, load_settings
from infra.execution_input import DATASET_DEFAULTS, allowances
from lambdas.execution_input.check import ALLOWANCES_ENV
from lambdas.execution_input.schema import Allowances
from lambdas.training.prepare import DEPLOYMENT_ENV
from tests.infra.conftest import synth_stack
from tests.infra.test_costs import role_actions


def check_function(template: Template) -> dict:
    (function,) = [f for f in template.find_resources("AWS::Lambda::Function").values()
                   if f["Properties"].get("Handler") == "lambdas.execution_input.check.handler"]
    return function


def test_the_check_reads_the_context_allowances_the_training_deployment_and_the_dataset_defaults(template):
    environment = check_function(template)["Properties"]["Environment"]["Variables"]
    assert json.loads(environment[ALLOWANCES_ENV]) == allowances(load_settings())
    assert Allowances.model_validate_json(environment[ALLOWANCES_ENV]).allow_network_isolation_off is False
    assert set(DATASET_DEFAULTS) <= set(environment) and DEPLOYMENT_ENV in environment
    prepare = [f for f in template.find_resources("AWS::Lambda::Function").values()
               if f["Properties"].get("Handler") == "lambdas.training.prepare.handler"]
    assert environment[DEPLOYMENT_ENV] == prepare[0]["Properties"]["Environment"]["Variables"][DEPLOYMENT_ENV]


@pytest.fixture(scope="module")
def allowing() -> Template:
    """One synth with the allowances and the retention changed (-c values arrive as strings)."""
    return Template.from_stack(synth_stack({
        "allowNetworkIsolationOff": "true", "allowForceDeploy": True, "trainingMaxInstanceCount": 100,
        "trainingAllowedInstanceTypes": "ml.g4dn.xlarge,ml.p5.48xlarge", "shardRetentionDays": "7"}))


def test_the_allowances_follow_the_context(allowing):
    environment = check_function(allowing)["Properties"]["Environment"]["Variables"]
    granted = Allowances.model_validate_json(environment[ALLOWANCES_ENV])
    assert granted.allow_network_isolation_off and granted.allow_force_deploy
    assert granted.training_max_instance_count == 100
    assert granted.training_allowed_instance_types == ("ml.g4dn.xlarge", "ml.p5.48xlarge")


def test_the_check_role_can_only_log_and_trace(template):
    role = check_function(template)["Properties"]["Role"]["Fn::GetAtt"][0]
    assert role_actions(template)[role] <= {"logs:CreateLogStream", "logs:PutLogEvents",
                                            "xray:PutTraceSegments", "xray:PutTelemetryRecords"}


@pytest.mark.parametrize(("context", "key"), [
    ({"trainingAllowedInstanceTypes": ["ml.c5.xlarge"]}, "trainingAllowedInstanceTypes: must include"),
    ({"trainingInstanceCount": 3, "trainingMaxInstanceCount": 2}, "trainingMaxInstanceCount: must be at least"),
    ({"trainingMaxSeconds": 3600}, "trainingMaxSeconds: must be at least trainingMaxRuntimeSeconds"),
    ({"tuningMaxJobsCap": 4}, "tuningMaxJobsCap: must be at least tuningMaxJobs"),
    ({"tuningMaxParallelJobsCap": 1}, "tuningMaxParallelJobsCap: must be at least tuningMaxParallelJobs"),
    ({"trainingAllowedInstanceTypes": ["ml.g4dn.xlarge", "ml.zzz.xlarge"]}, "trainingAllowedInstanceTypes: "),
    ({"trainingAllowedInstanceTypes": []}, "trainingAllowedInstanceTypes: expected a non-empty list"),
])
def test_the_stacks_own_defaults_must_be_within_what_it_allows(context, key):
    with pytest.raises(ConfigError, match=key):
        load_settings(context)


def test_old_runs_shards_and_lists_expire_after_the_retention_knob(template, allowing):
    (bucket,) = [b for logical_id, b in template.find_resources("AWS::S3::Bucket").items()
                 if logical_id.startswith("StorageData")]
    rules = {rule.get("Prefix"): rule for rule in bucket["Properties"]["LifecycleConfiguration"]["Rules"]}
    for prefix in ("shards/", "manifests/"):
        assert rules[prefix]["ExpirationInDays"] == load_settings().shard_retention_days == 30
        assert rules[prefix]["Status"] == "Enabled"
    (bucket,) = [b for logical_id, b in allowing.find_resources("AWS::S3::Bucket").items()
                 if logical_id.startswith("StorageData")]
    assert {r.get("Prefix"): r.get("ExpirationInDays") for r in bucket["Properties"]["LifecycleConfiguration"]
            ["Rules"]}["shards/"] == 7
