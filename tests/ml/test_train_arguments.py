"""The trainer's command line refuses what it cannot train with (issue 16): unknown names, abbreviations,
values out of range. Before, ``parse_known_args`` printed "ignoring unknown arguments" and a typo trained for
hours with the default."""

from __future__ import annotations

import pytest

from ml.train import parse_args


@pytest.mark.parametrize(
    ("argv", "answer"),
    [
        (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1"),
        (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no longer read as --epochs
        (["--SAGEMAKER_program", "x.py"], "unrecognized arguments: --SAGEMAKER_program x.py"),
        (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
        (["--batch-size", "1000000000"], "argument --batch-size: must be at most 4096, got 1000000000"),
        (["--dropout", "1"], "argument --dropout: must be less than 1, got 1.0"),
    ],
)
def test_the_trainer_refuses_unknown_arguments_and_values_out_of_range(
    argv: list[str], answer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--train", "/data", *argv])
    assert exited.value.code == 2
    assert answer in capsys.readouterr().err


def test_what_sagemaker_adds_to_a_job_is_tolerated() -> None:
    # A tuning job's trials carry _tuning_objective_metric; the toolkit strips it and sagemaker_* before the
    # entry point runs, so these never arrive in practice, and must not fail a job if they do.
    args = parse_args(["--train", "/data", "--_tuning_objective_metric", "valid_accuracy",
                       "--sagemaker_container_log_level", "20", "--lr", "0.01"])
    assert args.lr == 0.01


@pytest.mark.parametrize(("argv", "answer"), [
    (["--data-mode", "disk"], "argument --data-mode: invalid choice: 'disk'"),
    (["--data-distribution", "fully"], "argument --data-distribution: invalid choice: 'fully'"),
    (["--workers", "-2"], "argument --workers: must be at least -1, got -2"),
    (["--lr-reference-batch", "0"], "argument --lr-reference-batch: must be at least 1, got 0"),
])
def test_the_data_and_scaling_arguments_refuse_what_the_trainer_cannot_use(
        argv: list[str], answer: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--train", "/data", *argv])
    assert answer in capsys.readouterr().err


def test_the_recipes_rate_is_unchanged_at_32_photos_and_scales_with_the_square_root_of_the_global_batch() -> None:
    from ml.train import scaled_lr

    assert scaled_lr(1e-3, 32, 32, "sqrt") == 1e-3  # the shipped recipe: batch 32 on one process
    assert scaled_lr(1e-3, 32 * 4, 32, "sqrt") == pytest.approx(2e-3)  # four hosts
    assert scaled_lr(1e-3, 32 * 4, 32, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 32 * 4, 32, "none") == 1e-3


def test_loader_workers_use_every_cpu_but_one_on_a_gpu_and_none_on_a_cpu() -> None:
    import torch

    from ml.train import loader_workers

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert loader_workers(-1, gpu, {"SM_NUM_CPUS": "8"}) == 7  # ml.g5.2xlarge: 8 vCPUs
    assert loader_workers(-1, gpu, {"SM_NUM_CPUS": "48"}) == 32
    assert loader_workers(-1, cpu, {"SM_NUM_CPUS": "8"}) == 0
    assert loader_workers(3, cpu, {}) == 3
