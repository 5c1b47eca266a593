"""Self-checks of invmon/execution.py: each moto behaviour it works around is measured here, so that a moto
that behaves otherwise fails these tests loudly (and the workaround can go) instead of silently changing what
the execution tests exercise. Measured on moto 5.2.5."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from invmon import execution as offline


@pytest.fixture
def sfn() -> Iterator[Any]:
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield boto3.client("stepfunctions", region_name=offline.REGION)


def register(sfn: Any, definition: dict[str, Any]) -> str:
    return sfn.create_state_machine(name="probe", definition=json.dumps(definition),
                                    roleArn=f"arn:aws:iam::{offline.ACCOUNT}:role/probe")["stateMachineArn"]


def distributed_map(**fields: Any) -> dict[str, Any]:
    return {"StartAt": "Map", "States": {"Map": {
        "Type": "Map", "End": True, "ItemsPath": "$.items",
        "ItemProcessor": {"ProcessorConfig": {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"},
                          "StartAt": "Item", "States": {"Item": {"Type": "Pass", "End": True}}},
        **fields}}}


def test_moto_rejects_item_batcher_and_an_integer_tolerated_percentage_which_for_moto_rewrites(sfn: Any) -> None:
    register(sfn, distributed_map())
    for fields in ({"ItemBatcher": {"MaxItemsPerBatch": 100}}, {"ToleratedFailurePercentage": 5}):
        with pytest.raises(ClientError, match="ASLParserException"):
            register(sfn, distributed_map(**fields))
        register(sfn, offline.for_moto(distributed_map(**fields)))


def test_moto_refuses_a_sagemaker_sync_task_that_the_bridge_answers(sfn: Any) -> None:
    definition = {"StartAt": "Train", "States": {"Train": {
        "Type": "Task", "End": True, "Resource": "arn:aws:states:::sagemaker:createTrainingJob.sync",
        "Parameters": {"TrainingJobName": "x"}}}}
    refused = offline.run(sfn, definition, {})
    assert refused.status == "FAILED"
    assert refused.error == "States.Runtime"
    assert "Unsupported sync callback procedure" in refused.cause
    with offline.interpreter(offline.InProcessLambda({}), offline.SageMakerBridge()):
        answered = offline.run(sfn, definition, {})
    # The bridge took the task, and refused its request by botocore's model (no RoleArn, no resources).
    assert "CreateTrainingJob request rejected by botocore's model" in answered.cause


def test_moto_crashes_on_a_states_error_from_a_branch_and_once_patched_catches_states_runtime(sfn: Any) -> None:
    # A States.Runtime error in a branch (a Fail state's CausePath that is absent) ends the execution on AWS:
    # no Catch catches States.Runtime. moto crashes passing a States.* name on; with that patched, its
    # catch-all catches it. So no execution test may trust a caught failure: each calls
    # Execution.assert_no_runtime_error, which finds this one.
    definition = {"StartAt": "Stage", "States": {
        "Stage": {"Type": "Parallel", "End": True,
                  "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "Caught", "ResultPath": "$.failure"}],
                  "Branches": [{"StartAt": "Read", "States": {
                      "Read": {"Type": "Fail", "Error": "X", "CausePath": "$.absent"}}}]},
        "Caught": {"Type": "Pass", "End": True}}}
    crashed = offline.run(sfn, definition, {})
    assert crashed.status == "FAILED"
    assert "Custom Error Names MUST NOT begin with the prefix 'States.'" in crashed.cause
    with offline.interpreter(offline.InProcessLambda({}), offline.SageMakerBridge()):
        caught = offline.run(sfn, definition, {}, name="patched")
    assert caught.status == "SUCCEEDED"
    assert caught.output["failure"]["Error"] == "States.Runtime"
    with pytest.raises(AssertionError):
        caught.assert_no_runtime_error()


def test_moto_has_no_stop_training_job_or_update_endpoint() -> None:
    from moto.sagemaker.responses import SageMakerResponse

    assert not hasattr(SageMakerResponse, "stop_training_job")
    assert not hasattr(SageMakerResponse, "stop_hyper_parameter_tuning_job")
    assert not hasattr(SageMakerResponse, "update_endpoint")


def test_moto_leaves_role_arn_path_keys_unresolved_which_the_bridge_resolves(sfn: Any) -> None:
    state_input = {"request": {"RoleArn": "arn:aws:iam::123456789012:role/r", "Name": "n"}}
    definition = {"StartAt": "Shape", "States": {"Shape": {
        "Type": "Pass", "End": True, "Parameters": {"RoleArn.$": "$.request.RoleArn", "Name.$": "$.request.Name"}}}}
    output = offline.run(sfn, definition, state_input).output
    assert output == {"RoleArn.$": "$.request.RoleArn", "Name": "n"}
    assert offline.resolve_literal_path_keys(output, state_input) == {
        "RoleArn": "arn:aws:iam::123456789012:role/r", "Name": "n"}


def test_the_bridge_refuses_a_request_botocores_model_rejects() -> None:
    with pytest.raises(AssertionError, match="CreateTrainingJob request rejected"):
        offline.validate_sagemaker_request("CreateTrainingJob", {"TrainingJobName": "x"})


def test_waits_and_retries_are_scaled_down_for_moto() -> None:
    definition = {"StartAt": "Wait", "States": {
        "Wait": {"Type": "Wait", "Seconds": 60, "Next": "Task"},
        "Task": {"Type": "Task", "Resource": "arn:aws:states:::lambda:invoke", "End": True,
                 "Retry": [{"ErrorEquals": ["X"], "IntervalSeconds": 30, "BackoffRate": 2, "MaxAttempts": 3,
                            "JitterStrategy": "FULL"}]}}}
    rewritten = offline.for_moto(definition)
    assert rewritten["States"]["Wait"]["Seconds"] == 0
    assert rewritten["States"]["Task"]["Retry"] == [
        {"ErrorEquals": ["X"], "IntervalSeconds": 1, "BackoffRate": 1.0, "MaxAttempts": 3}]


def test_moto_lets_a_distributed_map_succeed_whatever_fails_in_it(sfn: Any) -> None:
    # One failed item of two is over a 0 % tolerance: AWS fails the Map (States.ExceedToleratedFailureThreshold),
    # moto lets it succeed with a null result for the failed item. The copy-batch execution test asserts only
    # what both give (the ingest stage fails); revisit it when this changes.
    definition = {"StartAt": "Map", "States": {"Map": {
        "Type": "Map", "End": True, "ItemsPath": "$.items", "ToleratedFailurePercentage": 0.0,
        "ItemProcessor": {"ProcessorConfig": {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"},
                          "StartAt": "Item", "States": {
                              "Item": {"Type": "Choice", "Default": "Done",
                                       "Choices": [{"Variable": "$", "StringEquals": "bad", "Next": "Fail"}]},
                              "Fail": {"Type": "Fail", "Error": "Bad"},
                              "Done": {"Type": "Succeed"}}}}}}
    execution = offline.run(sfn, definition, {"items": ["good", "bad"]})
    assert execution.status == "SUCCEEDED"
    assert execution.output == ["good", None]


def test_a_moto_server_in_this_process_runs_executions_once_enable_interpreter_points_it_at_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo's case: no mock, a moto server on a free port. moto's interpreter is off by default, and its SDK
    # tasks call http://localhost:$MOTO_PORT (5000 unless set): enable_interpreter sets both.
    from moto.core.config import default_user_config

    from invmon.local import MotoServer

    monkeypatch.delenv("MOTO_PORT", raising=False)
    saved = dict(default_user_config["stepfunctions"])
    definition = {"StartAt": "List", "States": {"List": {
        "Type": "Task", "Resource": "arn:aws:states:::aws-sdk:dynamodb:listTables", "End": True}}}
    try:
        with MotoServer() as server:
            boto3.client("dynamodb").create_table(
                TableName="probe", KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
            sfn = boto3.client("stepfunctions")
            plain = offline.start(sfn, definition, {}, name="off")
            time.sleep(1)
            # moto's plain backend runs nothing: the execution stays RUNNING, its history a canned one.
            assert sfn.describe_execution(executionArn=plain)["status"] == "RUNNING"
            assert "List" not in offline.Execution(
                "RUNNING", None, None, None, offline.history(sfn, plain)).states_entered()
            offline.enable_interpreter(server.url)
            execution = offline.run(sfn, definition, {}, name="on")
    finally:
        default_user_config["stepfunctions"] = saved
    assert execution.status == "SUCCEEDED", execution.cause
    assert execution.output["TableNames"] == ["probe"]  # the SDK task reached this server


def test_items_are_batched_as_the_item_batcher_batches_them() -> None:
    items = [{"image_id": f"{i:05d}"} for i in range(7)]
    assert [len(b["Items"]) for b in offline.batches_of(items, {"MaxItemsPerBatch": 3})] == [3, 3, 1]
    (batch,) = offline.batches_of(items[:2], {"MaxItemsPerBatch": 5, "BatchInput": {"run": "r"}})
    assert batch == {"BatchInput": {"run": "r"}, "Items": items[:2]}
    big = [{"pad": "x" * 100_000} for _ in range(5)]
    assert [len(b["Items"]) for b in offline.batches_of(big, {"MaxItemsPerBatch": 100})] == [2, 2, 1]  # 256 KiB


def test_for_moto_takes_the_item_batcher_out_and_records_it_by_map_name() -> None:
    definition = {"StartAt": "Copy", "States": {"Copy": {
        "Type": "Map", "End": True, "ItemBatcher": {"MaxItemsPerBatch": 25},
        "ItemProcessor": {"StartAt": "Work", "States": {"Work": {"Type": "Pass", "End": True}}}}}}
    rewritten = offline.for_moto(definition)
    assert "ItemBatcher" not in rewritten["States"]["Copy"]
    assert "Parameters" not in rewritten["States"]["Copy"]["ItemProcessor"]["States"]["Work"]
    assert offline.ITEM_BATCHERS["Copy"] == {"MaxItemsPerBatch": 25}
