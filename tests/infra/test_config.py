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
