"""The report step carries the trainer's own health findings (ml/health.py) into the report and $.training."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

from lambdas.training import report
from ml.health import HEALTH_FILE, TrainingMonitor
from tests.lambdas.test_training import BUCKET, aws, describe_job, stored_report  # noqa: F401 (aws: fixture)


def trainer_health() -> dict[str, Any]:
    """health.json as the trainer writes it, from the real monitor: an epoch that overfits and starves."""
    monitor = TrainingMonitor(log=lambda *a, **k: None)
    history = []
    for epoch, (train, valid) in enumerate([(2.0, 2.0), (1.5, 1.7), (1.2, 1.8), (1.0, 1.9)]):
        for step in range(3):
            monitor.step(epoch=epoch, step=step, loss=train, grad_norm=2.0, data_seconds=0.05, step_seconds=0.1)
        history.append({"epoch": epoch + 1, "train_loss": train, "valid_loss": valid})
        monitor.end_epoch(history)
    return monitor.summary()


def output_archive(files: dict[str, Any], *, metrics: bool = True) -> bytes:
    """output.tar.gz with these JSON files, plus the trainer's metrics unless ``metrics`` is false."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        base = {"metrics.json": {"valid_accuracy": 0.5, "valid_rmse": 1.0}} if metrics else {}
        for name, body in (base | files).items():
            data = json.dumps(body).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_report_carries_the_trainers_health_findings(aws: Any, lambda_context: Any) -> None:  # noqa: F811
    s3, stubber = aws
    name = "invmon-dev-261125150405-health"
    health = trainer_health()
    s3.put_object(Bucket=BUCKET, Key=f"models/{name}/output/output.tar.gz", Body=output_archive({HEALTH_FILE: health}))
    stubber.add_response("describe_training_job",
                         describe_job(name, DebugRuleEvaluationStatuses=[], ProfilerRuleEvaluationStatuses=[]),
                         {"TrainingJobName": name})
    state = report.handler({"mode": "training", "jobName": name}, lambda_context)

    assert state["health"]["status"] == "warning"
    checks = {(f["check"], f["epoch"]) for f in state["health"]["findings"]}
    assert ("overfitting", 4) in checks and ("data_starvation", 1) in checks
    assert all(f["message"] for f in state["health"]["findings"])
    assert state["findings"] == [] and state["rulesPending"] is False  # no Debugger, nothing to wait for
    stored = stored_report(s3, state["reportKey"])
    assert stored["health"] == health  # the whole file, per-epoch figures included
    assert stored["health"]["epochs"][0]["grad_norm_median"] == 2.0


def test_a_job_without_health_json_reports_none(aws: Any, lambda_context: Any) -> None:  # noqa: F811
    s3, stubber = aws
    name = "invmon-dev-261125150405-nohealth"
    s3.put_object(Bucket=BUCKET, Key=f"models/{name}/output/output.tar.gz", Body=output_archive({}))
    stubber.add_response("describe_training_job", describe_job(name, ProfilerRuleEvaluationStatuses=[]),
                         {"TrainingJobName": name})
    state = report.handler({"mode": "training", "jobName": name}, lambda_context)
    assert state["health"] is None and state["problems"] == []


def test_health_is_carried_even_when_the_metrics_file_is_missing(aws: Any, lambda_context: Any) -> None:  # noqa: F811
    s3, stubber = aws
    name = "invmon-dev-261125150405-healthonly"
    health = trainer_health()
    s3.put_object(Bucket=BUCKET, Key=f"models/{name}/output/output.tar.gz",
                  Body=output_archive({HEALTH_FILE: health}, metrics=False))
    stubber.add_response("describe_training_job", describe_job(name, ProfilerRuleEvaluationStatuses=[]),
                         {"TrainingJobName": name})
    state = report.handler({"mode": "training", "jobName": name}, lambda_context)
    assert state["health"]["status"] == "warning"
    assert any("no metrics JSON" in problem for problem in state["problems"])


def test_many_findings_are_capped_in_the_state_and_counted() -> None:
    health = {"status": "warning", "findings": [{"check": "overfitting", "severity": "warning", "epoch": i,
                                                 "message": "m", "value": 1.0} for i in range(30)]}
    state = report.health_state(health)
    assert len(state["findings"]) == report.MAX_STATE_FINDINGS and state["findingsLeftOut"] == 10
    assert set(state["findings"][0]) == {"check", "severity", "epoch", "message"}
