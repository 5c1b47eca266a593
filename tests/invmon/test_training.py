"""The demo's SageMaker: training jobs run from their request (channels, hyperparameters, outputs in SageMaker's
layout), and endpoints served by ml.serve. moto plays S3 and SageMaker's control plane."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from invmon.training import (
    LocalTrainingJobs,
    channel_objects,
    decode_hyperparameters,
    download_channel,
    toolkit_args,
)
from lambdas.training.request import _encode

BUCKET = "data"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.3-cpu-py311"


@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def test_hyperparameters_reach_the_entry_point_as_the_training_toolkit_passes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The request's values are JSON-encoded (lambdas/training/request.py, as the SageMaker SDK does); the toolkit
    # decodes each and drops its own sagemaker_* entries before building the entry point's arguments.
    toolkit = pytest.importorskip("sagemaker_training")
    from sagemaker_training import environment, mapping, params

    encoded = {**_encode({"epochs": 2, "lr": 0.001, "augment": False, "network": "efficientnet-lite0", "x": 1}),
               "sagemaker_program": json.dumps("ml/train.py"), "sagemaker_region": json.dumps("us-east-1"),
               "plain": "not json"}
    (tmp_path / "hyperparameters.json").write_text(json.dumps(encoded))
    monkeypatch.setattr(environment, "hyperparameters_file_dir", str(tmp_path / "hyperparameters.json"))
    decoded_by_toolkit = environment.read_hyperparameters()
    user = mapping.split_by_criteria(decoded_by_toolkit, keys=params.SAGEMAKER_HYPERPARAMETERS,
                                     prefix=params.SAGEMAKER_PREFIX).excluded
    assert toolkit.__name__ == "sagemaker_training"
    assert decode_hyperparameters(encoded) == user
    assert toolkit_args(decode_hyperparameters(encoded)) == mapping.to_cmd_args(user)
    assert toolkit_args({"augment": False}) == ["--augment", "False"]  # ml.train's str2bool reads this


def test_a_manifest_channel_lands_at_each_key_relative_to_the_manifest_prefix(s3: Any, tmp_path: Path) -> None:
    for key in ("raw/bin-images/1.jpg", "raw/metadata/1.json", "raw/bin-images/2.jpg"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
    manifest = [{"prefix": f"s3://{BUCKET}/raw/"}, "bin-images/1.jpg", "metadata/1.json"]
    s3.put_object(Bucket=BUCKET, Key="manifests/run/train.manifest", Body=json.dumps(manifest))
    source = {"S3DataType": "ManifestFile", "S3Uri": f"s3://{BUCKET}/manifests/run/train.manifest"}
    assert download_channel(s3, source, tmp_path / "train") == 2
    files = sorted(str(p.relative_to(tmp_path / "train")) for p in (tmp_path / "train").rglob("*") if p.is_file())
    assert files == ["bin-images/1.jpg", "metadata/1.json"]  # 2.jpg is not listed
    assert (tmp_path / "train" / "metadata" / "1.json").read_text() == "raw/metadata/1.json"


def test_an_s3_prefix_channel_holds_every_object_under_the_prefix_with_its_path(s3: Any, tmp_path: Path) -> None:
    # Tar shards under a prefix (the pack stage's layout): whatever objects are there, relative paths kept.
    for key in ("shards/train/shard-000000.tar", "shards/train/shard-000001.tar", "shards/train/sub/x.tar",
                "shards/validation/shard-000000.tar"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"tar")
    source = {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/shards/train/"}
    assert sorted(relative for _, _, relative in channel_objects(s3, source)) == [
        "shard-000000.tar", "shard-000001.tar", "sub/x.tar"]
    download_channel(s3, source, tmp_path / "train")
    assert (tmp_path / "train" / "sub" / "x.tar").read_bytes() == b"tar"
    # A prefix that is a whole key (the code channel's tarball, the pretrained weights) lands as its file name.
    s3.put_object(Bucket=BUCKET, Key="assets/abc.pth", Body=b"weights")
    whole_key = {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/assets/abc.pth"}
    assert [relative for _, _, relative in channel_objects(s3, whole_key)] == ["abc.pth"]


def test_a_channel_that_is_empty_or_escapes_its_folder_is_refused(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no objects"):
        download_channel(s3, {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/nothing/"}, tmp_path / "a")
    s3.put_object(Bucket=BUCKET, Key="secret", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key="m.manifest", Body=json.dumps([{"prefix": f"s3://{BUCKET}/raw/"}, "../secret"]))
    with pytest.raises(ValueError, match="leaves the channel folder"):
        download_channel(s3, {"S3DataType": "ManifestFile", "S3Uri": f"s3://{BUCKET}/m.manifest"}, tmp_path / "b")
    with pytest.raises(ValueError, match="AugmentedManifestFile"):
        channel_objects(s3, {"S3DataType": "AugmentedManifestFile", "S3Uri": f"s3://{BUCKET}/m.manifest"})


def publish_sample(s3: Any, sample_dir: Path, per_count: int = 2) -> str:
    """A few sample photos in raw/ and a manifest listing them, as the ingest stage leaves a channel."""
    from ml import abid

    records, _ = abid.scan_folder(sample_dir)
    chosen = [r for q in range(4) for r in [r for r in records if r.quantity == q][:per_count]]
    keys = []
    for record in chosen:
        for key in (record.image_key, record.metadata_key):
            s3.put_object(Bucket=BUCKET, Key=f"raw/{key}", Body=(sample_dir / key).read_bytes())
            keys.append(key)
    s3.put_object(Bucket=BUCKET, Key="manifests/run/all.manifest",
                  Body=json.dumps([{"prefix": f"s3://{BUCKET}/raw/"}, *keys]))
    return f"s3://{BUCKET}/manifests/run/all.manifest"


def publish_code(s3: Any, source: Path | None = None) -> str:
    """The trainer's source tarball as the stack deploys it (infra/training.py), in the bucket."""
    from infra.training import build_source_tarball

    tarball = build_source_tarball(source) if source else build_source_tarball()
    s3.put_object(Bucket=BUCKET, Key="assets/sourcedir.tar.gz", Body=tarball.read_bytes())
    return f"s3://{BUCKET}/assets/sourcedir.tar.gz"


