"""The deploy stage as synthesized: Lambdas, rollback alarm, the wait loop, least privilege, cdk-nag."""

from __future__ import annotations

import json

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks

from infra.config import default_context, settings_from_context
from infra.deploy import Deploy
from infra.pipeline import Pipeline, Stage
from infra.storage import Storage
from tests.infra.conftest import echo_input_check


def build(**overrides):
    app = cdk.App(context=default_context() | overrides)
    cdk.Aspects.of(app).add(AwsSolutionsChecks())
    settings = settings_from_context(app.node.try_get_context)
    stack = cdk.Stack(app, "DeployTest", env=cdk.Environment(account="123456789012", region="eu-west-1"))
    storage = Storage(stack, "Storage", settings=settings)
    deploy = Deploy(stack, "Deploy", settings=settings, data_bucket=storage.data, data_key=storage.key)
    # The stage inside the lead's pipeline, as the stack composes it.
    Pipeline(stack, "Pipeline", settings=settings, stages=[Stage("deploy", deploy.stage)],
             input_check=echo_input_check(stack))
    return app, stack, deploy


@pytest.fixture(scope="module")
def built():
    _, stack, deploy = build()
    return stack, deploy, Template.from_stack(stack)


def all_states(template: Template) -> dict:
    """Every state of the pipeline, those inside Parallel branches included, by name."""
    machine = next(iter(template.find_resources("AWS::StepFunctions::StateMachine").values()))
    parts = machine["Properties"]["DefinitionString"]["Fn::Join"][1]
    found: dict = {}

    def walk(states: dict) -> None:
        for name, state in states.items():
            found[name] = state
            for branch in state.get("Branches", []):
                walk(branch["States"])

    walk(json.loads("".join(part if isinstance(part, str) else "ARN" for part in parts))["States"])
    return found


def test_endpoint_name_is_stable_and_the_lambdas_know_it(built):
    _, deploy, template = built
    assert deploy.endpoint_name == "invmon-dev-counter"
    functions = template.find_resources("AWS::Lambda::Function")
    handlers = {f["Properties"]["Handler"] for f in functions.values()}
    assert {"lambdas.deploy.gate.handler", "lambdas.deploy.release.handler",
            "lambdas.deploy.finish.handler"} <= handlers
    gate = next(f for f in functions.values() if f["Properties"]["Handler"] == "lambdas.deploy.gate.handler")
    raw = gate["Properties"]["Environment"]["Variables"]["DEPLOY_SETTINGS"]
    text = raw if isinstance(raw, str) else "".join(p if isinstance(p, str) else "X" for p in raw["Fn::Join"][1])
    assert '"endpoint_name": "invmon-dev-counter"' in text
    assert '"mode": "serverless"' in text
    assert "invmon-dev-counter-invocation-5xx" in text


def test_rollback_alarm_watches_the_endpoint_5xx(built):
    _, _, template = built
    template.has_resource_properties("AWS::CloudWatch::Alarm", {
        "AlarmName": "invmon-dev-counter-invocation-5xx",
        "MetricName": "Invocation5XXErrors",
        "Namespace": "AWS/SageMaker",
        "Dimensions": Match.array_with([{"Name": "EndpointName", "Value": "invmon-dev-counter"}]),
    })


def test_state_machine_waits_for_in_service_on_the_new_config_and_fails_cleanly(built):
    _, _, template = built
    states = all_states(template)
    assert states["Decide deploy"]["Type"] == "Task"
    assert states["Deploy?"]["Choices"][0]["StringEquals"] == "deploy"
    assert states["Describe endpoint"]["Resource"].endswith(":states:::aws-sdk:sagemaker:describeEndpoint")
    ready = states["Endpoint ready?"]
    first = ready["Choices"][0]["And"]
    assert {"Variable": "$.deploy.endpoint.EndpointConfigName",
            "StringEqualsPath": "$.deploy.release.endpointConfigName"} in first
    assert ready["Default"] == "Count endpoint check"  # bounded: see the attempt-limit test
    assert states["Endpoint failed"]["Type"] == "Fail"
    assert states["Deploy rolled back"]["Type"] == "Fail"
    assert states["Finish deploy"]["ResultPath"] == "$.deploy"
    assert ["EndpointBusy"] in [retry["ErrorEquals"] for retry in states["Release model"]["Retry"]]


