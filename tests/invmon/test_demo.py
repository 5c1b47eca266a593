"""How the demo shows an execution: each state from the history as it ran, and a failure with its cause."""

from __future__ import annotations

import re

import boto3
import pytest
from moto import mock_aws

from invmon.demo import PipelineFailed, follow


def test_each_state_is_printed_as_it_ran_and_a_failure_with_its_error_and_cause(capsys: pytest.CaptureFixture) -> None:
    definition = {"StartAt": "Prepare", "States": {
        "Prepare": {"Type": "Pass", "Next": "Copy"},
        "Copy": {"Type": "Fail", "Error": "CopyFailed", "Cause": "batch 3 kept failing"}}}
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        sfn = boto3.client("stepfunctions", region_name="us-east-1")
        with pytest.raises(PipelineFailed, match="FAILED: CopyFailed: batch 3 kept failing"):
            follow(sfn, definition, {}, name="failing")
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\s*[\d.]+ s  Pass\s+Prepare", lines[0]), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\s*[\d.]+ s  Fail\s+Copy", lines[1]), lines
    assert lines[-1].endswith("ExecutionFailed: CopyFailed: batch 3 kept failing"), lines


def test_a_succeeded_execution_ends_with_its_line(capsys: pytest.CaptureFixture) -> None:
    definition = {"StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True, "Result": {"ok": 1}}}}
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        sfn = boto3.client("stepfunctions", region_name="us-east-1")
        assert follow(sfn, definition, {}, name="fine").output == {"ok": 1}
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("ExecutionSucceeded")
