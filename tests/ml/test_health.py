"""Training health without SageMaker Debugger: the checks, the monitor, and what real trainer runs write."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest

from lambdas.training.request import metric_definitions
from ml.health import (
    HEALTH_FILE,
    Thresholds,
    TrainingMonitor,
    data_wait_share,
    diverging,
    gradient_state,
    loss_not_decreasing,
    overfitting,
)
from ml.profiling import PROFILE_DIR, PROFILE_JSON, PROFILE_TABLE, STAGES, stage_table
from tests.ml.conftest import TINY_ARGS, run_train


def quiet(*args: object, **kwargs: object) -> None:
    pass


# --- the pure checks --------------------------------------------------------------------------------------


def test_loss_not_decreasing_needs_patience_epochs_without_improvement() -> None:
    assert not loss_not_decreasing([2.0, 1.5, 1.2, 1.0], patience=2, min_improvement=0.01)
    assert loss_not_decreasing([2.0, 1.5, 1.5, 1.49], patience=2, min_improvement=0.01)
    # Too few epochs to say.
    assert not loss_not_decreasing([2.0, 2.0], patience=2, min_improvement=0.01)


def test_overfitting_is_validation_rising_while_training_falls_for_patience_epochs() -> None:
    train = [2.0, 1.5, 1.2, 1.0]
    assert overfitting(train, [2.1, 1.8, 1.9, 2.0], patience=2)
    assert not overfitting(train, [2.1, 1.8, 1.9, 1.85], patience=2)  # fell again in the last epoch
    assert not overfitting([2.0, 1.5, 1.6, 1.7], [2.1, 1.8, 1.9, 2.0], patience=2)  # both rising: divergence


def test_gradient_state_and_divergence_bounds() -> None:
    t = Thresholds()
    assert gradient_state(1e-9, t) == "vanishing"
    assert gradient_state(5e3, t) == "exploding"
    assert gradient_state(3.0, t) is None
    assert diverging(400.0, 2.5, 100) and not diverging(200.0, 2.5, 100) and not diverging(1e9, None, 100)


def test_data_wait_share_leaves_out_the_warm_up_step() -> None:
    assert data_wait_share([5.0, 0.1, 0.1], [6.0, 1.0, 1.0]) == pytest.approx(0.1)


# --- the monitor ------------------------------------------------------------------------------------------


def feed_epoch(monitor: TrainingMonitor, epoch: int, *, grad: float = 1.0, data: float = 0.01) -> None:
    for step in range(4):
        monitor.step(epoch=epoch, step=step, loss=2.0, grad_norm=grad, data_seconds=data, step_seconds=0.1)


def test_monitor_reports_overfitting_starvation_and_gradients_per_epoch() -> None:
    lines: list[str] = []
    monitor = TrainingMonitor(log=lambda line, **_: lines.append(line))
    history = []
    for epoch, (train, valid) in enumerate([(2.0, 2.0), (1.5, 1.7), (1.2, 1.8), (1.0, 1.9)]):
        feed_epoch(monitor, epoch, grad=1e-8 if epoch == 3 else 1.0, data=0.05 if epoch == 3 else 0.01)
        history.append({"epoch": epoch + 1, "train_loss": train, "valid_loss": valid})
        monitor.end_epoch(history)
    checks = {(f.check, f.epoch) for f in monitor.findings}
    assert checks == {("overfitting", 4), ("vanishing_gradient", 4), ("data_starvation", 4)}
    assert monitor.fatal is None and monitor.summary()["status"] == "warning"
    assert monitor.summary()["epochs"][3]["data_wait_share"] == pytest.approx(0.5)
    assert any(line.startswith("health: WARNING overfitting") for line in lines)


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_loss_is_fatal(loss: float) -> None:
    monitor = TrainingMonitor(log=quiet)
    feed_epoch(monitor, 0)
    fatal = monitor.step(epoch=0, step=4, loss=loss, grad_norm=1.0, data_seconds=0.0, step_seconds=0.1)
    assert fatal is monitor.fatal and fatal.check == "non_finite_loss" and fatal.severity == "fatal"
    assert "epoch 1 step 5" in fatal.message


def test_non_finite_gradients_are_fatal_only_without_a_loss_scaler() -> None:
    scaled = TrainingMonitor(log=quiet)
    scaled.step(epoch=0, step=0, loss=2.0, grad_norm=math.inf, data_seconds=0.0, step_seconds=0.1, scaled=True)
    scaled.end_epoch([{"epoch": 1, "train_loss": 2.0}])
    assert scaled.fatal is None and scaled.epochs[0]["skipped_steps"] == 1
    plain = TrainingMonitor(log=quiet)
    plain.step(epoch=0, step=0, loss=2.0, grad_norm=math.nan, data_seconds=0.0, step_seconds=0.1)
    assert plain.fatal is not None and plain.fatal.check == "non_finite_gradient"


def test_health_metric_lines_are_captured_by_the_training_jobs_metric_definitions() -> None:
    lines: list[str] = []
    monitor = TrainingMonitor(log=lambda line, **_: lines.append(line))
    feed_epoch(monitor, 0, grad=2.5)
    monitor.end_epoch([{"epoch": 1, "train_loss": 2.0}])
    scraped = {d["Name"]: re.findall(d["Regex"], "\n".join(lines)) for d in metric_definitions()}
    assert scraped["grad_norm"] == ["2.5"]
    assert scraped["data_wait_share"] == ["0.1"]
    assert scraped["health_warnings"] == ["0"] and scraped["health_fatal"] == ["0"]
    assert scraped["epoch"] == []  # the health line must not be read as another epoch


def test_stage_table_gives_mean_milliseconds_and_shares() -> None:
    steps = [{"data": 0.01, "forward": 0.02, "backward": 0.05, "optimizer": 0.02, "total": 0.1}] * 3
    table = stage_table(steps)
    assert table["steps"] == 3 and table["step_ms"] == pytest.approx(100.0)
    assert table["stages"]["backward"] == {"ms": pytest.approx(50.0), "share": pytest.approx(0.5)}
    assert list(table["stages"]) == list(STAGES)


# --- real trainer runs ------------------------------------------------------------------------------------


def sm_env(data: Path, base: Path) -> dict[str, str]:
    return {"SM_CHANNEL_TRAIN": str(data), "SM_CHANNEL_VALIDATION": str(data), "SM_MODEL_DIR": str(base / "model"),
            "SM_OUTPUT_DATA_DIR": str(base / "output"), "SM_HOSTS": '["localhost"]', "SM_CURRENT_HOST": "localhost",
            "SM_NUM_GPUS": "0"}


def test_a_tiny_training_run_writes_health_json_and_prints_health_metrics(tiny_run: dict) -> None:
    health = json.loads((tiny_run["output_dir"] / HEALTH_FILE).read_text())
    assert health["status"] in {"ok", "warning"}
    assert not [f for f in health["findings"] if f["severity"] == "fatal"]
    (epoch,) = health["epochs"]
    assert epoch["epoch"] == 1 and epoch["steps"] == 4
    assert 0 < epoch["grad_norm_median"] < 1e3 and 0 <= epoch["data_wait_share"] < 1
    assert re.search(r"^health: grad_norm=[0-9.]+; data_wait_share=[0-9.e-]+;", tiny_run["log"], re.M)


def test_a_diverging_run_is_stopped_by_the_fatal_finding_with_a_clear_message(sample_dir: Path,
                                                                             tmp_path: Path) -> None:
    args = [*TINY_ARGS, "--epochs", "3", "--lr", "10", "--warmup-epochs", "0", "--checkpoint-dir",
            str(tmp_path / "checkpoints")]
    result = run_train(args, sm_env(sample_dir, tmp_path))
    assert result.returncode != 0
    assert "training stopped by a fatal health finding: the training loss" in result.stderr
    assert "diverged" in result.stderr
    # Stopped in the first epoch (4 steps each), long before the 12 steps asked for.
    assert "epoch=1;" not in result.stdout and "epoch 0 step 4/4" not in result.stdout
    health = json.loads((tmp_path / "output" / HEALTH_FILE).read_text())
    assert health["status"] == "fatal" and health["findings"][-1]["check"] == "diverging_loss"
    # Diverged weights are neither saved as the model nor kept as a checkpoint to resume from.
    assert not (tmp_path / "model" / "model.pth").exists()
    assert not (tmp_path / "checkpoints" / "checkpoint.pt").exists()


def test_profile_steps_writes_a_trace_and_a_stage_table(sample_dir: Path, tmp_path: Path) -> None:
    args = [*TINY_ARGS, "--limit", "48", "--profile-steps", "3", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    result = run_train(args, sm_env(sample_dir, tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    output = tmp_path / "output"
    table = json.loads((output / PROFILE_JSON).read_text())
    assert table["steps"] == 3 and set(table["stages"]) == set(STAGES)
    assert sum(stage["share"] for stage in table["stages"].values()) == pytest.approx(1.0, abs=0.05)
    assert table["stages"]["forward"]["ms"] > 0 and table["stages"]["backward"]["ms"] > 0
    assert "backward" in (output / PROFILE_TABLE).read_text()
    (trace,) = (output / PROFILE_DIR).glob("*.pt.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    names = {event.get("name") for event in events}
    # The stages are named ranges in the trace, once per profiled step.
    assert {f"step/{stage}" for stage in STAGES} <= names
    assert sum(event.get("name") == "step/forward" for event in events) == 3


def test_an_execution_input_asks_for_a_profile_through_the_trainers_hyperparameters() -> None:
    from lambdas.training.request import build, parse_input
    from ml.train import parse_args
    from tests.lambdas.test_training import CHANNELS, STARTED, deployment

    request = build(deployment(), parse_input({"hyperparameters": {"profile-steps": 20}}), CHANNELS,
                    execution="profiled", started_at=STARTED)["request"]
    assert request["HyperParameters"]["profile-steps"] == "20"
    # sagemaker-training passes it back as "--profile-steps 20", which the trainer reads.
    assert parse_args(["--train", "x", "--profile-steps", "20"]).profile_steps == 20


def test_the_local_trainer_and_the_demo_show_the_health_of_a_run(tiny_run: dict, tmp_path: Path) -> None:
    from invmon.training import health_lines

    assert health_lines(tiny_run["output_dir"])[0].startswith("training health: ")
    monitor = TrainingMonitor(log=quiet)
    monitor.step(epoch=0, step=0, loss=math.nan, grad_norm=1.0, data_seconds=0.0, step_seconds=0.1)
    lines = health_lines(monitor.write(tmp_path).parent)
    assert lines[0] == "training health: fatal"
    assert lines[1].startswith("  fatal non_finite_loss (epoch 1): the training loss is nan")
    assert health_lines(tmp_path / "nowhere") == ["training health: not recorded (no health.json)"]
