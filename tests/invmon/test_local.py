"""LocalEndpoints: each SageMaker endpoint moto holds is served by ml.serve with its model, or marked Failed."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from invmon.demo import SHIPPED_MODEL
from invmon.local import LocalEndpoints

BUCKET = "models"


@pytest.fixture
def sagemaker() -> Iterator[Any]:
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield boto3.client("sagemaker", region_name="us-east-1")


def deploy(sagemaker: Any, model_dir: Path | None, name: str = "counter") -> None:
    """CreateModel/CreateEndpointConfig/CreateEndpoint as the release step asks, with ``model_dir`` packed as
    SageMaker's model.tar.gz (an empty archive for None)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model_dir.rglob("*")) if model_dir else []:
            tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
    boto3.client("s3", region_name="us-east-1").put_object(Bucket=BUCKET, Key=f"{name}/model.tar.gz",
                                                           Body=buffer.getvalue())
    sagemaker.create_model(ModelName=f"{name}-model", ExecutionRoleArn="arn:aws:iam::123456789012:role/r",
                           PrimaryContainer={"Image": "image", "ModelDataUrl": f"s3://{BUCKET}/{name}/model.tar.gz"})
    sagemaker.create_endpoint_config(EndpointConfigName=f"{name}-config", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": f"{name}-model", "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config")


@pytest.mark.slow
def test_an_endpoint_is_served_with_its_models_archive_and_stopped_on_close(sagemaker: Any, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", raising=False)
    deploy(sagemaker, SHIPPED_MODEL)
    endpoints = LocalEndpoints(tmp_path)
    try:
        (line,) = endpoints.sync()
        assert "served by ml.serve" in line
        url = os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"]
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
            assert response.status == 200
        assert endpoints.sync() == []  # the same config is not served twice
        served = tmp_path / "endpoints" / "counter" / "counter-config"
        assert (served / "model-config.json").is_file()
    finally:
        endpoints.close()
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME" not in os.environ


def test_an_endpoint_whose_model_cannot_be_served_is_failed_with_the_reason(sagemaker: Any, tmp_path: Path) -> None:
    deploy(sagemaker, None)
    endpoints = LocalEndpoints(tmp_path)
    try:
        (line,) = endpoints.sync()
    finally:
        endpoints.close()
    assert "Failed" in line
    described = sagemaker.describe_endpoint(EndpointName="counter")
    assert described["EndpointStatus"] == "Failed"
    assert described["FailureReason"].startswith("the model could not be served here:")
