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
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\s*[\d.]+ s  └ Prepare: [\d.]+ s", lines.pop(1)), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\s*[\d.]+ s  Pass\s+Prepare", lines[0]), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\s*[\d.]+ s  Fail\s+Copy", lines[1]), lines
    assert lines[-1].endswith("ExecutionFailed: CopyFailed: batch 3 kept failing"), lines


def test_a_succeeded_execution_ends_with_its_line(capsys: pytest.CaptureFixture) -> None:
    definition = {"StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True, "Result": {"ok": 1}}}}
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        sfn = boto3.client("stepfunctions", region_name="us-east-1")
        assert follow(sfn, definition, {}, name="fine").output == {"ok": 1}
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("ExecutionSucceeded")


def _result(rows: list[dict], decision: str = "skip") -> object:
    from pathlib import Path

    from invmon.demo import DemoResult

    return DemoResult(rows=rows, metrics={}, evaluation={}, decision={"decision": decision}, workdir=Path("."),
                      in_service="models/abid-effnet-lite0")


def _row(photo: str, status: str, model: str | None = "efficientnet-lite0") -> dict:
    record = {"status": status, "count": 2, "confidence": 0.9, "decidedBy": "model"}
    if model:
        record["model"] = model
    return {"photo": photo, "truth": 2, "expected": 2, "record": record}


def test_the_table_names_the_counting_model_sums_up_by_status_and_explains_each_status() -> None:
    from invmon.demo import report

    text = report(_result([_row("a.jpg", "match"), _row("b.jpg", "mismatch"), _row("c.jpg", "match"),
                           _row("broken.jpg", "rejected", model=None)]))
    lines = text.splitlines()
    assert lines[0] == ("Counted by the model in service, models/abid-effnet-lite0 (efficientnet-lite0); the deploy "
                        "gate's decision on the demo's model: skip")
    assert "4 uploads: 2 match, 1 mismatch, 1 rejected" in lines
    assert any(line.startswith("  mismatch: the count disagrees with the consignment") for line in lines)
    assert not any(line.startswith("  counted:") for line in lines), "only the statuses the table shows"


def test_every_status_a_record_can_have_has_a_legend_line() -> None:
    from invmon.demo import STATUS_LEGEND
    from lambdas.count.records import STATUSES

    assert set(STATUSES) <= set(STATUS_LEGEND)


def test_each_state_says_how_long_it_took_when_it_exits() -> None:
    from datetime import UTC, datetime, timedelta

    from invmon.demo import HistoryPrinter

    lines: list[str] = []
    printer = HistoryPrinter(say=lines.append)
    t0 = datetime(2026, 12, 6, 13, 0, tzinfo=UTC)
    printer({"type": "TaskStateEntered", "timestamp": t0, "stateEnteredEventDetails": {"name": "TrainModel"}})
    printer({"type": "TaskStateExited", "timestamp": t0 + timedelta(seconds=85.24),
             "stateExitedEventDetails": {"name": "TrainModel"}})
    assert lines[1].endswith("└ TrainModel: 85.2 s")


def test_a_consignment_above_the_exact_classes_shows_the_overflow_probability_that_decided_it() -> None:
    from invmon.demo import report

    overflowing = _row("08800.jpg", "match")
    overflowing["truth"] = overflowing["expected"] = 20
    overflowing["record"] |= {"count": 4, "overflowClass": 6, "classes": list(range(7)),
                              "probabilities": [0.0, 0.01, 0.02, 0.06, 0.1, 0.1, 0.71]}
    rows = {line.split()[0]: line for line in report(_result([overflowing, _row("a.jpg", "match")])).splitlines()
            if line.endswith(".jpg") or ".jpg " in line}
    assert "4; 6+ at 0.71" in rows["08800.jpg"]
    assert "6+" not in rows["a.jpg"]  # an exact consignment shows the exact count alone