def training_request(manifest: str, hyperparameters: dict[str, Any], name: str = "job-1",
                     code: str = f"s3://{BUCKET}/assets/sourcedir.tar.gz") -> dict[str, Any]:
    """A request as the prepare step builds it: data channels, the code channel holding the source tarball and
    the container's hyperparameters naming the entry point inside it (lambdas/training/request.py)."""
    from lambdas.training.request import CODE_CHANNEL, ENTRY_POINT, code_path

    channel = {"DataSource": {"S3DataSource": {"S3DataType": "ManifestFile", "S3Uri": manifest,
                                               "S3DataDistributionType": "FullyReplicated"}}, "InputMode": "File"}
    code_channel = {"ChannelName": CODE_CHANNEL, "InputMode": "File", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": code, "S3DataDistributionType": "FullyReplicated"}}}
    return {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": IMAGE, "TrainingInputMode": "File"},
        "RoleArn": "arn:aws:iam::123456789012:role/training",
        "InputDataConfig": [{"ChannelName": "train", **channel}, {"ChannelName": "validation", **channel},
                            code_channel],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/models/"},
        "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "HyperParameters": {**_encode(hyperparameters), "sagemaker_program": json.dumps(ENTRY_POINT),
                            "sagemaker_submit_directory": json.dumps(code_path(code))},
    }


def members(s3: Any, key: str) -> list[str]:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return tar.getnames()


