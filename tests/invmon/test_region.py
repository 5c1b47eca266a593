"""The CLI finds the region and the profile the way the AWS CLI does, and each error's advice, followed, gets past
that error (issue 24, item 1). The region's order is the SDKs' (docs.aws.amazon.com/sdkref/latest/guide/
feature-region.html): --region, AWS_REGION, AWS_DEFAULT_REGION, then the profile's ``region``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from invmon import aws
from invmon.cli import main

NOBODY_LISTENS = "http://127.0.0.1:9"  # the discard port: botocore's real connection error, no network


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS settings at all: no variables, empty config and credentials files in tmp_path."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    config, credentials = tmp_path / "config", tmp_path / "credentials"
    config.write_text("")
    credentials.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata lookups
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return tmp_path


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    return line


def test_with_no_region_anywhere_the_error_names_every_way_to_set_one(bare, capsys) -> None:
    assert main(["pipeline", "status"]) == 1
    assert error_line(capsys) == f"invmon: {aws.NO_REGION}"


@pytest.mark.parametrize("how", ["--region", "AWS_REGION", "AWS_DEFAULT_REGION", "--profile", "AWS_PROFILE"])
def test_each_way_the_region_error_advises_sets_the_region(bare, monkeypatch, capsys, how: str) -> None:
    args = ["pipeline", "status"]
    (bare / "config").write_text("[profile ops]\nregion = eu-west-1\n")
    if how == "--region":
        args += ["--region", "eu-west-1"]
    elif how == "--profile":
        args += ["--profile", "ops"]
    elif how == "AWS_PROFILE":
        monkeypatch.setenv("AWS_PROFILE", "ops")
    else:
        monkeypatch.setenv(how, "eu-west-1")
    assert main(args) == 1
    # Past the region: now it is the credentials that are missing.
    assert error_line(capsys) == f"invmon: {aws.NO_CREDENTIALS}"


def test_region_order_is_flag_then_aws_region_then_aws_default_region_then_profile(bare, monkeypatch) -> None:
    (bare / "config").write_text("[default]\nregion = ap-south-1\n")
    assert aws.make_session().region_name == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert aws.make_session().region_name == "us-west-2"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert aws.make_session().region_name == "eu-west-1"
    assert aws.make_session(region="eu-central-1").region_name == "eu-central-1"


def test_the_credentials_error_advice_a_profile_with_keys_gets_past_it(bare, monkeypatch, capsys) -> None:
    (bare / "credentials").write_text("[ops]\naws_access_key_id = AKIAFAKE\naws_secret_access_key = fake\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", NOBODY_LISTENS)
    assert main(["pipeline", "status", "--region", "eu-west-1"]) == 1
    assert error_line(capsys) == f"invmon: {aws.NO_CREDENTIALS}"
    assert main(["pipeline", "status", "--region", "eu-west-1", "--profile", "ops"]) == 1
    assert error_line(capsys).startswith(f"invmon: cannot reach AWS at {NOBODY_LISTENS}/")


@pytest.mark.parametrize("how", ["--profile", "AWS_PROFILE"])
def test_an_unknown_profile_is_one_line_that_names_it(bare, monkeypatch, capsys, how: str) -> None:
    args = ["pipeline", "status"] + (["--profile", "nope"] if how == "--profile" else [])
    if how == "AWS_PROFILE":
        monkeypatch.setenv("AWS_PROFILE", "nope")
    assert main(args) == 1
    assert error_line(capsys) == (
        "invmon: no AWS profile named 'nope' in the AWS config or credentials file: list them with "
        "`aws configure list-profiles`, or create it with `aws configure --profile nope`")


@pytest.mark.parametrize(("args", "stack"), [([], "Invmon-dev"), (["--stage", "prod"], "Invmon-prod"),
                                             (["--stage", "prod", "--stack", "Mine"], "Mine")])
def test_the_stack_follows_the_stage_as_app_py_names_it(bare, monkeypatch, args, stack: str) -> None:
    seen = []

    def deployment(stack_name: str, **_: object) -> aws.Deployment:
        seen.append(stack_name)
        raise aws.CliError("stop here")

    monkeypatch.setattr(aws, "Deployment", deployment)
    main(["pipeline", "status", "--region", "eu-west-1", *args])
    assert seen == [stack]


def test_stack_names_match_the_app() -> None:
    from infra.config import load_settings

    source = (Path(__file__).resolve().parents[2] / "app.py").read_text()
    assert 'f"{settings.project.capitalize()}-{settings.stage}"' in source
    assert aws.stack_name(load_settings().stage, load_settings().project) == aws.DEFAULT_STACK


def test_aws_region_alone_without_credentials_says_credentials_not_region(bare) -> None:
    """The issue's reproduction, as a user types it: a real process with AWS_REGION and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_REGION": "eu-west-1", "AWS_CONFIG_FILE": str(bare / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(bare / "credentials"), "AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run([sys.executable, "-m", "invmon", "pipeline", "status"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == f"invmon: {aws.NO_CREDENTIALS}"