def test_release_role_may_pass_only_the_sagemaker_role_and_touch_only_its_endpoint(built):
    _, _, template = built
    policies = template.find_resources("AWS::IAM::Policy")
    text = json.dumps(policies)
    assert "iam:PassRole" in text
    assert '"iam:PassedToService": "sagemaker.amazonaws.com"' in text
    for policy in policies.values():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert not any(a in ("*", "sagemaker:*", "s3:*") for a in actions)
            if "sagemaker:UpdateEndpoint" in actions:
                assert "*" not in json.dumps(statement["Resource"]).replace("-*", "")


def test_cdk_nag_reports_no_unsuppressed_errors_on_the_deploy_construct(built):
    stack, _, _ = built
    # The pipeline's own role (which grants invoke on each stage's Lambdas, versions included) is the
    # pipeline's to suppress; everything this construct creates must be clean.
    errors = [e for e in Annotations.from_stack(stack).find_error("*", Match.string_like_regexp("AwsSolutions-.*"))
              if e.id.startswith("/DeployTest/Deploy/") or e.id.startswith("/DeployTest/SageMakerRole/")]
    assert errors == [], [(e.id, e.entry.data.splitlines()[0]) for e in errors]


def test_realtime_mode_reaches_the_lambdas_with_the_regions_gpu_image():
    _, stack, _ = build(endpointMode="realtime", endpointInstanceType="ml.g4dn.xlarge")
    template = Template.from_stack(stack).to_json()
    gate = next(f for f in template["Resources"].values()
                if f["Type"] == "AWS::Lambda::Function" and f["Properties"]["Handler"] == "lambdas.deploy.gate.handler")
    setting = json.dumps(gate["Properties"]["Environment"]["Variables"]["DEPLOY_SETTINGS"])
    assert '\\"mode\\": \\"realtime\\"' in setting
    assert '\\"instance_type\\": \\"ml.g4dn.xlarge\\"' in setting
    # The image is looked up per deploy region (infra.images' mapping), GPU for a g4dn.
    assert "InferenceGpu" in setting or "-gpu-" in setting


def test_endpoint_failure_cause_carries_the_status_and_reads_failure_reason_only_where_present(built):
    # DescribeEndpoint returns FailureReason only for Failed (or InService after a failed update), while
    # EndpointStatus and EndpointName are always returned (SageMaker API reference, EndpointMetadata). Reading
    # an absent path is States.Runtime, which no Catch catches, so every state that reads FailureReason must be
    # reachable only through an IsPresent guard on it.
    _, _, template = built
    states = all_states(template)
    reason = "$.deploy.endpoint.FailureReason"
    ready = states["Endpoint ready?"]
    failure_rule = next(rule for rule in ready["Choices"] if "Or" in rule)
    assert {c["StringEquals"] for c in failure_rule["Or"]} == {"Failed", "OutOfService", "UpdateRollbackFailed"}
    assert failure_rule["Next"] == "Failure reason given?"

    readers = {name for name, state in states.items()
               if reason in json.dumps(state) and state["Type"] not in ("Choice", "Parallel")}
    assert readers == {"Endpoint failure with reason"}
    entries = [(name, state) for name, state in states.items()
               if state.get("Next") in readers or state.get("Default") in readers
               or any(rule.get("Next") in readers for rule in state.get("Choices", []))]
    assert [name for name, _ in entries] == ["Failure reason given?"]
    guard = entries[0][1]
    assert guard["Default"] not in readers
    assert [rule for rule in guard["Choices"] if rule["Next"] in readers] == [
        {"Variable": reason, "IsPresent": True, "Next": "Endpoint failure with reason"}]

    for name in ("Endpoint failure with reason", "Endpoint failure without reason"):
        record = states[name]
        assert record["Type"] == "Pass" and record["Next"] == "Endpoint failed"
        assert record["ResultPath"] == "$.deploy.failure"
        assert record["Parameters"]["status.$"] == "$.deploy.endpoint.EndpointStatus"
        assert "$.deploy.endpoint.EndpointStatus" in record["Parameters"]["cause.$"]
    assert states["Endpoint failed"] == {"Type": "Fail", "Error": "EndpointFailed",
                                         "CausePath": "$.deploy.failure.cause"}


# --- one deploy at a time, and a bounded wait ----------------------------------------------------------------


