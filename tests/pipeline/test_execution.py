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
from tests.pipeline import harness
from tests.pipeline.conftest import Cloud

PIPELINE = "PipelineStateMachine"
ENDPOINT = "invmon-dev-counter"


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
    assert execution.states_entered()[-3:] == ["Endpoint failed", "Record deploy failure", "Pipeline failed"]


def test_endpoint_failed_fails_the_pipeline_with_its_failure_reason(cloud: Cloud) -> None:
    cloud.lambdas.after = after_release(
        lambda: offline.set_endpoint_status(ENDPOINT, "Failed", "the container did not pass the ping check"))
    execution = run_deploy(cloud)
    assert execution.status == "FAILED"
    assert execution.error == "EndpointFailed"
    assert execution.cause == (f"deploy stage failed: Endpoint {ENDPOINT} is Failed: "
                               "the container did not pass the ping check")


def test_first_deploy_creates_the_endpoint_and_records_the_model_in_service(cloud: Cloud) -> None:
    execution = run_deploy(cloud)
    assert execution.status == "SUCCEEDED", execution.cause
    entered = execution.states_entered()
    path = ["Decide deploy", "Deploy?", "Release model", "Wait for endpoint", "Describe endpoint",
            "Endpoint ready?", "Finish deploy", "Deploy finished"]
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
            "reportKey": "reports/pack/run.json"}


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


def split_twelve(images: int) -> dict[str, Any]:
    """A dataset request that leaves photos in every split of the first twelve sample photos (8 / 2 / 2): with the
    default 10 %, each count class of so few photos rounds to no validation photo, and training needs some."""
    return {"selector": "count-range", "limit": images, "validationFraction": 0.2, "testFraction": 0.2}


def test_the_pipeline_ingests_packs_trains_gates_and_deploys_to_pipeline_succeeded(
        cloud: Cloud, sample_dir: Path) -> None:
    from ml import shards

    ids = publish_abid(cloud, sample_dir, images=12)
    execution = cloud.run(cloud.definition(PIPELINE), {"dataset": split_twelve(len(ids))})
    execution.assert_no_runtime_error()
    assert execution.status == "SUCCEEDED", execution.cause
    entered = execution.states_entered()
    # A Distributed Map's iterations are child executions, with their own histories (CopyBatch and PackShard
    # are not here).
    path = ["Prepare", "SelectDataset", "CopyImages", "SplitDataset", "Pack stage", "PlanShards", "PackShards",
            "FinishPack", "Training stage", "PrepareTraining", "TrainModel", "RecordTraining", "Decide deploy",
            "Release model", "Describe endpoint", "Finish deploy", "Pipeline succeeded"]
    assert [state for state in entered if state in path] == path
    workers = [i for i in cloud.lambdas.invocations if i.function.startswith("ingestworker")]
    assert sorted(item["image_id"] for w in workers for item in w.event["Items"]) == ids
    s3 = cloud.client("s3")
    copied = s3.list_objects_v2(Bucket=data_bucket(cloud), Prefix="raw/")
    assert copied["KeyCount"] == 2 * len(ids)  # each photo and its metadata
    # Every ingested photo is packed once, into the shards of its split.
    pack = execution.output["pack"]
    packers = [i for i in cloud.lambdas.invocations if i.function.startswith("packpacker")]
    assert sorted(image_id for p in packers for image_id in p.event["ids"]) == ids
    packed_ids = []
    for split, prefix in pack["channels"].items():
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=data_bucket(cloud),
                                                     Prefix=prefix.removeprefix(f"s3://{data_bucket(cloud)}/"))
                ["Contents"]]
        assert len(keys) == pack["shards"][split]
        for key in keys:
            body = s3.get_object(Bucket=data_bucket(cloud), Key=key)["Body"].read()
            packed_ids += [sample.key for sample in shards.read_shard(io.BytesIO(body))]
    assert sorted(packed_ids) == ids
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
    report = json.loads(cloud.client("s3").get_object(Bucket=bucket, Key="reports/pack/run.json")["Body"].read())
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
    assert request["ModelName"] == cloud.client("sagemaker").describe_endpoint_config(
        EndpointConfigName=cloud.client("sagemaker").describe_endpoint(EndpointName=ENDPOINT)[
            "EndpointConfigName"])["ProductionVariants"][0]["ModelName"]
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
    # One batch of twelve (8 %, above the tolerated 5 %) fails on every attempt. On AWS the Map fails
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
                and i.event["Items"][0]["image_id"] == ids[0]]
    assert len(attempts) == 5  # the first try and the Retry's MaxAttempts (4) more
    assert execution.status == "FAILED"
    assert execution.cause.startswith("ingest stage failed:")
    assert "Training stage" not in execution.states_entered()
