"""The synthesized state machines executed in moto's Step Functions interpreter (see invmon/execution.py).

A stage is run alone by starting the pipeline's own definition at that stage, with the state the earlier stages
leave as input; everything after it (the stage's Catch, "Record <stage> failure", "Pipeline failed", "Pipeline
succeeded") is the synthesized definition's own.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from invmon import execution as offline
from lambdas.ingest.request import run_id_from
from tests.pipeline import harness
from tests.pipeline.conftest import Cloud

PIPELINE = "PipelineStateMachine"
ENDPOINT = "invmon-dev-counter"


def run_id(execution: str) -> str:
    return run_id_from(execution, "unused")


def data_bucket(cloud: Cloud) -> str:
    return cloud.name("AWS::S3::Bucket", "StorageData")


def trained(cloud: Cloud, job: str = "invmon-dev-job", accuracy: float = 0.6) -> dict[str, Any]:
    """What the training stage leaves at $.training: the report Lambda's contract."""
    return {"jobName": job, "modelArtifact": f"s3://{data_bucket(cloud)}/models/{job}/output/model.tar.gz",
            "metrics": {"valid_accuracy": accuracy, "valid_rmse": 1.0}}


def run_deploy(cloud: Cloud, name: str = "run", accuracy: float = 0.6, **input_: Any) -> offline.Execution:
    state = {"input": input_, "execution": name, "training": trained(cloud, accuracy=accuracy)}
    execution = cloud.run(cloud.definition(PIPELINE, start_at="Deploy stage"), state, name=name)
    execution.assert_no_runtime_error()
    return execution


def find_state(definition: dict[str, Any], name: str) -> dict[str, Any]:
    """A state anywhere in a definition (inside Parallel branches and Map processors too)."""
    for state_name, state in definition["States"].items():
        if state_name == name:
            return state
        for inner in [*state.get("Branches", []), *filter(None, [state.get("ItemProcessor")])]:
            try:
                return find_state(inner, name)
            except KeyError:
                continue
    raise KeyError(name)


def lock_items(cloud: Cloud) -> list[dict[str, Any]]:
    return cloud.client("dynamodb").scan(TableName=cloud.name("AWS::DynamoDB::Table", "DeployLocks"))["Items"]


def hold_lock(cloud: Cloud, holder: str = "other-execution", lease_seconds: int = 3600) -> None:
    """The deploy lock as another execution's live lease leaves it (lambdas/deploy/lock.py)."""
    import time

    cloud.client("dynamodb").put_item(TableName=cloud.name("AWS::DynamoDB::Table", "DeployLocks"), Item={
        "lock": {"S": ENDPOINT}, "owner": {"S": f"arn:aws:states:us-east-1:123456789012:execution:m:{holder}"},
        "execution": {"S": holder}, "expiresAt": {"N": str(int(time.time()) + lease_seconds)}})


def after_release(change: Any) -> Any:
    """An ``InProcessLambda.after`` hook that changes the endpoint once the release Lambda has started it."""
    def after(invocation: offline.Invocation) -> None:
        if invocation.function.startswith("deployrelease") and invocation.error is None:
            change()
    return after


