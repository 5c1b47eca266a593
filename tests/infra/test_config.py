"""Settings: every knob has a default in cdk.json, values are typed, and a wrong value names its key."""

from __future__ import annotations

import pytest

from infra.config import CONTEXT_KEYS, ConfigError, default_context, load_settings


def test_every_knob_has_a_default_in_cdk_json():
    context = default_context()
    assert [key for key in CONTEXT_KEYS if key not in context] == []


def test_defaults_build_a_settings_object():
    settings = load_settings()
    assert settings.training_instance_count == 1
    assert settings.training_use_spot is True
    assert settings.endpoint_mode == "serverless"
    assert settings.incoming_prefix.endswith("/")


def test_string_values_from_the_command_line_are_coerced():
    # `cdk synth -c trainingInstanceCount=3 -c trainingUseSpot=false` passes strings.
    settings = load_settings(
        {"trainingInstanceCount": "3", "trainingUseSpot": "false", "countConfidenceThreshold": "0.7"}
    )
    assert settings.training_instance_count == 3
    assert settings.training_use_spot is False
    assert settings.count_confidence_threshold == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("trainingInstanceCount", "three", "trainingInstanceCount: expected an integer, got 'three'"),
        ("trainingInstanceCount", 0, "trainingInstanceCount: expected an integer between 1 and 20, got 0"),
        ("trainingUseSpot", "yes", "trainingUseSpot: expected true or false"),
        ("endpointMode", "always-on", "endpointMode: expected one of serverless, realtime"),
        ("trainingInstanceType", "g4dn.xlarge", "trainingInstanceType: expected an instance type"),
        ("incomingPrefix", "incoming", "incomingPrefix: expected an S3 prefix ending in '/'"),
        ("endpointServerlessMemoryMb", 1500, "endpointServerlessMemoryMb: expected one of 1024, 2048"),
        ("stage", "staging", "stage: expected one of dev, prod"),
        # A packer's result must fit a Step Functions state even when every photo failed (lambdas/pack/plan.py).
        ("packPhotosPerShard", 2001, "packPhotosPerShard: expected an integer between 1 and 2000, got 2001"),
        ("packerMemoryMb", 64, "packerMemoryMb: expected an integer between 128 and 10240, got 64"),
        ("trainingInputMode", "Pipe", "trainingInputMode: expected one of File, FastFile, got 'Pipe'"),
        ("trainingDataDistribution", "Sharded", "trainingDataDistribution: expected one of ShardedByS3Key, "
                                                "FullyReplicated"),
    ],
)
def test_a_wrong_value_fails_with_a_message_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_settings({key: value})


def test_every_wrong_key_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_settings({"trainingInstanceCount": "three", "tuningMaxJobs": -1})
    assert "trainingInstanceCount" in str(error.value)
    assert "tuningMaxJobs" in str(error.value)