@pytest.mark.slow
def test_a_training_job_runs_ml_train_from_its_request_and_leaves_sagemakers_output_layout(
        s3: Any, sample_dir: Path, tmp_path: Path) -> None:
    manifest = publish_sample(s3, sample_dir)
    publish_code(s3)
    tiny = {"epochs": 1, "limit": 8, "batch-size": 4, "image-size": 64, "freeze-blocks": 8, "threads": 1,
            "augment": False}
    bridge = LocalTrainingJobs(tmp_path, say=lambda line: None)
    described, outcome = bridge.run("createTrainingJob", training_request(manifest, tiny))
    assert outcome.status == "Completed", outcome.failure_reason
    assert described["TrainingJobStatus"] == "Completed"
    # SageMaker's layout: <S3OutputPath>/<job>/output/model.tar.gz and output.tar.gz beside it.
    assert described["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://{BUCKET}/models/job-1/output/model.tar.gz"
    assert "model-config.json" in members(s3, "models/job-1/output/model.tar.gz")
    assert "metrics.json" in members(s3, "models/job-1/output/output.tar.gz")
    log = (tmp_path / "jobs" / "job-1" / "training.log").read_text()
    assert "epoch=1;" in log
    # The trainer saw what the container would: its channels, and its name as the model id.
    config = json.loads((tmp_path / "jobs" / "job-1" / "model" / "model-config.json").read_text())
    assert config.get("model_id") == "job-1"


def test_a_trainer_that_exits_non_zero_fails_the_job_with_its_log_as_the_reason(
        s3: Any, sample_dir: Path, tmp_path: Path) -> None:
    manifest = publish_sample(s3, sample_dir, per_count=1)
    publish_code(s3)
    bridge = LocalTrainingJobs(tmp_path, say=lambda line: None)
    described, outcome = bridge.run("createTrainingJob", training_request(manifest, {"epochs": 0}, name="bad"))
    assert outcome.status == "Failed"
    assert described["TrainingJobStatus"] == "Failed"
    assert described["FailureReason"].startswith("AlgorithmError: ml.train exited with status 2")
    # The trainer's own complaint, the last line of its log, survives the cut to SageMaker's 1,024 characters.
    assert "error: argument --epochs" in described["FailureReason"]
    assert len(described["FailureReason"]) <= 1024  # SageMaker's limit for FailureReason
    assert not list(s3.list_objects_v2(Bucket=BUCKET, Prefix="models/").get("Contents", []))


def test_jobs_other_than_training_fail_with_a_reason(s3: Any, tmp_path: Path) -> None:
    bridge = LocalTrainingJobs(tmp_path, say=lambda line: None)
    outcome = bridge.finish("CreateTransformJob", {})
    assert outcome.status == "Failed" and "runs training jobs" in outcome.failure_reason


def test_the_entry_point_runs_from_the_code_channels_tarball_so_a_module_missing_from_it_fails_the_job(
        s3: Any, sample_dir: Path, tmp_path: Path) -> None:
    # Before, the bridge ran ml.train from this checkout: a module left out of the deployed asset passed here and
    # failed in AWS. The tarball here lacks ml/health.py, which ml/train.py imports.
    import shutil

    source = tmp_path / "src" / "ml"
    shutil.copytree(Path(__file__).resolve().parents[2] / "ml", source,
                    ignore=shutil.ignore_patterns("__pycache__", "health.py"))
    manifest = publish_sample(s3, sample_dir, per_count=1)
    bridge = LocalTrainingJobs(tmp_path / "work", say=lambda line: None)
    described, outcome = bridge.run("createTrainingJob", training_request(
        manifest, {"epochs": 1}, name="partial", code=publish_code(s3, source)))
    assert outcome.status == "Failed"
    assert "ModuleNotFoundError: No module named 'ml.health'" in described["FailureReason"]
    code = tmp_path / "work" / "jobs" / "partial" / "code"
    assert (code / "ml" / "train.py").is_file() and not (code / "ml" / "health.py").exists()


def test_a_request_without_its_source_tarball_fails_the_job_with_the_reason(s3: Any, sample_dir: Path,
                                                                           tmp_path: Path) -> None:
    manifest = publish_sample(s3, sample_dir, per_count=1)
    request = training_request(manifest, {"epochs": 1}, name="nocode")
    request["InputDataConfig"] = request["InputDataConfig"][:2]
    bridge = LocalTrainingJobs(tmp_path, say=lambda line: None)
    _, outcome = bridge.run("createTrainingJob", request)
    assert outcome.status == "Failed" and "is in no channel" in outcome.failure_reason