def test_endpoint_out_of_service_fails_the_pipeline_with_the_endpoints_status(cloud: Cloud) -> None:
    # DescribeEndpoint gives no FailureReason for OutOfService: reading it was a States.Runtime error on AWS.
    cloud.lambdas.after = after_release(lambda: offline.set_endpoint_status(ENDPOINT, "OutOfService"))
    execution = run_deploy(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "EndpointFailed"
    assert execution.cause == (f"deploy stage failed: Endpoint {ENDPOINT} is OutOfService: SageMaker gives no "
                               "FailureReason for this status, see the endpoint events")
    entered = execution.states_entered()
    # The stage's failure passes through the lock's release and is raised again with its own error and cause.
    assert entered.index("Endpoint failed") < entered.index("Release deploy lock after failure") \
        < entered.index("Deploy failed") < entered.index("Record deploy failure")
    assert entered[-1] == "Pipeline failed"
    assert lock_items(cloud) == []


def test_an_endpoint_that_never_becomes_in_service_fails_after_the_wait_loops_limit(cloud: Cloud) -> None:
    # Before, the loop had no attempt limit: an endpoint stuck Creating kept the execution polling until its
    # timeout, which on AWS ends it without a cause.
    from infra.config import load_settings
    from infra.deploy import endpoint_checks

    cloud.lambdas.after = after_release(lambda: offline.set_endpoint_status(ENDPOINT, "Creating"))
    checks = endpoint_checks(load_settings())
    definition = cloud.definition(PIPELINE, start_at="Deploy stage")
    # The limit scaled down as for_moto scales the Wait down (130 real passes cost ~100 s here); the cause is the
    # synthesized one.
    keep = find_state(definition, "Keep waiting for endpoint?")
    assert keep["Choices"][0]["NumericGreaterThanEquals"] == checks
    keep["Choices"][0]["NumericGreaterThanEquals"] = 3
    execution = cloud.run(definition, {"input": {}, "execution": "run", "training": trained(cloud)})
    execution.assert_no_runtime_error()
    assert execution.status == "FAILED"
    assert execution.error == "EndpointTimeout"
    assert execution.cause.startswith(f"deploy stage failed: Endpoint {ENDPOINT} did not become InService on "
                                      f"config ")
    assert execution.cause.endswith(f"within {checks} checks 30 s apart; its status is Creating")
    assert execution.states_entered().count("Describe endpoint") == 3
    assert lock_items(cloud) == []


def test_endpoint_failed_fails_the_pipeline_with_its_failure_reason(cloud: Cloud) -> None:
    cloud.lambdas.after = after_release(
        lambda: offline.set_endpoint_status(ENDPOINT, "Failed", "the container did not pass the ping check"))
    execution = run_deploy(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "EndpointFailed"
    assert execution.cause == (f"deploy stage failed: Endpoint {ENDPOINT} is Failed: "
                               "the container did not pass the ping check")


def test_a_deploy_waits_while_another_execution_holds_the_lock_then_deploys(cloud: Cloud) -> None:
    hold_lock(cloud)
    refused = []

    def other_finishes(invocation: offline.Invocation) -> None:
        if invocation.function.startswith("deploylock") and invocation.error:
            refused.append(invocation.error)
            if len(refused) == 2:  # the other deploy ends while this one waits
                cloud.client("dynamodb").delete_item(TableName=cloud.name("AWS::DynamoDB::Table", "DeployLocks"),
                                                     Key={"lock": {"S": ENDPOINT}})

    cloud.lambdas.after = other_finishes
    execution = run_deploy(cloud)
    assert execution.status == "SUCCEEDED", execution.cause
    assert all(error.startswith("DeployLockHeld: another deploy is in progress: other-execution holds the "
                                f"deploy lock of {ENDPOINT}") for error in refused)
    entered = execution.states_entered()
    assert entered.index("Acquire deploy lock") < entered.index("Decide deploy") < entered.index("Release deploy lock")
    assert lock_items(cloud) == []


def test_a_deploy_that_never_gets_the_lock_fails_as_another_deploy_in_progress(cloud: Cloud) -> None:
    from infra.deploy import LOCK_ATTEMPTS

    hold_lock(cloud)
    execution = run_deploy(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "DeployLockHeld"
    assert "another deploy is in progress: other-execution holds the deploy lock" in execution.cause
    assert "Decide deploy" not in execution.states_entered()  # the gate never ran, nothing was released
    attempts = [i for i in cloud.lambdas.invocations if i.function.startswith("deploylock")]
    assert len(attempts) == 1 + LOCK_ATTEMPTS
    assert lock_items(cloud)[0]["execution"]["S"] == "other-execution"  # the holder's lock is left alone


def test_two_concurrent_deploys_take_turns_and_the_gate_sees_the_first_ones_model(cloud: Cloud) -> None:
    # Before the lock both released at once: the model in service was whichever came last, and a forced race
    # ended in DeploymentRolledBack although nothing had rolled back.
    sfn = cloud.client("stepfunctions")
    definition = cloud.definition(PIPELINE, start_at="Deploy stage")
    arns = [offline.start(sfn, definition, {"input": {}, "execution": name, "training": trained(cloud, job=name,
                                                                                              accuracy=0.6)},
                          name=name) for name in ("deploy-a", "deploy-b")]
    executions = [offline.wait(sfn, arn, timeout=120) for arn in arns]
    for execution in executions:
        execution.assert_no_runtime_error()
        assert execution.status == "SUCCEEDED", execution.cause
    decisions = sorted(e.output["deploy"]["decision"] for e in executions)
    assert decisions == ["deploy", "skip"]  # the second gate compared with the first one's model, in service
    lock_calls = [(i.event["action"], i.event["execution"], i.error is None) for i in cloud.lambdas.invocations
                  if i.function.startswith("deploylock")]
    held = None
    for action, execution, ok in lock_calls:  # never two holders at once
        if action == "acquire" and ok:
            assert held is None, lock_calls
            held = execution
        elif action == "release":
            assert held == execution, lock_calls
            held = None
    assert lock_items(cloud) == []


def test_first_deploy_creates_the_endpoint_and_records_the_model_in_service(cloud: Cloud) -> None:
    execution = run_deploy(cloud)
    assert execution.status == "SUCCEEDED", execution.cause
    entered = execution.states_entered()
    path = ["Decide deploy", "Deploy?", "Release model", "Wait for endpoint", "Describe endpoint",
            "Endpoint ready?", "Smoke test endpoint", "Smoke check passed?", "Finish deploy", "Deploy finished"]
    assert [s for s in entered if s in path] == path
    assert entered[-1] == "Pipeline succeeded"
    assert execution.output["deploy"]["decision"] == "deploy"
    release = next(i for i in cloud.lambdas.invocations if i.function.startswith("deployrelease"))
    assert release.result["action"] == "create"
    endpoint = cloud.client("sagemaker").describe_endpoint(EndpointName=ENDPOINT)
    assert endpoint["EndpointConfigName"] == release.result["endpointConfigName"]


def test_redeploy_of_an_equal_model_is_skipped(cloud: Cloud) -> None:
    assert run_deploy(cloud, name="first").status == "SUCCEEDED"
    execution = run_deploy(cloud, name="second")
    assert execution.status == "SUCCEEDED", execution.cause
    assert "Deploy skipped" in execution.states_entered()
    assert "Release model" not in execution.states_entered()
    assert execution.output["deploy"]["decision"] == "skip"


def test_an_update_that_rolled_back_fails_the_pipeline_as_rolled_back(cloud: Cloud) -> None:
    # The endpoint is InService on another config than the one released: the blue/green update rolled back.
    from moto.sagemaker.models import sagemaker_backends

    def roll_back() -> None:
        sagemaker_backends[offline.ACCOUNT][offline.REGION].endpoints[ENDPOINT].endpoint_config_name = "previous"

    cloud.lambdas.after = after_release(roll_back)
    execution = run_deploy(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "DeploymentRolledBack"
    assert "Deploy rolled back" in execution.states_entered()


# ------------------------------------------------------------------------------------------------- training


def packed(cloud: Cloud) -> dict[str, Any]:
    """What the pack stage leaves at $.pack: the finish step's contract (lambdas/pack/finish.py)."""
    shards = f"s3://{data_bucket(cloud)}/shards/run"
    return {"runId": "run", "channels": {"train": f"{shards}/train/", "validation": f"{shards}/validation/"},
            "shards": {"train": 3, "validation": 1}, "photos": {"train": 2400, "validation": 300},
            "reviewedUsed": 0, "reportKey": "reports/pack/run.json"}


def run_training(cloud: Cloud, **input_: Any) -> offline.Execution:
    state = {"input": input_, "execution": "run", "pack": packed(cloud)}
    execution = cloud.run(cloud.definition(PIPELINE, start_at="Training stage"), state)
    execution.assert_no_runtime_error()
    return execution


def test_a_failed_training_job_is_stopped_and_fails_the_pipeline_with_its_reason(cloud: Cloud) -> None:
    cloud.bridge.outcome = lambda action, request: harness.Outcome("Failed", "AlgorithmError: out of memory")
    execution = run_training(cloud)
    assert execution.status == "FAILED"
    assert execution.error == offline.TASK_FAILED_ERROR
    assert "training stage failed:" in execution.cause
    assert "AlgorithmError: out of memory" in execution.cause
    entered = execution.states_entered()
    assert entered.index("TrainModel") < entered.index("StopTrainingJob") < entered.index("TrainingFailed")
    assert entered[-2:] == ["Record training failure", "Pipeline failed"]
    assert cloud.bridge.stopped == [request["TrainingJobName"] for _, request in cloud.bridge.requests]
    ((operation, request),) = cloud.bridge.requests
    assert operation == "CreateTrainingJob"
    assert request["EnableManagedSpotTraining"] is True


# What AWS documents for a .sync task whose SageMaker job ends Stopped: nothing either way. The Step Functions
# developer guide ("Run a Job (.sync)", connect-to-resource) says only that the task waits for the job to
# complete; the SageMaker integration page (connect-sagemaker) lists which APIs support .sync, not which end states
# fail the task; and botocore's own TrainingJobCompletedOrStopped waiter (sagemaker waiters-2.json) treats Stopped
# as success. A spot job whose MaxWaitTimeInSeconds ran out ends Stopped, partly trained, so both outcomes of the
# task are run here, and both must fail the training stage with the job's reason before the deploy gate.
SPOT_GAVE_UP = "Training job stopped: spot capacity was not available within MaxWaitTimeInSeconds"


def test_a_stopped_job_whose_sync_task_fails_is_stopped_and_fails_the_stage_with_its_reason(cloud: Cloud) -> None:
    cloud.bridge.outcome = lambda action, request: harness.Outcome("Stopped", SPOT_GAVE_UP, task_fails=True)
    execution = run_training(cloud)
    assert execution.status == "FAILED"
    assert execution.cause.startswith("training stage failed:")
    assert SPOT_GAVE_UP in execution.cause and '"TrainingJobStatus":"Stopped"' in execution.cause
    entered = execution.states_entered()
    assert "StopTrainingJob" in entered and "RecordTraining" not in entered and "Deploy stage" not in entered


def test_a_stopped_job_returned_by_its_sync_task_fails_the_stage_before_the_gate(cloud: Cloud) -> None:
    # The .sync task returns the Stopped job as its output: the report step records it, the check refuses it.
    cloud.bridge.outcome = lambda action, request: harness.Outcome(
        "Stopped", SPOT_GAVE_UP, task_fails=False, serving_code=False)
    execution = run_training(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "TrainingJobUnusable"
    ((_, request),) = cloud.bridge.requests
    job = request["TrainingJobName"]
    assert execution.cause.startswith(f"training stage failed: training job {job} ended Stopped: {SPOT_GAVE_UP}")
    assert "holds no code/inference.py" in execution.cause
    assert len(execution.cause) < 1000
    entered = execution.states_entered()
    assert entered.index("RecordTraining") < entered.index("TrainingUnusable") < entered.index("TrainingFailed")
    assert "TrainingRecorded" not in entered


FATAL_HEALTH = {"status": "fatal", "findings": [
    {"check": "non_finite_loss", "severity": "fatal", "epoch": 2, "message": "loss is nan at step 812"}]}


@pytest.mark.parametrize(("outcome", "reason"), [
    (harness.Outcome(serving_code=False), "holds no code/inference.py: the serving container could not load it"),
    (harness.Outcome(health=FATAL_HEALTH), "fatal health finding (non_finite_loss: loss is nan at step 812)"),
], ids=["no-serving-code", "fatal-health-finding"])
def test_a_completed_job_that_cannot_serve_or_reported_a_fatal_finding_fails_the_stage(
        cloud: Cloud, outcome: harness.Outcome, reason: str) -> None:
    cloud.bridge.outcome = lambda action, request: outcome
    execution = run_training(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "TrainingJobUnusable"
    assert reason in execution.cause


def test_a_training_task_timeout_fails_the_stage_with_a_cause_naming_the_job(cloud: Cloud) -> None:
    # States.Timeout carries no cause: the stage names the job and the timeout it ran past.
    cloud.bridge.outcome = lambda action, request: harness.Outcome("InProgress", timed_out=True)
    execution = run_training(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "States.Timeout"
    ((_, request),) = cloud.bridge.requests
    assert execution.cause.startswith(f"training stage failed: training job {request['TrainingJobName']} ran past "
                                      "its state timeout of ")
    assert "StopTrainingJob" in execution.states_entered()


@pytest.mark.parametrize("bad", [{"training": {"instanceCount": "many"}}, {"training": {"nonsense": 1}}])
def test_a_bad_training_input_fails_before_any_job_starts(cloud: Cloud, bad: dict[str, Any]) -> None:
    execution = run_training(cloud, **bad)
    assert execution.status == "FAILED"
    assert "training stage failed:" in execution.cause
    assert "TrainModel" not in execution.states_entered()
    assert cloud.bridge.requests == []


def test_a_completed_training_job_is_recorded_for_the_deploy_stage(cloud: Cloud) -> None:
    execution = run_training(cloud)
    assert execution.status == "SUCCEEDED", execution.cause
    ((operation, request),) = cloud.bridge.requests
    assert operation == "CreateTrainingJob"
    training = execution.output["training"]
    assert training["jobName"] == request["TrainingJobName"]
    assert training["modelArtifact"].endswith(f"/{request['TrainingJobName']}/output/model.tar.gz")
    assert execution.states_entered()[-1] == "Pipeline succeeded"


def test_tuning_runs_a_tuning_job_and_takes_its_best_job_forward(cloud: Cloud) -> None:
    execution = run_training(cloud, training={"tuning": {"enabled": True, "maxJobs": 2, "maxParallelJobs": 1}})
    assert "TuneModel" in execution.states_entered()
    ((operation, request),) = cloud.bridge.requests
    assert operation == "CreateHyperParameterTuningJob"
    assert execution.status == "SUCCEEDED", execution.cause
    assert request["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 2
    training = execution.output["training"]
    assert training["jobName"].startswith(request["HyperParameterTuningJobName"] + "-001-")
    assert training.get("tuningJobName") == request["HyperParameterTuningJobName"], training


# ------------------------------------------------------------------------------------------ whole pipeline

SOURCE_BUCKET = "aft-vbi-pds"  # the ingest functions' SOURCE_BUCKET: ABID's public bucket, here in moto


def publish_abid(cloud: Cloud, sample_dir: Path, images: int) -> list[str]:
    """The first ``images`` photos of the shipped sample, laid out as ABID's public bucket holds them."""
    s3 = cloud.client("s3")
    s3.create_bucket(Bucket=SOURCE_BUCKET)
    ids = sorted(p.stem for p in (sample_dir / "metadata").glob("*.json"))[:images]
    for image_id in ids:
        s3.put_object(Bucket=SOURCE_BUCKET, Key=f"metadata/{image_id}.json",
                      Body=(sample_dir / "metadata" / f"{image_id}.json").read_bytes())
        s3.put_object(Bucket=SOURCE_BUCKET, Key=f"bin-images/{image_id}.jpg",
                      Body=(sample_dir / "bin-images" / f"{image_id}.jpg").read_bytes())
    return ids


def review_label(cloud: Cloud, sample_dir: Path, image_id: str, count: int) -> str:
    """A reviewer's answer for an upload (a copy of one sample photo), as the review API writes it: the label
    under raw/reviewed/ in ABID's layout (lambdas/review/store.py). Returns the label's image id."""
    from lambdas.review import store

    s3, bucket = cloud.client("s3"), data_bucket(cloud)
    key = f"uploads/bin-{image_id}.jpg"
    put = s3.put_object(Bucket=bucket, Key=key, Body=(sample_dir / "bin-images" / f"{image_id}.jpg").read_bytes())
    store.write_label(s3, bucket, {"bucket": bucket, "key": key, "versionId": put.get("VersionId"),
                                   "reviewedCount": count, "reviewedBy": "reviewer-sub",
                                   "reviewedAt": "2026-12-06T10:00:00+00:00", "count": count - 1,
                                   "modelStatus": "uncounted-low-confidence", "expectedCount": count})
    return store.label_id(key, put.get("VersionId"))


def split_twelve(images: int) -> dict[str, Any]:
    """A dataset request that leaves photos in every split of the first twelve sample photos (8 / 2 / 2): with the
    default 10 %, each count class of so few photos rounds to no validation photo, and training needs some."""
    return {"selector": "count-range", "limit": images, "validationFraction": 0.2, "testFraction": 0.2}


def test_the_pipeline_ingests_packs_trains_gates_and_deploys_to_pipeline_succeeded(
        cloud: Cloud, sample_dir: Path) -> None:
    from ml import shards

    ids = publish_abid(cloud, sample_dir, images=12)
    reviewed = review_label(cloud, sample_dir, ids[0], count=3)
    execution = cloud.run(cloud.definition(PIPELINE), {"dataset": split_twelve(len(ids))})
    execution.assert_no_runtime_error()
    assert execution.status == "SUCCEEDED", execution.cause
    entered = execution.states_entered()
    # A Distributed Map's iterations are child executions, with their own histories (CopyBatch and PackShard
    # are not here).
    path = ["Check input", "SelectDataset", "CopyImages", "SplitDataset", "Pack stage", "PlanShards", "PackShards",
            "FinishPack", "Training stage", "PrepareTraining", "TrainModel", "RecordTraining", "Decide deploy",
            "Release model", "Describe endpoint", "Smoke test endpoint", "Finish deploy", "Pipeline succeeded"]
    assert [state for state in entered if state in path] == path
    workers = [i for i in cloud.lambdas.invocations if i.function.startswith("ingestworker")]
    assert sorted(item["image_id"] for w in workers for item in w.event["Items"]) == ids
    # The real batch shape: the ItemBatcher's batches (ingestBatchSize 100: all twelve in one), each item
    # through the ItemSelector. Before, each photo was a batch of one.
    assert [len(w.event["Items"]) for w in workers] == [len(ids)]
    assert all(set(item) > {"image_id"} for item in workers[0].event["Items"]), workers[0].event["Items"][0]
    s3 = cloud.client("s3")
    copied = s3.list_objects_v2(Bucket=data_bucket(cloud), Prefix="raw/")
    assert copied["KeyCount"] == 2 * (len(ids) + 1)  # each photo and its metadata, and the reviewed label's
    # Every ingested photo is packed once, into the shards of its split; the person's label joins train.
    pack = execution.output["pack"]
    packers = [i for i in cloud.lambdas.invocations if i.function.startswith("packpacker")]
    assert sorted(image_id for p in packers for image_id in p.event["ids"]) == sorted([*ids, reviewed])
    assert any(reviewed in p.event["ids"] for p in packers if p.event["split"] == "train")
    packed_ids = []
    for split, prefix in pack["channels"].items():
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=data_bucket(cloud),
                                                     Prefix=prefix.removeprefix(f"s3://{data_bucket(cloud)}/"))
                ["Contents"]]
        assert len(keys) == pack["shards"][split]
        for key in keys:
            body = s3.get_object(Bucket=data_bucket(cloud), Key=key)["Body"].read()
            packed_ids += [sample.key for sample in shards.read_shard(io.BytesIO(body))]
    assert sorted(packed_ids) == sorted([*ids, reviewed])
    # The training report says how many reviewed photos the job trained on.
    assert execution.output["ingest"]["reviewedUsed"] == pack["reviewedUsed"] == 1
    training = execution.output["training"]
    assert training["reviewedUsed"] == 1
    stored = json.loads(s3.get_object(Bucket=data_bucket(cloud), Key=training["reportKey"])["Body"].read())
    assert stored["reviewedUsed"] == 1
    # Training reads the shard channels the pack stage left.
    ((operation, request),) = cloud.bridge.requests
    assert operation == "CreateTrainingJob"
    sources = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in request["InputDataConfig"]}
    for split, prefix in pack["channels"].items():
        assert sources[split]["S3Uri"] == prefix and sources[split]["S3DataType"] == "S3Prefix"
    assert set(pack["channels"]) == {"train", "validation", "test"}
    assert cloud.client("sagemaker").describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"


def test_photos_that_cannot_be_packed_fail_the_pack_stage_before_training(cloud: Cloud, sample_dir: Path) -> None:
    # Two of twelve photos vanish from raw/ between ingest and pack: 16.7 %, above the tolerated 5 %.
    ids = publish_abid(cloud, sample_dir, images=12)
    bucket = data_bucket(cloud)

    def lose_two(invocation: offline.Invocation) -> None:
        if invocation.function.startswith("ingestsplit") and invocation.error is None:
            for image_id in ids[:2]:
                cloud.client("s3").delete_object(Bucket=bucket, Key=f"raw/bin-images/{image_id}.jpg")

    cloud.lambdas.after = lose_two
    execution = cloud.run(cloud.definition(PIPELINE), {"dataset": split_twelve(len(ids))})
    execution.assert_no_runtime_error()
    assert execution.status == "FAILED"
    assert execution.error == "TooManyFailures"
    # The cause is the stage's: Lambda's error document, led by the stage's name.
    assert execution.cause.startswith("pack stage failed:")
    assert "2 of 12 photos could not be packed (16.7 %), above the tolerated 5 %" in execution.cause
    entered = execution.states_entered()
    assert entered[-2:] == ["Record pack failure", "Pipeline failed"]
    assert "Training stage" not in entered and cloud.bridge.requests == []
    report = json.loads(cloud.client("s3").get_object(Bucket=bucket, Key=f"reports/pack/{run_id('run')}.json")
                        ["Body"].read())
    assert sorted(f["imageId"] for f in report["failures"]) == sorted(ids[:2])
    assert all(f["reason"].endswith("does not exist (NoSuchKey)") for f in report["failures"])


def test_pipeline_status_reads_a_real_failed_history_as_failed(cloud: Cloud) -> None:
    # `invmon pipeline status` on the history the interpreter recorded: the stage whose branch ended in a Fail
    # state is failed although its Catch then exited it, as is the Fail state the pipeline ended in.
    from invmon.aws import execution_steps

    cloud.lambdas.after = after_release(lambda: offline.set_endpoint_status(ENDPOINT, "OutOfService"))
    execution = run_deploy(cloud)
    status = {step.name: step.status for step in execution_steps(execution.history)}
    assert status["Deploy stage"] == "failed"
    assert status["Endpoint failed"] == "failed"
    assert status["Pipeline failed"] == "failed"
    assert status["Release model"] == "succeeded"
    assert status["Record deploy failure"] == "succeeded"


def test_a_forced_redeploy_updates_the_endpoint_blue_green(cloud: Cloud) -> None:
    assert run_deploy(cloud, name="first").status == "SUCCEEDED"
    execution = run_deploy(cloud, name="second", deploy={"force": True})
    assert execution.status == "SUCCEEDED", execution.cause
    releases = [i.result for i in cloud.lambdas.invocations if i.function.startswith("deployrelease")]
    assert [r["action"] for r in releases] == ["create", "update"]
    (update,) = cloud.bridge.updates
    assert update["EndpointConfigName"] == releases[1]["endpointConfigName"]
    assert "BlueGreenUpdatePolicy" in update["DeploymentConfig"]
    assert "Deploy finished" in execution.states_entered()


def in_service_record(cloud: Cloud) -> dict[str, Any]:
    from lambdas.deploy import plan

    body = cloud.client("s3").get_object(Bucket=data_bucket(cloud), Key=plan.in_service_key(ENDPOINT))["Body"]
    return json.loads(body.read())


def broken_answer(name: str, body: bytes) -> tuple[int, bytes]:
    """An answer the count Lambda refuses (lambdas/count/records.py read_prediction): a count outside the classes."""
    answer = json.loads(harness.served_answer())
    return 200, json.dumps(answer | {"count": 9}).encode()


def test_a_good_smoke_answer_after_deploy_lets_the_deploy_finish(cloud: Cloud) -> None:
    from lambdas.deploy import smoke

    execution = run_deploy(cloud)
    assert execution.status == "SUCCEEDED", execution.cause
    # One known photo, to the endpoint the deploy created, before the model is recorded in service.
    assert cloud.bridge.invocations == [(ENDPOINT, smoke.PHOTO.read_bytes())]
    entered = execution.states_entered()
    assert entered.index("Smoke test endpoint") < entered.index("Finish deploy")
    release = next(i for i in cloud.lambdas.invocations if i.function.startswith("deployrelease"))
    assert in_service_record(cloud)["modelName"] == release.result["modelName"]


def test_a_failing_smoke_check_after_an_update_rolls_back_to_the_previous_config(cloud: Cloud) -> None:
    assert run_deploy(cloud, name="first").status == "SUCCEEDED"
    old = in_service_record(cloud)
    cloud.bridge.endpoint_answer = broken_answer
    execution = run_deploy(cloud, name="second", deploy={"force": True})
    assert execution.status == "FAILED"
    assert execution.error == "SmokeCheckFailed"
    releases = [i.result for i in cloud.lambdas.invocations if i.function.startswith("deployrelease")]
    assert [r["action"] for r in releases] == ["create", "update"]
    assert releases[1]["previousEndpointConfigName"] == old["endpointConfigName"]
    assert execution.cause.startswith(f"deploy stage failed: smoke check of endpoint {ENDPOINT} failed: the answer "
                                      "to a known photo is one the count Lambda would refuse: prediction does not "
                                      "follow the response contract")
    assert "count 9 is not among the classes" in execution.cause
    assert execution.cause.endswith(f"the endpoint is rolled back to its previous config {old['endpointConfigName']} "
                                    "(UpdateEndpoint started) and the model in service is unchanged; the new config "
                                    f"{releases[1]['endpointConfigName']} is left unused")
    # UpdateEndpoint to the new config, then back to the old one; the record still names the old model.
    assert [u["EndpointConfigName"] for u in cloud.bridge.updates] == [releases[1]["endpointConfigName"],
                                                                       old["endpointConfigName"]]
    endpoint = cloud.client("sagemaker").describe_endpoint(EndpointName=ENDPOINT)
    assert endpoint["EndpointConfigName"] == old["endpointConfigName"]
    assert in_service_record(cloud) == old
    entered = execution.states_entered()
    assert "Finish deploy" not in entered
    assert entered.index("Roll back endpoint") < entered.index("Release deploy lock after failure")
    assert lock_items(cloud) == []


def test_a_failing_smoke_check_on_a_first_deploy_fails_with_nothing_to_roll_back(cloud: Cloud) -> None:
    cloud.bridge.endpoint_answer = lambda name, body: (500, b"CUDA error: device-side assert triggered")
    execution = run_deploy(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "SmokeCheckFailed"
    release = next(i.result for i in cloud.lambdas.invocations if i.function.startswith("deployrelease"))
    assert execution.cause == (
        f"deploy stage failed: smoke check of endpoint {ENDPOINT} failed: InvokeEndpoint answered ModelError: "
        "Received server error (500) from primary; this was the first deploy of the endpoint, so there is no "
        f"previous config to roll back to: the endpoint stays on config {release['endpointConfigName']} and no "
        "model is recorded in service")
    assert "Roll back endpoint" not in execution.states_entered()
    assert cloud.bridge.updates == []
    with pytest.raises(cloud.client("s3").exceptions.NoSuchKey):
        in_service_record(cloud)
    assert lock_items(cloud) == []


# -------------------------------------------------------------------------------------------- bulk count

BULK = "CountBulkStateMachine"


def prediction(count: int) -> dict[str, Any]:
    """One answer of the serving contract (ml/inference.py) for a photo of ``count`` objects."""
    return {"count": count, "confidence": 0.9, "classes": [count, count + 1], "probabilities": [0.9, 0.1],
            "model": "counter"}


def upload_photos(cloud: Cloud, sample_dir: Path, count: int) -> list[str]:
    s3 = cloud.client("s3")
    keys = []
    for photo in sorted((sample_dir / "bin-images").glob("*.jpg"))[:count]:
        keys.append(f"incoming/{photo.name}")
        s3.put_object(Bucket=data_bucket(cloud), Key=keys[-1], Body=photo.read_bytes())
    return keys


def test_bulk_count_transforms_the_uploads_and_loads_a_record_per_photo(cloud: Cloud, sample_dir: Path) -> None:
    assert run_deploy(cloud).status == "SUCCEEDED"
    keys = upload_photos(cloud, sample_dir, 3)
    cloud.bridge.outcome = lambda action, request: harness.Outcome(answer=lambda key: prediction(4))
    execution = cloud.run(cloud.definition(BULK), {}, name="bulk")
    execution.assert_no_runtime_error()
    assert execution.status == "SUCCEEDED", execution.cause
    assert execution.states_entered()[-1] == "Bulk count done"
    (_, request), = [r for r in cloud.bridge.requests if r[0] == "CreateTransformJob"]
    sagemaker = cloud.client("sagemaker")
    serving = sagemaker.describe_model(ModelName=sagemaker.describe_endpoint_config(
        EndpointConfigName=sagemaker.describe_endpoint(EndpointName=ENDPOINT)[
            "EndpointConfigName"])["ProductionVariants"][0]["ModelName"])
    # The job runs a model of its own: the serving artifact under the transform role, never the endpoint's role.
    transform = sagemaker.describe_model(ModelName=request["ModelName"])
    assert request["ModelName"].startswith(f"{ENDPOINT}-bulk-")
    assert transform["PrimaryContainer"]["ModelDataUrl"] == serving["PrimaryContainer"]["ModelDataUrl"]
    assert transform["ExecutionRoleArn"] != serving["ExecutionRoleArn"]
    assert "transformrole" in transform["ExecutionRoleArn"].lower()
    assert "inferencerole" in serving["ExecutionRoleArn"].lower()
    table = cloud.name("AWS::DynamoDB::Table", "CountCounts")
    items = [item for item in cloud.client("dynamodb").scan(TableName=table)["Items"]
             if item["pk"]["S"].startswith("photo#")]  # not the review queue's day counters
    assert sorted(item["count"]["N"] for item in items) == ["4"] * len(keys)


def test_a_failed_transform_ends_the_bulk_count_incomplete(cloud: Cloud, sample_dir: Path) -> None:
    assert run_deploy(cloud).status == "SUCCEEDED"
    upload_photos(cloud, sample_dir, 2)
    cloud.bridge.outcome = lambda action, request: harness.Outcome("Failed", "ClientError: model fault")
    execution = cloud.run(cloud.definition(BULK), {}, name="bulk")
    execution.assert_no_runtime_error()
    assert execution.status == "FAILED"
    assert execution.error == "TransformFailed"
    entered = execution.states_entered()
    assert entered.index("Transform failed") < entered.index("Load results")


def test_a_copy_batch_that_keeps_failing_is_retried_then_fails_the_ingest_stage(
        cloud: Cloud, sample_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The one batch of twelve (100 %, above the tolerated 5 %) fails on every attempt. On AWS the Map fails
    # (States.ExceedToleratedFailureThreshold) and its Catch hands that to the split step; moto lets a
    # distributed Map succeed whatever fails in it (test_harness measures that), so the split step finds the
    # failed batch in the results instead. Either way the stage fails and training never starts, which is what
    # is asserted.
    from lambdas.ingest import worker

    ids = publish_abid(cloud, sample_dir, images=12)
    real = worker.process_batch

    def flaky(items: list[dict[str, Any]], **kwargs: Any) -> Any:
        if any(item["image_id"] == ids[0] for item in items):
            raise worker.TransientCopyError("throttled")
        return real(items, **kwargs)

    monkeypatch.setattr(worker, "process_batch", flaky)
    execution = cloud.run(cloud.definition(PIPELINE), {"dataset": {"selector": "count-range", "limit": len(ids)}})
    execution.assert_no_runtime_error()
    attempts = [i for i in cloud.lambdas.invocations if i.function.startswith("ingestworker")
                and any(item["image_id"] == ids[0] for item in i.event["Items"])]
    assert len(attempts) == 5  # the first try and the Retry's MaxAttempts (4) more
    assert execution.status == "FAILED"
    assert execution.cause.startswith("ingest stage failed:")
    assert "Training stage" not in execution.states_entered()


# ----------------------------------------------------------------------------------- the first state (#25, #23)

CHECK = "Check input"


def first_state_only(cloud: Cloud) -> dict[str, Any]:
    """The pipeline's own definition, ending after its first state: the check runs as synthesized, and what it
    accepts goes straight to "Pipeline succeeded" (the stages after it have their own tests)."""
    definition = cloud.definition(PIPELINE)
    definition["States"][CHECK]["Next"] = "Pipeline succeeded"
    return definition


def allow(cloud: Cloud, **context: Any) -> None:
    """The check function's environment as the stack writes it when deployed with ``-c key=value``."""
    from infra.config import load_settings
    from infra.execution_input import allowances
    from lambdas.execution_input.check import ALLOWANCES_ENV

    (name,) = [name for name in cloud.lambdas.functions if name.startswith("executioninputcheck")]
    handler, environment = cloud.lambdas.functions[name]
    cloud.lambdas.functions[name] = (handler, environment | {
        ALLOWANCES_ENV: json.dumps(allowances(load_settings(context)))})


def assert_refused_at_the_first_state(execution: offline.Execution, field: str) -> None:
    execution.assert_no_runtime_error()
    assert execution.status == "FAILED"
    assert execution.states_entered() == [CHECK]
    assert execution.error == "InvalidExecutionInput"
    assert len(execution.cause) < 1000, execution.cause
    message = json.loads(execution.cause)["errorMessage"]
    assert message.startswith(f"invalid execution input: {field}"), message


# Each #25 and #23 case once; the other strict-type cases are tests/lambdas/test_execution_input.py's.
HOSTILE = {
    "oversized": ({"training": {"pretrained": "x" * 259_000}}, "input"),
    "top-level typo": ({"datset": {"limit": 10}}, "datset: unknown key; did you mean dataset?"),
    "dataset typo": ({"dataset": {"limt": 10}}, "dataset.limt: unknown key; did you mean limit?"),
    "training typo": ({"training": {"instanceTyp": "ml.g5.xlarge"}}, "training.instanceTyp: unknown key"),
    "tuning typo": ({"training": {"tuning": {"maxJob": 2}}}, "training.tuning.maxJob: unknown key"),
    "deploy typo": ({"deploy": {"forse": True}}, "deploy.forse: unknown key; did you mean force?"),
    "string count": ({"dataset": {"selector": "count-range", "minCount": "3"}}, "dataset.minCount"),
    "deploy as a string": ({"deploy": "force"}, "deploy"),
    "minImprovement in words": ({"deploy": {"minImprovement": "a lot"}}, "deploy.minImprovement"),
    "not an object": ([1, 2, 3], "input"),
    "late training check": ({"training": {"useSpot": True, "maxRuntimeSeconds": 7200, "maxWaitSeconds": 3600}},
                            "training.maxWaitSeconds"),
    "isolation off": ({"training": {"networkIsolation": False}}, "training.networkIsolation"),
    "p5": ({"training": {"instanceType": "ml.p5.48xlarge"}}, "training.instanceType"),
    "100 instances": ({"training": {"instanceCount": 100}}, "training.instanceCount"),
    "500 tuning jobs": ({"training": {"tuning": {"enabled": True, "maxJobs": 500}}}, "training.tuning.maxJobs"),
    "forced deploy": ({"deploy": {"force": True}}, "deploy.force"),
}


def test_a_hostile_input_ends_the_execution_in_its_first_state_naming_the_field(cloud: Cloud) -> None:
    # One machine, one execution per input (a fixture per input would cost seconds each for nothing).
    definition = cloud.definition(PIPELINE)
    for number, (case, (raw, field)) in enumerate(sorted(HOSTILE.items())):
        execution = cloud.run(definition, raw, name=f"hostile-{number}")
        try:
            assert_refused_at_the_first_state(execution, field)
        except AssertionError as error:
            raise AssertionError(f"{case}: {error}") from None
    assert [i.function for i in cloud.lambdas.invocations if not i.function.startswith("executioninput")] == []
    assert cloud.bridge.requests == []


ALLOWED = [
    ({"training": {"networkIsolation": False}}, {"allowNetworkIsolationOff": True}),
    ({"training": {"instanceType": "ml.p5.48xlarge"}},
     {"trainingAllowedInstanceTypes": ["ml.g4dn.xlarge", "ml.p5.48xlarge"]}),
    ({"training": {"instanceCount": 100}}, {"trainingMaxInstanceCount": 100}),
    ({"deploy": {"force": True}}, {"allowForceDeploy": True}),
]


def test_a_control_is_accepted_at_the_first_state_where_the_stack_allows_it(cloud: Cloud) -> None:
    definition = first_state_only(cloud)
    for number, (raw, context) in enumerate(ALLOWED):
        allow(cloud, **context)
        execution = cloud.run(definition, raw, name=f"allowed-{number}")
        execution.assert_no_runtime_error()
        assert execution.status == "SUCCEEDED", (context, execution.cause)
        assert execution.states_entered() == [CHECK, "Pipeline succeeded"]
        section = next(iter(raw))
        assert execution.output["input"][section].items() >= raw[section].items()
        assert execution.output["execution"] == f"allowed-{number}"


def test_only_the_normalized_input_travels_on(cloud: Cloud) -> None:
    raw = {"dataset": {"selector": "count-range", "min_count": 1, "maxCount": None}}
    execution = cloud.run(first_state_only(cloud), raw)
    assert execution.status == "SUCCEEDED", execution.cause
    assert execution.output == {"input": {"dataset": {"selector": "count-range", "minCount": 1}}, "execution": "run"}


def test_a_network_isolation_off_that_the_stack_allows_reaches_the_training_job(cloud: Cloud) -> None:
    state = {"input": {"training": {"networkIsolation": False}}, "execution": "run", "pack": packed(cloud)}
    execution = cloud.run(cloud.definition(PIPELINE, start_at="Training stage"), state)
    assert execution.status == "SUCCEEDED", execution.cause
    ((_, request),) = cloud.bridge.requests
    assert request["EnableNetworkIsolation"] is False


# ------------------------------------------------------------------------------------- runs that cannot mix


def shard_ids(cloud: Cloud, channel: str) -> list[str]:
    """The photo ids in every object under a channel prefix: what a job reading that S3Prefix gets."""
    from ml import shards

    s3, bucket = cloud.client("s3"), data_bucket(cloud)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=channel.removeprefix(f"s3://{bucket}/")).get("Contents", [])
    return sorted(sample.key for entry in listed for sample in shards.read_shard(
        io.BytesIO(s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read())))


def pack_report(cloud: Cloud, execution: offline.Execution) -> dict[str, Any]:
    key = execution.output["pack"]["reportKey"]
    return json.loads(cloud.client("s3").get_object(Bucket=data_bucket(cloud), Key=key)["Body"].read())


def test_executions_whose_names_made_one_run_id_never_mix_their_shards(cloud: Cloud, sample_dir: Path) -> None:
    # Before: exp-1 and exp+1 both became run "exp-1"; the second (8 photos) trained on the first's 12 as well.
    ids = publish_abid(cloud, sample_dir, images=12)
    first = cloud.run(cloud.definition(PIPELINE), {"dataset": split_twelve(12)}, name="exp-1")
    # The harness's ResultWriter stand-in takes every invocation so far as the Map's children: one run's at a time.
    cloud.lambdas.invocations.clear()
    second = cloud.run(cloud.definition(PIPELINE), {"dataset": split_twelve(8) | {"seed": "other"}}, name="exp+1")
    for execution in (first, second):
        execution.assert_no_runtime_error()
        assert execution.status == "SUCCEEDED", execution.cause
    assert first.output["ingest"]["runId"] != second.output["ingest"]["runId"]
    assert all(e.output["ingest"]["runId"].startswith("exp-1-") for e in (first, second))
    assert pack_report(cloud, first)["runId"] != pack_report(cloud, second)["runId"]
    # Each job reads exactly the photos of its own pack plan, whatever the other run left in the bucket.
    jobs = [request for operation, request in cloud.bridge.requests if operation == "CreateTrainingJob"]
    assert len(jobs) == 2
    s3 = cloud.client("s3")
    for execution, job in zip((first, second), jobs, strict=True):
        plan = json.loads(s3.get_object(Bucket=data_bucket(cloud), Key=pack_report(cloud, execution)["planKey"])
                          ["Body"].read())
        sources = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
        for split in execution.output["pack"]["channels"]:
            planned = sorted(i for item in plan if item["split"] == split for i in item["ids"])
            assert shard_ids(cloud, sources[split]) == planned, split
    assert sum(second.output["pack"]["photos"].values()) == 8
    assert set(ids) >= {i for c in second.output["pack"]["channels"].values() for i in shard_ids(cloud, c)}


def test_a_rerun_with_an_identical_plan_reuses_the_shards(cloud: Cloud, sample_dir: Path) -> None:
    publish_abid(cloud, sample_dir, images=12)
    first = cloud.run(cloud.definition(PIPELINE), {"dataset": split_twelve(12)}, name="again-1")
    s3 = cloud.client("s3")
    before = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=data_bucket(cloud),
                                                                       Prefix="shards/")["Contents"]}
    cloud.lambdas.invocations.clear()  # the ResultWriter stand-in's children: this run's only
    second = cloud.run(cloud.definition(PIPELINE), {"dataset": split_twelve(12)}, name="again-2")
    assert first.status == second.status == "SUCCEEDED", (first.cause, second.cause)
    assert first.output["ingest"]["runId"] != second.output["ingest"]["runId"]
    assert second.output["pack"]["channels"] == first.output["pack"]["channels"]
    report = pack_report(cloud, second)
    assert report["shardsWritten"] == 0 and report["shardsUnchanged"] == len(before)
    after = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=data_bucket(cloud),
                                                                      Prefix="shards/")["Contents"]}
    assert after == before  # nothing repacked under a new prefix
