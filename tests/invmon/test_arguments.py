"""`invmon demo` and `invmon train --local` check their arguments before any work: one line on stderr, exit
status 2, no traceback, no usage block (issue 24, item 3)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from invmon import cli, demo
from invmon.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any work at all (synth, training) fails the test: the arguments must be refused first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(demo, "synthesize", refuse)
    monkeypatch.setattr("invmon.training.train_locally", refuse)


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    (line,) = err.strip().splitlines()
    return line


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "--hold-out", "0"], "invmon demo: --hold-out: expected a whole number of at least 1, got 0"),
    (["demo", "--hold-out", "-1"], "invmon demo: --hold-out: expected a whole number of at least 1, got -1"),
    (["demo", "--epochs", "0"], "invmon demo: --epochs: expected a whole number of at least 1, got 0"),
    (["demo", "--epochs", "-3"], "invmon demo: --epochs: expected a whole number of at least 1, got -3"),
    (["demo", "--epochs", "six"], "invmon demo: --epochs: expected a whole number, got 'six'"),
    (["demo", "--data", "/no/such/folder"], "invmon demo: --data: /no/such/folder does not exist"),
    (["train", "--local", "--epochs", "0"], "invmon train: --epochs: expected a whole number of at least 1, got 0"),
    (["train", "--local", "-p", "lr"],
     "invmon train: --hyperparameter/-p: expected NAME=VALUE such as lr=0.001, got 'lr'"),
    (["train", "--local", "--data", "/no/such/folder"], "invmon train: --data: /no/such/folder does not exist"),
])
def test_a_bad_argument_is_one_line_and_exit_2_before_any_work(no_work, capsys, argv, message: str) -> None:
    assert usage_error(capsys, argv) == f"{message} (see invmon {argv[0]} --help)"


def test_a_file_given_as_data_folder_says_it_is_not_a_folder(no_work, capsys, tmp_path: Path) -> None:
    file = tmp_path / "photos.zip"
    file.write_bytes(b"PK")
    assert "is not a folder" in usage_error(capsys, ["demo", "--data", str(file)])


def test_holding_out_more_than_training_can_spare_is_refused_before_synth(no_work, capsys, sample_dir) -> None:
    assert main(["demo", "--hold-out", "1000", "--data", str(sample_dir)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"invmon demo: --hold-out: {sample_dir} holds 240 photos and training needs "
                           f"{demo.MIN_TRAINING_PHOTOS}, so at most {240 - demo.MIN_TRAINING_PHOTOS} can be held out, "
                           "got 1000")


def test_a_folder_without_abid_records_is_refused_before_synth(no_work, capsys, tmp_path: Path) -> None:
    assert main(["demo", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"invmon demo: --data: no ABID records in {tmp_path}")


def test_train_local_writes_outside_the_checkout_by_default(monkeypatch, tmp_path: Path) -> None:
    seen = {}
    monkeypatch.setattr("invmon.training.train_locally", lambda **kwargs: seen.update(kwargs) or 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["train", "--local"]) == 0
    assert seen["workdir"].is_relative_to(tmp_path / "cache" / "invmon" / "train-local")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert not cli.default_local_workdir().resolve().is_relative_to(ROOT)


def test_the_demo_refuses_hold_out_0_as_a_process_in_one_line() -> None:
    """As typed: a real process, exit 2, one line (it returns in about 2 s: the CLI imports, no synth)."""
    done = subprocess.run([sys.executable, "-m", "invmon", "demo", "--hold-out", "0"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "invmon demo: --hold-out: expected a whole number of at least 1, got 0 (see invmon demo --help)"]
    assert done.stdout == ""


def test_a_failed_execution_reports_the_reason_alone_not_the_whole_cause(capsys) -> None:
    import json

    import boto3
    from moto import mock_aws

    cause = json.dumps({"errorType": "TrainingInputError", "errorMessage": "epochs: must be at least 1",
                        "stackTrace": ["  File x" * 4000]})
    definition = {"StartAt": "Prepare", "States": {"Prepare": {"Type": "Fail", "Error": "Bad", "Cause": cause}}}
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        sfn = boto3.client("stepfunctions", region_name="us-east-1")
        with pytest.raises(demo.PipelineFailed) as failed:
            demo.follow(sfn, definition, {}, name="failing")
    assert str(failed.value) == "execution failing FAILED: Bad: TrainingInputError: epochs: must be at least 1"
    assert "stackTrace" not in capsys.readouterr().out


def test_moto_logs_and_its_threads_tracebacks_go_to_the_log_file(tmp_path: Path, capfd) -> None:
    from invmon.local import MotoServer

    log = tmp_path / "moto.log"
    with MotoServer(log=log):
        logging.getLogger("moto.core").error("a moto internal error")
        worker = threading.Thread(target=lambda: 1 / 0, name="moto-worker")
        worker.start()
        worker.join()
    err = capfd.readouterr().err
    assert "a moto internal error" not in err and "ZeroDivisionError" not in err
    assert "a moto internal error" in log.read_text() and "ZeroDivisionError" in log.read_text()