def test_the_deploy_stage_runs_under_a_lock_released_on_every_path(built):
    _, _, template = built
    states = all_states(template)
    acquire = states["Acquire deploy lock"]
    assert acquire["Next"] == "Deploy under lock"
    (held,) = [r for r in acquire["Retry"] if r["ErrorEquals"] == ["DeployLockHeld"]]
    assert held["MaxAttempts"] >= 1 and held["MaxDelaySeconds"] <= 600  # a bounded wait
    body = states["Deploy under lock"]
    assert body["Branches"][0]["StartAt"] == "Decide deploy"  # the gate runs with the lock held
    assert body["Next"] == "Release deploy lock"
    assert [c["Next"] for c in body["Catch"]] == ["Release deploy lock after failure"]
    assert states["Release deploy lock after failure"]["Next"] == "Deploy error has a cause?"
    assert states["Release deploy lock"]["Catch"][0]["Next"] == "Deploy lock left to expire"


def test_the_lock_table_has_a_ttl_and_the_lock_function_only_its_three_calls(built):
    stack, deploy, template = built
    table = template.find_resources("AWS::DynamoDB::Table")[stack.get_logical_id(deploy.lock_table.node.default_child)]
    assert table["Properties"]["TimeToLiveSpecification"] == {"AttributeName": "expiresAt", "Enabled": True}
    assert table["Properties"]["KeySchema"] == [{"AttributeName": "lock", "KeyType": "HASH"}]
    policies = [p for p in template.find_resources("AWS::IAM::Policy").values()
                if "DeployLock" in json.dumps(p["Properties"]["Roles"])]
    actions = {a for p in policies for s in p["Properties"]["PolicyDocument"]["Statement"]
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]) if a.startswith("dynamodb")}
    assert actions == {"dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:DeleteItem"}


def test_the_endpoint_wait_loop_gives_up_after_its_attempt_limit_with_a_cause(built):
    from infra.deploy import endpoint_checks

    _, _, template = built
    states = all_states(template)
    assert states["Endpoint ready?"]["Default"] == "Count endpoint check"
    keep = states["Keep waiting for endpoint?"]
    assert keep["Choices"][0] == {"Variable": "$.deploy.checks.n", "NumericGreaterThanEquals": endpoint_checks(
        settings_from_context(default_context().get)), "Next": "Endpoint wait exhausted"}
    assert keep["Default"] == "Wait for endpoint"
    assert states["Endpoint wait timed out"]["Error"] == "EndpointTimeout"
    assert "did not become InService" in states["Endpoint wait exhausted"]["Parameters"]["cause.$"]


# --- the smoke check after InService --------------------------------------------------------------------------


def test_a_smoke_check_runs_between_in_service_and_finish_and_a_failure_rolls_back(built):
    _, _, template = built
    states = all_states(template)
    ready = states["Endpoint ready?"]
    assert ready["Choices"][0]["Next"] == "Smoke test endpoint"  # InService on the new config
    smoke_task = states["Smoke test endpoint"]
    assert smoke_task["Next"] == "Smoke check passed?"
    assert [c["Next"] for c in smoke_task["Catch"]] == ["Smoke check could not run"]
    verdict = states["Smoke check passed?"]
    assert verdict["Choices"][0] == {"Variable": "$.deploy.smoke.passed", "BooleanEquals": True,
                                     "Next": "Finish deploy"}
    assert verdict["Choices"][1]["Next"] == "Roll back endpoint"
    assert verdict["Default"] == "Smoke check failed on first deploy cause"
    roll_back = states["Roll back endpoint"]
    assert roll_back["Resource"].endswith(":states:::aws-sdk:sagemaker:updateEndpoint")
    assert roll_back["Parameters"]["EndpointConfigName.$"] == "$.deploy.release.previousEndpointConfigName"
    assert roll_back["Next"] == "Smoke check failed, rolled back cause"
    for name in ("Smoke check failed, rolled back", "Smoke check failed on first deploy",
                 "Smoke check failed, rollback failed"):
        assert states[name] == {"Type": "Fail", "Error": "SmokeCheckFailed", "CausePath": "$.deploy.failure.cause"}


def test_the_smoke_function_may_invoke_only_the_counting_endpoint(built):
    stack, deploy, template = built
    role = stack.get_logical_id(deploy.smoke.role.node.default_child)
    policies = [p for p in template.find_resources("AWS::IAM::Policy").values()
                if role in json.dumps(p["Properties"]["Roles"])]
    statements = [s for p in policies for s in p["Properties"]["PolicyDocument"]["Statement"]
                  if "sagemaker" in json.dumps(s["Action"])]
    assert len(statements) == 1
    assert statements[0]["Action"] == "sagemaker:InvokeEndpoint"
    assert ":endpoint/invmon-dev-counter" in json.dumps(statements[0]["Resource"])
    assert "*" not in json.dumps(statements[0]["Resource"])