def test_a_missing_knob_is_reported_by_key():
    context = default_context()
    del context["incomingPrefix"]
    from infra.config import settings_from_context

    with pytest.raises(ConfigError, match="incomingPrefix: missing from the CDK context"):
        settings_from_context(context.get)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"trainingMaxWaitSeconds": 3600, "trainingMaxRuntimeSeconds": 7200}, "trainingMaxWaitSeconds"),
        ({"tuningMaxJobs": 2, "tuningMaxParallelJobs": 4}, "tuningMaxParallelJobs"),
        ({"endpointMinInstances": 5, "endpointMaxInstances": 2}, "endpointMinInstances"),
        ({"splitValidationFraction": 0.5, "splitTestFraction": 0.45}, "splitTestFraction"),
    ],
)
def test_rules_across_knobs_name_the_key_to_change(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_settings(overrides)


def test_max_wait_below_runtime_is_fine_without_spot():
    settings = load_settings(
        {"trainingUseSpot": False, "trainingMaxWaitSeconds": 3600, "trainingMaxRuntimeSeconds": 7200}
    )
    assert settings.training_use_spot is False


# --- issue 16: values that synthesized before and failed later ----------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # Every ingested image (raw/) or manifest would trigger the count Lambda, whose role would read it.
        ({"incomingPrefix": "raw/"}, "incomingPrefix: must not overlap the prefix raw/ that the pipeline writes"),
        ({"incomingPrefix": "manifests/"}, "incomingPrefix: must not overlap the prefix manifests/"),
        ({"incomingPrefix": "reports/uploads/"}, "incomingPrefix: must not overlap the prefix reports/"),
        # EventBridge: "A positive number"; singular unit for 1, plural above (rate expressions reference).
        ({"costReportSchedule": "rate(0 days)"}, "costReportSchedule: expected rate(N unit) with N at least 1"),
        ({"costReportSchedule": "rate(1 days)"}, "costReportSchedule: expected rate(N unit) with N at least 1"),
        ({"costReportSchedule": "rate(5 hour)"}, "costReportSchedule: expected rate(N unit) with N at least 1"),
        ({"costReportSchedule": "cron(0 6 * *)"}, "costReportSchedule: expected cron(minutes hours day-of-month"),
        # The prepare step refuses these on every execution; synth now refuses them first, with its words.
        ({"trainingInstanceType": "ml.inf2.xlarge"}, "trainingInstanceType: ml.inf2.xlarge needs the Neuron images"),
        ({"trainingInstanceType": "ml.zzz.xlarge"}, "trainingInstanceType: ml.zzz.xlarge is not an instance type "
                                                    "SageMaker training offers"),
        ({"trainingInstanceType": "ml.g4dn.999xlarge"}, "trainingInstanceType: ml.g4dn.999xlarge is not an "
                                                        "instance type SageMaker training offers"),
        # JSON-valued keys say what shape they expect, with an example, instead of the parser's position.
        ({"tuningEpochsRange": "[1,"}, "tuningEpochsRange: expected a [low, high] pair in JSON, such as [2, 10]"),
        ({"tuningBatchSizes": "[16, 32"}, "tuningBatchSizes: expected a list of integers in JSON, such as [16, 32"),
        ({"trainingHyperparameters": "{lr: 1}"}, "trainingHyperparameters: expected an object of ml.train "
                                                 'hyperparameters in JSON, such as {"lr": 0.001'),
        # trainingHyperparameters: the trainer's own parser, as for an execution's.
        ({"trainingHyperparameters": '{"learning-rate": 0.1}'}, "trainingHyperparameters: learning-rate: not an "
                                                                "argument of ml.train"),
        ({"trainingHyperparameters": '{"lr": -0.1}'}, "trainingHyperparameters: lr: must be greater than 0"),
        ({"trainingHyperparameters": '{"SAGEMAKER_program": "x.py"}'}, "trainingHyperparameters: SAGEMAKER_program: "
                                                                        "reserved for SageMaker"),
        ({"trainingHyperparameters": '{"train": "/opt/ml/input/data/validation"}'}, "trainingHyperparameters: "
                                                                                     "train: set by SageMaker"),
    ],
)
def test_values_that_used_to_synthesize_and_fail_later_fail_synth_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as refused:
        load_settings(overrides)
    assert expected in str(refused.value)


def test_the_pipeline_prefixes_incoming_must_avoid_are_the_storage_layouts():
    from infra import storage
    from infra.config import PIPELINE_PREFIXES

    assert set(PIPELINE_PREFIXES) == {storage.RAW_PREFIX, storage.MANIFEST_PREFIX, storage.SHARD_PREFIX,
                                      storage.MODEL_PREFIX, storage.CHECKPOINT_PREFIX, storage.REPORT_PREFIX}


def test_every_selector_the_select_step_knows_can_be_the_deployed_default():
    from lambdas.ingest.request import SELECTORS

    assert "all" in SELECTORS
    for selector in SELECTORS:
        assert load_settings({"datasetSelector": selector}).dataset_selector == selector
    with pytest.raises(ConfigError, match="datasetSelector: expected one of"):
        load_settings({"datasetSelector": "everything"})


def test_the_full_run_instance_type_can_also_be_the_deployed_default():
    # full-run.json names it per execution; -c trainingInstanceType=ml.g5.2xlarge makes it every run's.
    assert load_settings({"trainingInstanceType": "ml.g5.2xlarge"}).training_instance_type == "ml.g5.2xlarge"


