"""The pipeline's composition: input kept, stages in order, every stage's failure caught and reported."""

from __future__ import annotations

import json

import aws_cdk as cdk
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk.assertions import Template
from constructs import Construct

from infra.config import load_settings
from infra.pipeline import Pipeline, Stage
from tests.infra.conftest import definition_of, echo_input_check


class _Fragment(sfn.StateMachineFragment):
    def __init__(self, scope: Construct, construct_id: str, *, result: dict) -> None:
        super().__init__(scope, construct_id)
        self._state = sfn.Pass(
            self, f"{construct_id} work", result=sfn.Result.from_object(result), result_path=f"$.{construct_id.lower()}"
        )

    @property
    def start_state(self) -> sfn.State:
        return self._state

    @property
    def end_states(self) -> list[sfn.INextable]:
        return [self._state]


def _definition() -> tuple[dict, dict]:
    stack = cdk.Stack(cdk.App())
    check = echo_input_check(stack)
    pipeline = Pipeline(
        stack,
        "Pipeline",
        settings=load_settings(),
        stages=[
            Stage("ingest", _Fragment(stack, "Ingest", result={"runId": "r"})),
            Stage("training", _Fragment(stack, "Training", result={"jobName": "j"})),
        ],
        input_check=check,
    )
    template = Template.from_stack(stack)
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    assert pipeline.state_machine.node.scope is pipeline
    return machine, definition_of(machine)


def test_the_first_state_checks_the_whole_input_and_only_the_normalized_input_is_carried_on():
    machine, definition = _definition()
    assert definition["StartAt"] == "Check input"
    check = definition["States"]["Check input"]
    assert check["Type"] == "Task" and check["Resource"] == "${ref}"  # the function itself: payloadResponseOnly
    # The input is passed whole, not wrapped: a wrapper around a 262,144-byte input would overflow the state.
    assert "Parameters" not in check and check.get("InputPath", "$") == "$"
    assert check["ResultSelector"] == {"input.$": "$", "execution.$": "$$.Execution.Name"}
    assert check["ResultPath"] == "$"
    assert "Catch" not in check  # a refusal ends the execution here, with the function's cause
    assert check["Next"] == "Ingest stage"
    # No later state reaches for the raw execution input.
    assert "$$.Execution.Input" not in json.dumps(machine)
    assert definition["States"]["Ingest stage"]["Next"] == "Training stage"
    assert definition["States"]["Training stage"]["Next"] == "Pipeline succeeded"


def test_every_stage_failure_is_caught_and_fails_the_execution_with_the_stage_named():
    _, definition = _definition()
    for stage in ("ingest", "training"):
        wrapper = definition["States"][f"{stage.capitalize()} stage"]
        assert wrapper["Type"] == "Parallel"
        assert wrapper["OutputPath"] == "$[0]"
        (catch,) = wrapper["Catch"]
        assert catch["ErrorEquals"] == ["States.ALL"]
        # A failure without a cause (States.Timeout) is recorded by the error's name instead.
        has_cause = definition["States"][catch["Next"]]
        record = definition["States"][has_cause["Default"]]
        (causeless_name,) = {c["Next"] for c in has_cause["Choices"]}
        causeless = definition["States"][causeless_name]
        assert f"'{stage}'" in record["Parameters"]["Cause.$"]
        assert "came with no cause" in causeless["Parameters"]["Cause.$"]
        assert causeless["Next"] == record["Next"]
        assert definition["States"][record["Next"]] == {
            "Type": "Fail",
            "Comment": "A stage failed after cleaning up; the cause says which stage and why",
            "ErrorPath": "$.error.Error",
            "CausePath": "$.error.Cause",
        }


def test_state_machine_logs_everything_and_traces():
    machine, _ = _definition()
    props = machine["Properties"]
    assert props["TracingConfiguration"] == {"Enabled": True}
    assert props["LoggingConfiguration"]["Level"] == "ALL"
    assert props["LoggingConfiguration"]["IncludeExecutionData"] is True
