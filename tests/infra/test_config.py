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
