"""Deploy gate, release and finish: the decisions, the create path under moto, the blue/green update path
with botocore's Stubber (moto has no UpdateEndpoint), autoscaling and the in-service record."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import boto3
import botocore.session
import pytest
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
from moto import mock_aws

from lambdas.deploy import finish, gate, lock, plan, release, smoke

BUCKET = "invmon-data-test"
ROLE = "arn:aws:iam::123456789012:role/invmon-inference"
KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ARTIFACT = f"s3://{BUCKET}/models/job-1/output/model.tar.gz"
SERVERLESS = plan.EndpointSettings(
    endpoint_name="invmon-dev-counter", mode="serverless", serverless_memory_mb=3072,
    serverless_max_concurrency=5, instance_type="ml.c6i.large", min_instances=1, max_instances=4,
    target_invocations_per_instance=100, min_improvement=0.0,
    image_uri="763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.3-cpu-py311", role_arn=ROLE,
    rollback_alarms=["invmon-dev-counter-invocation-5xx"], bake_seconds=300, kms_key_arn=KEY,
)
REALTIME = replace(SERVERLESS, mode="realtime", min_instances=2, max_instances=4)


def training(accuracy: float | None, rmse: float = 1.0) -> dict:
    metrics = {"valid_rmse": rmse} | ({} if accuracy is None else {"valid_accuracy": accuracy})
    return {"jobName": "job-1", "modelArtifact": ARTIFACT, "metrics": metrics, "tuningJobName": None}


def in_service(accuracy: float, rmse: float = 1.0, settings: plan.EndpointSettings = SERVERLESS) -> dict:
    return {"metrics": {"valid_accuracy": accuracy, "valid_rmse": rmse}, "servingShape": settings.serving_shape()}


# --- the gate's decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "current", "margin", "force", "decision", "why"),
    [
        (training(0.40), None, 0.0, False, "deploy", "no model is in service"),
        (training(0.42), in_service(0.40), 0.01, False, "deploy", "better by at least the margin"),
        (training(0.405), in_service(0.40), 0.01, False, "skip", "by less than the margin"),
        (training(0.38), in_service(0.40), 0.0, False, "skip", "not better"),
        (training(0.40), in_service(0.40), 0.0, False, "skip", "not better"),
        (training(0.40, rmse=0.9), in_service(0.40, rmse=1.0), 0.0, False, "deploy", "tie broken by valid_rmse"),
        (training(0.30), in_service(0.40), 0.0, True, "deploy", "forced by the execution input"),
        (training(None), in_service(0.40), 0.0, False, "skip", "reports no numeric valid_accuracy"),
        (training(0.35), {"metrics": {}}, 0.0, False, "deploy", "has no recorded valid_accuracy"),
        (training(0.38), in_service(0.40, settings=REALTIME), 0.0, False, "deploy", "endpoint settings changed"),
    ],
)
def test_gate_decides_on_accuracy_margin_force_and_settings(new, current, margin, force, decision, why):
    result = plan.decide(new["metrics"], current, margin=margin, force=force,
                         serving_shape=SERVERLESS.serving_shape())
    assert result.decision == decision
    assert any(why in reason for reason in result.reasons), result.reasons


# --- handlers under moto -------------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("DATA_BUCKET", BUCKET)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "deploy")
    for module in (gate, release, finish):
        module.clients.cache_clear()
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        yield {"s3": s3, "sagemaker": boto3.client("sagemaker"),
               "autoscaling": boto3.client("application-autoscaling")}
    for module in (gate, release, finish):
        module.clients.cache_clear()


def use(monkeypatch, settings: plan.EndpointSettings) -> None:
    monkeypatch.setenv("DEPLOY_SETTINGS", settings.to_json())


def report(aws, execution: str) -> dict:
    return json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=f"reports/deploy/{execution}.json")["Body"].read())


def test_first_deploy_creates_model_config_and_serverless_endpoint(aws, monkeypatch, lambda_context):
    use(monkeypatch, SERVERLESS)
    decided = gate.handler({"training": training(0.4), "input": {}, "execution": "run-1"}, lambda_context)
    assert decided["decision"] == "deploy"
    assert decided["reasons"] == ["no model is in service"]
    assert decided["endpointName"] == "invmon-dev-counter"
    assert decided["modelName"].startswith("invmon-dev-counter-") and len(decided["modelName"]) <= 63
    assert report(aws, "run-1")["decision"] == "deploy"

    released = release.handler({"deploy": decided, "training": training(0.4)}, lambda_context)
    assert released["action"] == "create"
    sagemaker = aws["sagemaker"]
    model = sagemaker.describe_model(ModelName=decided["modelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == ARTIFACT
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=released["endpointConfigName"])
    assert config["ProductionVariants"][0]["ServerlessConfig"] == {"MemorySizeInMB": 3072, "MaxConcurrency": 5}
    endpoint = sagemaker.describe_endpoint(EndpointName="invmon-dev-counter")
    assert endpoint["EndpointConfigName"] == released["endpointConfigName"]


def test_gate_skips_a_worse_model_and_records_why(aws, monkeypatch, lambda_context):
    use(monkeypatch, SERVERLESS)
    first = gate.handler({"training": training(0.45), "input": {}, "execution": "run-1"}, lambda_context)
    released = release.handler({"deploy": first, "training": training(0.45)}, lambda_context)
    done = finish.handler({"deploy": first, "release": released, "training": training(0.45), "execution": "run-1"},
                          lambda_context)
    assert done == {"decision": "deploy", "reasons": first["reasons"], "modelName": first["modelName"],
                    "endpointName": "invmon-dev-counter"}

    worse = gate.handler({"training": training(0.41), "input": {}, "execution": "run-2"}, lambda_context)
    assert worse["decision"] == "skip"
    assert worse["modelName"] == first["modelName"]  # the model that stays in service
    recorded = report(aws, "run-2")
    assert recorded["reasons"] == worse["reasons"]
    assert recorded["inService"]["metrics"]["valid_accuracy"] == 0.45
    assert recorded["candidate"]["metrics"]["valid_accuracy"] == 0.41

    forced = gate.handler({"training": training(0.41), "input": {"deploy": {"force": True}}, "execution": "run-3"},
                          lambda_context)
    assert forced["decision"] == "deploy"
    assert forced["reasons"][0] == "forced by the execution input (deploy.force)"


def test_serverless_update_is_blue_green_with_rollback_alarm(monkeypatch):
    sagemaker = botocore.session.get_session().create_client("sagemaker", region_name="us-east-1")
    autoscaling = botocore.session.get_session().create_client("application-autoscaling", region_name="us-east-1")
    stub = Stubber(sagemaker)
    stub.add_response("describe_endpoint", {
        "EndpointName": "invmon-dev-counter", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x",
        "EndpointConfigName": "invmon-dev-counter-old", "EndpointStatus": "InService",
        "CreationTime": "2026-11-01", "LastModifiedTime": "2026-11-01"}, {"EndpointName": "invmon-dev-counter"})
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": "invmon-dev-counter-old", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:ec/old",
        "CreationTime": "2026-11-01",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "old",
                                "ServerlessConfig": {"MemorySizeInMB": 3072, "MaxConcurrency": 5}}]},
        {"EndpointConfigName": "invmon-dev-counter-old"})
    stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/new"},
                      plan.model_request(SERVERLESS, "new", ARTIFACT, "us-east-1"))
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:ec/new"},
                      plan.endpoint_config_request(SERVERLESS, "new", "new"))
    stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x"}, {
        "EndpointName": "invmon-dev-counter", "EndpointConfigName": "new",
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
                "TerminationWaitInSeconds": 300, "MaximumExecutionTimeoutInSeconds": 3000},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "invmon-dev-counter-invocation-5xx"}]},
        }})
    with stub, Stubber(autoscaling):  # no autoscaling call at all for serverless -> serverless
        result = release.release(sagemaker, autoscaling, SERVERLESS, model_name="new", model_data_url=ARTIFACT,
                                 region="us-east-1")
        stub.assert_no_pending_responses()
    assert result == {"action": "update", "modelName": "new", "endpointConfigName": "new",
                      "endpointName": "invmon-dev-counter",
                      # what a failed smoke check rolls back to
                      "previousEndpointConfigName": "invmon-dev-counter-old"}


def test_realtime_update_with_new_instance_type_deregisters_autoscaling_then_canaries(monkeypatch):
    settings = replace(REALTIME, instance_type="ml.c6i.xlarge")
    sagemaker = botocore.session.get_session().create_client("sagemaker", region_name="us-east-1")
    autoscaling = botocore.session.get_session().create_client("application-autoscaling", region_name="us-east-1")
    stub, scaling = Stubber(sagemaker), Stubber(autoscaling)
    stub.add_response("describe_endpoint", {
        "EndpointName": "invmon-dev-counter", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x",
        "EndpointConfigName": "old", "EndpointStatus": "InService",
        "CreationTime": "2026-11-01", "LastModifiedTime": "2026-11-01"})
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": "old", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:ec/old",
        "CreationTime": "2026-11-01",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "old", "InstanceType": "ml.c6i.large",
                                "InitialInstanceCount": 2}]})
    stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/new"})
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:ec/new"},
                      {"EndpointConfigName": "new", "Tags": ANY, "ProductionVariants": [{
                          "VariantName": "AllTraffic", "ModelName": "new", "InstanceType": "ml.c6i.xlarge",
                          "InitialInstanceCount": 2, "InitialVariantWeight": 1.0}], "KmsKeyId": KEY})
    scaling.add_response("deregister_scalable_target", {}, {
        "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/invmon-dev-counter/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"})
    stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x"}, {
        "EndpointName": "invmon-dev-counter", "EndpointConfigName": "new", "DeploymentConfig": ANY})
    with stub, scaling:
        release.release(sagemaker, autoscaling, settings, model_name="new", model_data_url=ARTIFACT,
                        region="us-east-1")
        stub.assert_no_pending_responses()
        scaling.assert_no_pending_responses()
    routing = plan.deployment_config(settings)["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing == {"Type": "CANARY", "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 1},
                       "WaitIntervalInSeconds": 300}


@pytest.mark.parametrize(("settings", "isolated"), [(REALTIME, True), (SERVERLESS, False)])
def test_create_model_names_the_inference_role_and_isolates_the_container_wherever_sagemaker_allows(settings,
                                                                                                     isolated):
    # Serverless Inference lists network isolation among its feature exclusions
    # (docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints.html), so only a real-time model has it.
    request = plan.model_request(settings, "new", ARTIFACT, "us-east-1")
    assert request["ExecutionRoleArn"] == settings.role_arn == ROLE
    assert request["EnableNetworkIsolation"] is isolated


@pytest.mark.parametrize(("settings", "key"), [
    (REALTIME, KEY),
    # No instance volume to encrypt: KmsKeyId is "the storage volume attached to the ML compute instance".
    (SERVERLESS, None),
    # Local NVMe storage: CreateEndpointConfig fails if KmsKeyId is given (API reference, KmsKeyId).
    (replace(REALTIME, instance_type="ml.g5.xlarge"), None),
    (replace(REALTIME, kms_key_arn=""), None),
])
def test_a_realtime_endpoint_config_encrypts_its_instance_volumes_with_the_data_key(settings, key):
    assert plan.endpoint_config_request(settings, "new", "new").get("KmsKeyId") == key


def test_realtime_to_serverless_is_refused_before_anything_is_created():
    sagemaker = botocore.session.get_session().create_client("sagemaker", region_name="us-east-1")
    stub = Stubber(sagemaker)
    stub.add_response("describe_endpoint", {
        "EndpointName": "invmon-dev-counter", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x",
        "EndpointConfigName": "old", "EndpointStatus": "InService",
        "CreationTime": "2026-11-01", "LastModifiedTime": "2026-11-01"})
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": "old", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:ec/old",
        "CreationTime": "2026-11-01",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "old", "InstanceType": "ml.c6i.large",
                                "InitialInstanceCount": 1}]})
    with stub, pytest.raises(release.UnsupportedChange, match="delete the endpoint"):
        release.release(sagemaker, None, SERVERLESS, model_name="new", model_data_url=ARTIFACT, region="us-east-1")
    stub.assert_no_pending_responses()


def test_single_instance_realtime_shifts_all_at_once():
    routing = plan.deployment_config(replace(REALTIME, min_instances=1))["BlueGreenUpdatePolicy"]
    assert routing["TrafficRoutingConfiguration"]["Type"] == "ALL_AT_ONCE"


@pytest.mark.parametrize(("status", "error"), [("Updating", release.EndpointBusy),
                                                ("Failed", release.EndpointFailed)])
def test_release_refuses_an_endpoint_that_cannot_take_an_update(status, error):
    sagemaker = botocore.session.get_session().create_client("sagemaker", region_name="us-east-1")
    stub = Stubber(sagemaker)
    stub.add_response("describe_endpoint", {
        "EndpointName": "invmon-dev-counter", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/x",
        "EndpointConfigName": "old", "EndpointStatus": status, "FailureReason": "image not found",
        "CreationTime": "2026-11-01", "LastModifiedTime": "2026-11-01"})
    with stub, pytest.raises(error):  # nothing is created: no further call is stubbed
        release.release(sagemaker, None, SERVERLESS, model_name="new", model_data_url=ARTIFACT, region="us-east-1")


def test_finish_registers_realtime_autoscaling_and_records_the_model_in_service(aws, monkeypatch, lambda_context):
    use(monkeypatch, REALTIME)
    event = {"deploy": {"decision": "deploy", "reasons": ["no model is in service"], "modelName": "m1",
                        "endpointName": "invmon-dev-counter"},
             "release": {"action": "create", "modelName": "m1", "endpointConfigName": "m1"},
             "training": training(0.5), "execution": "run-9"}
    result = finish.handler(event, lambda_context)
    assert result["modelName"] == "m1"
    autoscaling = aws["autoscaling"]
    targets = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [
        ("endpoint/invmon-dev-counter/variant/AllTraffic", 2, 4)]
    policy = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"][0]
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    assert config["TargetValue"] == 100.0
    record = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=plan.in_service_key("invmon-dev-counter"))
                        ["Body"].read())
    assert record["metrics"]["valid_accuracy"] == 0.5
    assert record["servingShape"]["mode"] == "realtime"


# --- the deploy lock -----------------------------------------------------------------------------------


@pytest.fixture
def lock_table():
    with mock_aws():
        dynamodb = boto3.resource("dynamodb", region_name="us-east-1")
        yield dynamodb.create_table(
            TableName="locks", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": lock.KEY, "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": lock.KEY, "AttributeType": "S"}],
        )


def test_a_second_deploy_is_refused_while_the_first_holds_the_lock(lock_table) -> None:
    lock.acquire(lock_table, "counter", "arn:first", "first", lease_seconds=600, now=1000)
    with pytest.raises(lock.DeployLockHeld, match="another deploy is in progress: first holds the deploy lock"):
        lock.acquire(lock_table, "counter", "arn:second", "second", lease_seconds=600, now=1100)


def test_the_lock_is_taken_again_by_its_own_holder_and_after_release(lock_table) -> None:
    lock.acquire(lock_table, "counter", "arn:first", "first", lease_seconds=600, now=1000)
    lock.acquire(lock_table, "counter", "arn:first", "first", lease_seconds=600, now=1001)  # a retried invoke
    assert lock.release(lock_table, "counter", "arn:first") == {"endpoint": "counter", "released": True}
    assert lock.acquire(lock_table, "counter", "arn:second", "second", lease_seconds=600, now=1002)["owner"] \
        == "arn:second"


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_release_it(lock_table) -> None:
    lock.acquire(lock_table, "counter", "arn:first", "first", lease_seconds=600, now=1000)
    lock.acquire(lock_table, "counter", "arn:second", "second", lease_seconds=600, now=1601)
    assert lock.release(lock_table, "counter", "arn:first")["released"] is False
    assert lock_table.get_item(Key={lock.KEY: "counter"})["Item"]["owner"] == "arn:second"


# --- the new model's operating point (ml.decisions) ------------------------------------------------------

GOOD_POINT = {"valid_accuracy": 0.46, "op_count_threshold": 0.74, "op_match_max_discrepancy": 0.02,
              "op_mismatch_min_discrepancy": 0.32, "op_decisions_taken": 3.0}
BROKEN_AT_THE_GATE = {
    "NaN": ("op_match_max_discrepancy", float("nan"), "finite number"),
    "infinity": ("op_count_threshold", float("inf"), "finite number"),
    "string": ("op_mismatch_min_discrepancy", "0.3", "finite number"),
    "list": ("op_count_threshold", [0.7], "finite number"),
    "inverted": ("op_match_max_discrepancy", 0.5, "must be below"),
    "out of range": ("op_mismatch_min_discrepancy", 1.2, "in [0, 1]"),
}


@pytest.mark.parametrize("case", BROKEN_AT_THE_GATE)
def test_gate_refuses_thresholds_that_cannot_be_served_naming_the_key(case):
    name, value, says = BROKEN_AT_THE_GATE[case]
    result = plan.decide(GOOD_POINT | {name: value}, None, margin=0.0, force=True)
    assert result.decision == "skip"
    reason = result.reasons[0]
    assert name.removeprefix("op_") in reason and says in reason
    # A model the comparison keeps out anyway says so first, and the cause after.
    worse = plan.decide(GOOD_POINT | {name: value}, {"metrics": {"valid_accuracy": 0.5}}, margin=0.0)
    assert worse.reasons[0].startswith("valid_accuracy") and says in worse.reasons[-1]


def test_gate_refuses_a_model_that_decides_nothing_even_when_forced():
    nothing = {"valid_accuracy": 0.46, "op_decisions_taken": 0.0, "op_count_coverage": 0.0}
    result = plan.decide(nothing, None, margin=0.0, force=True)
    assert result.decision == "skip"
    assert "decides nothing" in result.reasons[0] and "every upload would stay uncounted" in result.reasons[0]
    # One decision is enough to serve; a model with no operating point at all is judged as before.
    one = {"valid_accuracy": 0.46, "op_decisions_taken": 1.0, "op_mismatch_min_discrepancy": 0.3}
    assert plan.decide(one, None, margin=0.0).decision == "deploy"
    assert plan.decide({"valid_accuracy": 0.46}, None, margin=0.0).decision == "deploy"


def test_gate_handler_records_why_a_model_that_decides_nothing_stays_out(aws, monkeypatch, lambda_context):
    use(monkeypatch, SERVERLESS)
    candidate = training(0.5)
    candidate["metrics"] |= {"op_decisions_taken": 0.0}
    result = gate.handler({"training": candidate, "input": {}, "execution": "run-9"}, lambda_context)
    assert result["decision"] == "skip"
    assert "decides nothing" in report(aws, "run-9")["reasons"][0]


# ------------------------------------------------------------------------------------------------- smoke check


def runtime_answering(*answers: bytes | tuple[str, int]) -> tuple[object, Stubber]:
    runtime = botocore.session.get_session().create_client("sagemaker-runtime", region_name="us-east-1")
    stub = Stubber(runtime)
    expected = {"EndpointName": "invmon-dev-counter", "ContentType": "image/jpeg", "Accept": "application/json",
                "Body": smoke.PHOTO.read_bytes()}
    for answer in answers:
        if isinstance(answer, tuple):
            code, status = answer
            stub.add_client_error("invoke_endpoint", service_error_code=code, http_status_code=status,
                                  service_message="Received server error (500) from primary", expected_params=expected)
        else:
            stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(answer), len(answer))}, expected)
    return runtime, stub


def test_the_smoke_photo_is_a_real_jpeg_within_invoke_endpoints_payload_limits():
    photo = smoke.PHOTO.read_bytes()
    assert photo.startswith(b"\xff\xd8\xff")  # JPEG, as the count Lambda sniffs it
    # InvokeEndpoint: Body at most 6 MB (botocore's model), a serverless endpoint's request at most 4 MB
    # ("Invoke a serverless endpoint", SageMaker developer guide); the Lambda asset stays small.
    body = botocore.session.get_session().get_service_model("sagemaker-runtime").operation_model(
        "InvokeEndpoint").input_shape.members["Body"]
    assert body.metadata["max"] == 6 * 1024 * 1024
    assert len(photo) <= smoke.MAX_BODY_BYTES == 4 * 1024 * 1024
    assert len(photo) < 64 * 1024
    # "the SDK socket timeout should be set to be 70 seconds" (InvokeEndpoint API reference), each try within
    # the function's timeout.
    assert smoke.READ_TIMEOUT_SECONDS == 70
    assert smoke.LAMBDA_TIMEOUT_SECONDS > smoke.ATTEMPTS * (smoke.READ_TIMEOUT_SECONDS + smoke.CONNECT_TIMEOUT_SECONDS)


def check(runtime) -> dict:
    return smoke.check(runtime, "invmon-dev-counter", smoke.PHOTO.read_bytes(), expected=smoke.PHOTO_EXPECTED,
                       threshold=None, error_rate=0.05)


def test_a_smoke_answer_the_count_lambda_accepts_passes():
    answer = {"count": 3, "confidence": 0.8, "classes": [0, 1, 2, 3, 4, 5, 6],
              "probabilities": [0.02, 0.03, 0.05, 0.8, 0.05, 0.03, 0.02], "model": "m", "overflow_class": 6}
    runtime, stub = runtime_answering(json.dumps(answer).encode())
    with stub:
        result = check(runtime)
    assert result == {"passed": True, "cause": None, "count": 3, "status": "match"}


@pytest.mark.parametrize(("answer", "cause"), [
    (b"<html>502</html>", "the endpoint's answer is not JSON"),
    (json.dumps({"count": 3, "confidence": float("nan"), "classes": [3], "probabilities": [1.0],
                 "model": "m"}).encode(), "confidence"),
    (json.dumps({"count": 2, "confidence": 0.9, "classes": [0, 1], "probabilities": [0.1, 0.9],
                 "model": "m"}).encode(), "count 2 is not among the classes"),
    (("ModelError", 424), "InvokeEndpoint answered ModelError: Received server error (500) from primary"),
])
def test_a_smoke_answer_the_count_lambda_would_refuse_fails_with_its_cause(answer, cause):
    runtime, stub = runtime_answering(answer)
    with stub:
        result = check(runtime)
    assert result["passed"] is False
    assert result["cause"].startswith("smoke check of endpoint invmon-dev-counter failed: ")
    assert cause in result["cause"]