# --- issue 25 item 7: configuration that can never work fails synth, in one line naming the key -------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # The prepare step refused it on every execution: it must match how SageMaker hands out the channel.
        ({"trainingHyperparameters": {"data-distribution": "sharded"}},
         "trainingHyperparameters: data-distribution: set from trainingDataDistribution"),
        # ml.train's parser has --help: checking its value printed the help and raised SystemExit at synth.
        ({"trainingHyperparameters": {"help": True}}, "trainingHyperparameters: help: not an argument of ml.train"),
        # A schedule that never fires: February has no 30th or 31st, April no 31st.
        ({"costReportSchedule": "cron(0 6 31 2 ? *)"}, "costReportSchedule: 'cron(0 6 31 2 ? *)' never fires"),
        ({"costReportSchedule": "cron(0 6 30 FEB ? *)"}, "never fires: no month it names has day 30"),
        ({"costReportSchedule": "cron(0 6 31 4,6 ? *)"}, "never fires"),
        # Each Cost Explorer request is billed: rate(1 minute) would be 1,440 paid calls a day.
        ({"costReportSchedule": "rate(1 minute)"}, "costReportSchedule: the cost report runs at most once a day"),
        ({"costReportSchedule": "rate(12 hours)"}, "at most once a day"),
        ({"costReportSchedule": "cron(0 * * * ? *)"}, "at most once a day"),
        ({"costReportSchedule": "cron(0 6,18 * * ? *)"}, "at most once a day"),
        ({"costReportSchedule": "cron(0 6 32 * ? *)"}, "cron field '32': expected values between 1 and 31"),
        # No images for that version: the image lookup's 28-line traceback before.
        ({"frameworkVersion": "9.9"}, "frameworkVersion: no PyTorch 9.9 (py311) images in infra/images.json"),
        # A tuning job's trials that cannot all run within a tuning job's 30-day limit.
        ({"tuningMaxJobs": 100, "tuningMaxJobsCap": 100, "tuningMaxParallelJobs": 1},
         "tuningMaxJobs: 100 trials, 1 at a time"),
    ],
)
def test_configuration_that_can_never_work_fails_synth_naming_the_key(overrides, expected):
    from infra import budget

    with pytest.raises(ConfigError) as refused:
        budget.check(load_settings(overrides))
    assert expected in str(refused.value)
    assert "\n" not in str(refused.value).removeprefix("invalid invmon settings:\n  ")


@pytest.mark.parametrize("schedule", ["rate(1 day)", "rate(7 days)", "cron(0 6 ? * MON *)", "cron(0 6 29 2 ? *)",
                                      "cron(30 5 L * ? *)"])
def test_schedules_that_fire_at_most_daily_are_accepted(schedule):
    assert load_settings({"costReportSchedule": schedule}).cost_report_schedule == schedule


def test_an_unknown_context_key_is_refused_with_the_closest_knob_and_cdks_own_keys_pass():
    from infra.config import check_context_keys

    context = default_context() | {"aws:cdk:enable-path-metadata": True, "@aws-cdk/core:newStyleStackSynthesis": 1}
    check_context_keys(context)
    with pytest.raises(ConfigError, match=r"trainingInstanceTyp: not an invmon setting; did you mean "
                                          r"trainingInstanceType\?"):
        check_context_keys(context | {"trainingInstanceTyp": "ml.g5.xlarge"})


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("trainingInstanceTyp", "ml.g5.xlarge", "invmon: invalid invmon settings:\n  trainingInstanceTyp: not an "
                                            "invmon setting; did you mean trainingInstanceType?\n"),
    ("frameworkVersion", "9.9", "invmon: frameworkVersion: no PyTorch 9.9 (py311) images in infra/images.json"),
])
def test_the_app_refuses_a_bad_context_with_one_line_and_no_traceback(tmp_path, key, value, expected):
    # As `cdk synth -c key=value` runs it: the CLI hands the app its context in CDK_CONTEXT_JSON.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(default_context() | {key: value}),
           "CDK_OUTDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(root / "app.py")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith(expected), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
